"""Code pass@k: the unbiased estimator against brute-force enumeration of k-subsets; the sandboxed runner passes
correct programs and stops failing, endless, memory-hungry and forking ones."""

import itertools
import os
import time

import pytest

from dsv3_jax.eval import pass_at_k, run_program


@pytest.mark.parametrize("n,c", [(1, 0), (1, 1), (5, 0), (5, 2), (6, 5), (7, 3), (8, 8)])
def test_pass_at_k_equals_enumeration(n, c):
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        want = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(3, 4, 1), (3, 1, 4), (3, 1, 0), (3, -1, 1)])
def test_pass_at_k_bad_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


def test_passing_and_failing_programs():
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n")
    assert ok.passed and ok.status == "passed"
    bad = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr


def test_runs_in_an_empty_temporary_directory(tmp_path):
    here = os.getcwd()
    r = run_program(f"import os\nassert os.getcwd() != {here!r}\nassert os.listdir('.') == ['program.py']\n")
    assert r.passed, r.stderr


def test_endless_loop_times_out():
    r = run_program("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and not r.passed


def test_cpu_limit_counts_as_timeout():
    """The CPU-seconds limit ends a program with SIGXCPU: reported as a timeout, not a failure."""
    r = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)\n", timeout=5.0)
    assert r.status == "timeout" and not r.passed


def test_memory_limit():
    r = run_program("x = bytearray(2 * 1024**3)\n", memory_mb=512)
    assert r.status == "failed" and "MemoryError" in r.stderr


FORKER = """\
import os, sys, time
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print("child", pid, file=sys.stderr, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_no_process_survives():
    """Without root, RLIMIT_NPROC refuses the fork; as root (not bound by it) the timeout kills the whole group."""
    r = run_program(FORKER, timeout=1.5)
    if os.geteuid() != 0:
        assert r.status == "failed" and "BlockingIOError" in r.stderr
        return
    assert r.status == "timeout"
    pid = int(r.stderr.split()[1])
    deadline = time.monotonic() + 2.0  # SIGKILL is delivered asynchronously
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(pid)
