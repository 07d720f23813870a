"""dsv3-jax: a JAX/Flax reimplementation of DeepSeek-V3 (arXiv:2412.19437)."""

import ctypes
import ctypes.util
import os
import re

from dsv3_jax.config import PRESETS, ModelConfig, get_preset
from dsv3_jax.model.transformer import ModelOutput, Transformer
from dsv3_jax.precision import Precision
from dsv3_jax.hf import from_pretrained, save_pretrained


def cpu_collective_threads(devices: int | None = None) -> None:
    """Room in XLA:CPU's thread pool for simulated devices' collectives; call before jax makes its CPU client.

    XLA:CPU runs every simulated device's operations on one pool of max(cores, devices) threads, and a collective
    holds its thread until all its peers arrive. A device may run two independent collectives at once (e.g. a
    pipeline send and an expert-parallel all-gather), and with as many threads as devices that can leave a peer
    without a thread: every thread waits, and XLA aborts the process after 40 s ("Termination timeout for
    `collective permute`"). XLA sizes the pool from NPROC when it is set; this sets NPROC (unless already set) to
    4 threads per device, for meshes of up to 128 devices. `devices`: the simulated device count, by default the
    --xla_force_host_platform_device_count in XLA_FLAGS or JAX_NUM_CPU_DEVICES."""
    if devices is None:
        found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
        devices = int(found[-1]) if found else int(os.environ.get("JAX_NUM_CPU_DEVICES", "1") or 1)
    if devices > 1:  # XLA's own size plus up to 3 per device (at most 256 more: a large mesh is for compiling)
        os.environ.setdefault("NPROC", str(max(os.cpu_count() or 1, devices + min(3 * devices, 256))))


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation rather than hand it back to the kernel; an
    opt-in for a process that trains a model whose step needs large temporaries, called before its first jax
    computation. Returns whether it took effect (False where the C library has no mallopt, i.e. is not glibc).

    XLA:CPU allocates each run's temporary buffer with malloc (about 2 GB for a `small` training step). glibc
    serves blocks that large with mmap and unmaps them on free, so every step page-faults its whole working set
    anew: 500k faults and 0.8 s of kernel time per `small` step on 2 cores. This makes all threads share the main
    arena (M_ARENA_MAX 1: another arena would mmap large blocks regardless), serves large blocks from the heap
    (M_MMAP_MAX 0) and keeps up to 2 GiB of free heap (M_TRIM_THRESHOLD). Measured on 2 cores: the `small` train
    step 7% faster (transformers' step in the same process 18%). The costs: the process keeps its peak memory until
    it exits, and the threads contend for the one arena, which slows programs of many small ops: `tiny`'s 300-step
    README run 29% (58.6 against 45.5 s), `small`'s decode steps 4-7%. Hence not a default anywhere. The limit on
    arenas only binds threads that have not allocated yet, hence "before the first computation"."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    return all(libc.mallopt(opt, value) == 1 for opt, value in
               ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))


__all__ = ["cpu_collective_threads", "keep_freed_host_memory", "ModelConfig", "PRESETS", "get_preset", "Transformer",
           "ModelOutput", "Precision", "from_pretrained", "save_pretrained"]

cpu_collective_threads()  # before the first jax computation (importing the modules above makes none)
