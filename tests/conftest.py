"""Test-session setup: a per-session persistent XLA compilation cache, so identical programs compiled by several
tests (e.g. the train step of a run and of its resumed continuation) are compiled once."""

import tempfile

import jax

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="dsv3-jax-xla-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
