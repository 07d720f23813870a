"""Test-session setup: fast XLA compiles, and a per-session persistent XLA compilation cache, so identical programs
compiled by several tests (e.g. the train step of a run and of its resumed continuation) are compiled once."""

import os
import tempfile

from tests.xla_flags import with_fast_compile

# Test programs are tiny and many: cheaper code generation (tests/xla_flags.py). Subprocesses started by tests
# inherit it through the environment.
os.environ["XLA_FLAGS"] = with_fast_compile()

import jax  # noqa: E402

# Eight simulated CPU devices in the test process, so that multi-device checks (meshes of up to 8) run in-process;
# arrays and single-device programs stay on device 0, and a run without --mesh uses one device (DSV3_DEVICES,
# sharding.mesh.default_devices). Subprocesses inherit DSV3_DEVICES but not the device count.
jax.config.update("jax_num_cpu_devices", 8)
os.environ.setdefault("DSV3_DEVICES", "1")
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="dsv3-jax-xla-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402

from tests import background  # noqa: E402


def pytest_collection_modifyitems(session, config, items):
    """The tests that read a background job's result run last, so that their jobs have the rest of the session to
    finish in (tests/background.py)."""
    waiting = background.modules_with_jobs()
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "__name__", None) in waiting)  # stable


def pytest_collection_finish(session):
    """Start the collected modules' background subprocess checks (tests/background.py)."""
    if session.config.option.collectonly:
        return
    modules = list(dict.fromkeys(item.module.__name__ for item in session.items if getattr(item, "module", None)))
    background.start(modules, session.config._tmp_path_factory.mktemp("background"))


def pytest_sessionfinish(session):
    background.stop()  # no job starts after the session (one still running finishes on its own)


def pytest_terminal_summary(terminalreporter):
    """How long each background job took and how long the tests waited for it: where the suite's time goes."""
    lines = background.timings()
    if lines:
        terminalreporter.section("background jobs")
        for line in lines:
            terminalreporter.write_line(line)


SHARED_RUN = dict(steps=20, batch=4, seq_len=32, corpus_bytes=200_000)  # the notebooks' quick size (DSV3_NB_QUICK)


@pytest.fixture(scope="session")
def shared_tiny_run(tmp_path_factory):
    """Work directory of one short `tiny` pretraining run (20 steps, batch 4 x 32 tokens), trained once per session
    and shared by the notebooks and the experiments' quick tests. Read it; do not resume or modify it."""
    from dsv3_jax.train.loop import RunArgs, train

    workdir = tmp_path_factory.mktemp("shared-tiny-run") / "run"
    train(RunArgs(workdir=str(workdir), preset="tiny", save_every=SHARED_RUN["steps"], sample_tokens=0,
                  progress=False, **SHARED_RUN))
    return workdir
