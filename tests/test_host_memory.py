"""dsv3_jax.keep_freed_host_memory: a process that frees a large block and allocates it again does not page-fault
it anew (the effect the train step needs: XLA:CPU mallocs its temporaries at every run). Measured in fresh
processes, since the setting is process-wide and binds only threads that have not allocated yet."""

import subprocess
import sys

import pytest

CHILD = """
import ctypes, ctypes.util, resource, sys
from dsv3_jax import keep_freed_host_memory
took = keep_freed_host_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
def touch():  # malloc (as XLA:CPU's buffers are; numpy would ask for huge pages), write, free 256 MiB
    p = libc.malloc(ctypes.c_size_t(256 << 20))
    ctypes.memset(p, 1, 256 << 20)
    libc.free(ctypes.c_void_p(p))
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    took, faults = out.split()
    return took, int(faults)


def test_freed_memory_is_reused_without_page_faults():
    if sys.platform != "linux":
        pytest.skip("glibc's mallopt is Linux-only")
    took, kept = _faults("keep")
    if took != "True":
        pytest.skip("the C library has no mallopt (not glibc)")
    _, default = _faults("default")
    pages = (256 << 20) // 4096
    assert default > pages // 2  # glibc's default: the block was unmapped on free, its pages fault again
    assert kept < pages // 100
