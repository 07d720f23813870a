"""`model(tokens)` compiled by default (dsv3_jax/model/compiled.py) against an explicitly `nnx.jit`-ed call, on a
`tiny` checkpoint loaded with `from_pretrained`, in the same run (issue 11: the second call at most 3x the time of
the `nnx.jit` call). Also the first call (compile included) and, with --eager, one op-by-op call under
`jax.disable_jit()`.

    python benchmarks/model_call.py [--json] [--batch B] [--seq-len T] [--repeats N] [--eager]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np
from flax import nnx

import dsv3_jax


def _seconds(fn, repeats: int) -> float:
    """Median wall time of fn() (outputs ready) over `repeats` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="also time one call under jax.disable_jit()")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for name in ("batch", "seq_len", "repeats"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    cfg = dsv3_jax.get_preset("tiny")
    with tempfile.TemporaryDirectory() as d:
        dsv3_jax.save_pretrained(dsv3_jax.Transformer(cfg, nnx.Rngs(0)), d)
        model = dsv3_jax.from_pretrained(d)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq_len), 0, cfg.vocab_size)

    t = time.perf_counter()
    jax.block_until_ready(model(tokens))
    first = time.perf_counter() - t
    default = _seconds(lambda: model(tokens), args.repeats)
    jitted = nnx.jit(lambda m, x: m(x))
    jax.block_until_ready(jitted(model, tokens))
    explicit = _seconds(lambda: jitted(model, tokens), args.repeats)
    eager = None
    if args.eager:
        with jax.disable_jit():
            eager = _seconds(lambda: model(tokens), 1)
    ratio = default / explicit
    print(f"tiny from_pretrained, tokens {args.batch}x{args.seq_len}: model(tokens) first call {first:.2f} s, "
          f"then {1e3 * default:.2f} ms; nnx.jit call {1e3 * explicit:.2f} ms; ratio {ratio:.2f} (target <= 3)"
          + ("" if eager is None else f"; eager (jax.disable_jit) {eager:.2f} s"))
    if args.json:
        print(json.dumps({"first_call_s": first, "model_call_s": default, "nnx_jit_call_s": explicit,
                          "ratio": ratio, "eager_call_s": eager, "batch": args.batch, "seq_len": args.seq_len}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
