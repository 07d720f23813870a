"""`model(tokens)` compiled by default (dsv3_jax/model/compiled.py) against an explicitly `nnx.jit`-ed call, on a
`tiny` checkpoint loaded with `from_pretrained`, in the same run (issue 11: the second call at most 3x the time of
the `nnx.jit` call). Also the first call (compile included) and, with --eager, one op-by-op call under
`jax.disable_jit()`.

Protocol (benchmarks/protocol.py): the load average is checked first, the two calls are timed interleaved, each
--repeats times (a run: the median of --calls calls), and every figure is the median over the runs (min, max).

    python benchmarks/model_call.py [--json] [--batch B] [--seq-len T] [--calls N] [--repeats N] [--eager]
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
from protocol import add_repeats_arg, check_repeats, header, interleave, machine_state, summarize  # beside this file


def _seconds(fn, calls: int) -> float:
    """Median wall time of fn() (outputs ready) over ``calls`` calls."""
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--calls", type=int, default=20, help="timed calls per run (their median is the run's time)")
    ap.add_argument("--eager", action="store_true", help="also time one call under jax.disable_jit()")
    ap.add_argument("--json", action="store_true")
    add_repeats_arg(ap)
    args = ap.parse_args(argv)
    for name in ("batch", "seq_len", "calls"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check_repeats(args.repeats)
    state = machine_state()

    cfg = dsv3_jax.get_preset("tiny")
    with tempfile.TemporaryDirectory() as d:
        dsv3_jax.save_pretrained(dsv3_jax.Transformer(cfg, nnx.Rngs(0)), d)
        model = dsv3_jax.from_pretrained(d)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq_len), 0, cfg.vocab_size)

    t = time.perf_counter()
    jax.block_until_ready(model(tokens))
    first = time.perf_counter() - t
    jitted = nnx.jit(lambda m, x: m(x))
    jax.block_until_ready(jitted(model, tokens))
    runs = interleave({"default": lambda: _seconds(lambda: model(tokens), args.calls),
                       "nnx_jit": lambda: _seconds(lambda: jitted(model, tokens), args.calls)}, args.repeats)
    s = summarize([{"model_call_s": a, "nnx_jit_call_s": b, "ratio": a / b}
                   for a, b in zip(runs["default"], runs["nnx_jit"])])
    eager = None
    if args.eager:
        with jax.disable_jit():
            eager = _seconds(lambda: model(tokens), 1)
    print(f"tiny from_pretrained, tokens {args.batch}x{args.seq_len}; {header(state, args.repeats)}")
    print(f"  model(tokens) first call {first:.2f} s, then {1e3 * s['model_call_s']:.2f} ms "
          f"[{1e3 * s['model_call_s_min']:.2f}-{1e3 * s['model_call_s_max']:.2f}]; nnx.jit call "
          f"{1e3 * s['nnx_jit_call_s']:.2f} ms [{1e3 * s['nnx_jit_call_s_min']:.2f}-"
          f"{1e3 * s['nnx_jit_call_s_max']:.2f}]; ratio {s['ratio']:.2f} [{s['ratio_min']:.2f}-{s['ratio_max']:.2f}]"
          " (target <= 3)" + ("" if eager is None else f"; eager (jax.disable_jit) {eager:.2f} s"))
    if args.json:
        print(json.dumps({"first_call_s": first, **s, "eager_call_s": eager, "batch": args.batch,
                          "seq_len": args.seq_len, "calls": args.calls, "repeats": args.repeats, **state}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
