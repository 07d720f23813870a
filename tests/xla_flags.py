"""XLA flags for the test programs, which are tiny and many, so that compiling them costs more than running them.

- `--xla_backend_optimization_level=0`: LLVM's optimisation passes (about a quarter of the suite's CPU time).
- `--xla_cpu_use_fusion_emitters=false`: XLA:CPU's MLIR fusion emitters compile much more slowly than its older
  elemental emitters (about a third less CPU time for compile-bound modules such as tests/model/test_transformer.py).

tests/conftest.py sets them for the test process, whose subprocesses inherit them; the multi-device scripts
(tests/sharding/*.py) add them to the environment they were given, before importing jax.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def with_fast_compile(*flags: str) -> str:
    """XLA_FLAGS of the environment plus `flags` and FAST_COMPILE (each flag once)."""
    words = os.environ.get("XLA_FLAGS", "").split() + [w for f in flags for w in f.split()] + FAST_COMPILE.split()
    return " ".join(dict.fromkeys(words))
