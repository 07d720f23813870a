"""Functional correctness of generated code (the pass@k metric of HumanEval/MBPP-style evaluations, paper §5.1):
the unbiased pass@k estimator and a sandboxed runner that executes each program with its tests in a fresh Python
subprocess under a wall-clock timeout and resource limits (CPU seconds, address space, file size, no new
processes), in an empty temporary working directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import NamedTuple

import numpy as np

# Run inside the child before the untrusted program: hard limits (soft == hard, so the program cannot raise them).
_LAUNCHER = """\
import resource, sys
def _lim(name, value):
    res = getattr(resource, name, None)
    if res is None:
        return
    try:
        resource.setrlimit(res, (value, value))
    except (ValueError, OSError):
        pass
_lim("RLIMIT_CPU", {cpu})
_lim("RLIMIT_AS", {mem})
_lim("RLIMIT_FSIZE", {fsize})
_lim("RLIMIT_CORE", 0)
_lim("RLIMIT_NPROC", 0)  # no fork bombs (not enforced for root)
sys.argv = ["program.py"]
with open("program.py") as f:
    src = f.read()
exec(compile(src, "program.py", "exec"), {{"__name__": "__main__"}})
"""


class ExecResult(NamedTuple):
    """Outcome of one program: passed (exit status 0 in time), status ('passed', 'failed', 'timeout') and the
    tail of its stderr."""

    passed: bool
    status: str
    stderr: str


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) of n samples of which c are correct (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def run_program(source: str, timeout: float = 5.0, memory_mb: int = 1024, file_size_mb: int = 16) -> ExecResult:
    """Execute `source` in `python -I` in a temporary directory with the limits above; passed iff it exits 0."""
    # The CPU limit sits a second past the wall-clock timeout, which normally fires first; a program the CPU limit
    # stops anyway (SIGXCPU, then SIGKILL) also counts as a timeout.
    limits = dict(cpu=int(np.ceil(timeout)) + 1, mem=memory_mb * 2**20, fsize=file_size_mb * 2**20)
    with tempfile.TemporaryDirectory(prefix="dsv3-eval-") as cwd:
        with open(os.path.join(cwd, "program.py"), "w") as f:
            f.write(source)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "HOME": cwd,
               "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-c", _LAUNCHER.format(**limits)], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the program and anything it started (its own session; not yet reaped)
            _, err = proc.communicate()
            return ExecResult(False, "timeout", err.decode("utf-8", errors="replace")[-2000:])
    tail = err.decode("utf-8", errors="replace")[-2000:]
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return ExecResult(False, "timeout", tail)
    return ExecResult(proc.returncode == 0, "passed" if proc.returncode == 0 else "failed", tail)

