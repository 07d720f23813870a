"""Test-session setup: fast XLA compiles, and a per-session persistent XLA compilation cache, so identical programs
compiled by several tests (e.g. the train step of a run and of its resumed continuation) are compiled once."""

import os
import tempfile

# Test programs are tiny and many: XLA's LLVM optimisation passes cost more than they save (about a quarter of the
# suite's CPU time). Subprocesses started by tests inherit it through the environment.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="dsv3-jax-xla-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
