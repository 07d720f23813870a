"""Subprocess checks that run in the background, one at a time, while the in-process tests run.

The multi-device checks (8 simulated devices each, see tests/sharding), the experiments' --quick runs and the
post-training demo run in child processes: minutes of mostly single-threaded work. A test module registers each as a
job with `@background.job(name)`: a function of a work directory that runs its subprocesses to the end and returns
what the tests read (`background.quick_module(name, module)` registers a module's `--quick` run). tests/conftest.py
runs those modules' tests last and, when collection ends, starts their jobs in a daemon thread, in that order; a
module's fixture then calls `background.result(name)`, which waits for the job (or runs it there if it never
started) and re-raises its exception. On the 2-core CI machine the children run on the core the test process leaves
idle.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]

_JOBS: dict[str, tuple[str, Callable[[pathlib.Path], Any]]] = {}  # name -> (module, run)
_DONE: dict[str, threading.Event] = {}
_RESULT: dict[str, tuple[bool, Any]] = {}  # name -> (ok, result or the exception)
_LOCK = threading.Lock()
_BASE: list[pathlib.Path] = []
_STOP = threading.Event()
_TIMES: dict[str, list[float]] = {}  # name -> [start, end, seconds a test waited for it]
_T0 = time.monotonic()


def _register(name: str, module: str, run: Callable[[pathlib.Path], Any]) -> None:
    if name in _JOBS and _JOBS[name][0] != module:
        raise ValueError(f"background job {name!r} is registered by {_JOBS[name][0]} and {module}")
    _JOBS[name] = (module, run)


def job(name: str):
    """Register `run(workdir) -> result` as the background job `name` of the calling module."""
    def register(run: Callable[[pathlib.Path], Any]):
        _register(name, sys._getframe(1).f_globals["__name__"], run)
        return run
    return register


def quick_module(name: str, module: str, out: str = "out") -> None:
    """Register, for the calling module, the background job `name`: `python -m module --out WORKDIR/out --quick`
    (an experiment's or the demo's quick run); its result is that output directory."""
    def run(workdir: pathlib.Path) -> pathlib.Path:
        run_module(module, "--out", str(workdir / out), "--quick")
        return workdir / out
    _register(name, sys._getframe(1).f_globals["__name__"], run)


def modules_with_jobs() -> set[str]:
    """The test modules that registered a job (tests/conftest.py runs their tests last)."""
    return {module for module, _ in _JOBS.values()}


def run_module(module: str, *args: str, timeout: float = 1200) -> str:
    """`python -m module args` from the repository root (environment inherited); its output, asserting success."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"python -m {module} {' '.join(args)}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
    return proc.stdout


def start(modules: list[str], base: pathlib.Path | None = None) -> list[str]:
    """Start, in a daemon thread, the jobs registered by `modules` (in that order); returns their names."""
    _BASE[:] = [pathlib.Path(base or tempfile.mkdtemp(prefix="dsv3-jax-background-"))]
    names = [n for m in modules for n, (mod, _) in _JOBS.items() if mod == m]
    with _LOCK:
        names = [n for n in names if n not in _DONE]
        for n in names:
            _DONE[n] = threading.Event()
    threading.Thread(target=lambda: [_run(n) for n in names], name="background-checks", daemon=True).start()
    return names


def stop() -> None:
    """Start no further job (a job already running finishes on its own)."""
    _STOP.set()


def _run(name: str) -> None:
    if _STOP.is_set():
        _RESULT[name] = (False, RuntimeError(f"background job {name} not started: the session has ended"))
        _DONE[name].set()
        return
    workdir = (_BASE[0] if _BASE else pathlib.Path(tempfile.mkdtemp(prefix="dsv3-jax-background-"))) / name
    workdir.mkdir(parents=True, exist_ok=True)
    _TIMES[name] = [time.monotonic(), float("nan"), 0.0]
    try:
        _RESULT[name] = (True, _JOBS[name][1](workdir))
    except BaseException as e:  # kept, with its traceback, for the tests that read the result
        _RESULT[name] = (False, e)
    finally:
        _TIMES[name][1] = time.monotonic()
        _DONE[name].set()


def result(name: str) -> Any:
    """The job's result: waits for it, or runs it here if it was never started (e.g. a module collected later)."""
    with _LOCK:
        started = name in _DONE
        if not started:
            _DONE[name] = threading.Event()
    if not started:
        _run(name)
    waited = time.monotonic()
    _DONE[name].wait()
    if name in _TIMES and started:
        _TIMES[name][2] += time.monotonic() - waited
    ok, value = _RESULT[name]
    if not ok:
        raise value
    return value


def timings() -> list[str]:
    """One line per job run so far: when it started and ended (seconds since import) and how long tests waited."""
    return [f"{name}: {end - start:6.1f} s (from {start - _T0:6.1f} to {end - _T0:6.1f} s; tests waited {wait:5.1f} s)"
            for name, (start, end, wait) in _TIMES.items()]
