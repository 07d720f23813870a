"""One training step of a preset on the GPU (issue 12 item 4): tokens/s and MFU in bf16 and in FP8, at the issue's
8 x 256 batch and at a larger one that fills the chip.

MFU is the model's training FLOPs per token (dsv3_jax.train.flops.training_flops_per_token, MTP included) times
tokens/s over the GPU's dense bf16 peak: the nominal figure for the device (--peak-tflops, default 989 for an
H100/H200 SXM) and, beside it, the bf16 matmul rate measured in the same run (an 8192^3 jnp.dot). FP8 steps are
set against the same bf16 peak, as the paper's MFU is.

    python benchmarks/gpu_train_step.py [--json] [--preset small] [--shapes 8x256 32x1024] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import PRESETS
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.precision import Precision
from dsv3_jax.train.flops import measure_peak_flops, training_flops_per_token
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.train.step import StepConfig, init_state, make_train_step, split_model
from protocol import pair_arg  # beside this file


def bench(cfg, precision: str, batch: int, seq: int, steps: int) -> dict:
    """Median step time (after compile and one warm-up step) of the full train step (MTP, AdamW, bias update)."""
    model = Transformer(cfg, nnx.Rngs(0), Precision.named(precision))
    graphdef, params, bias = split_model(model)
    opt = make_optimizer(params, 1e-3, 1000)
    step = make_train_step(graphdef, opt, StepConfig())
    state = init_state(params, bias, opt)
    windows = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq + 1)), jnp.int32)
    t0 = time.perf_counter()
    state, m = step(state, windows, 0.3, 0.001)
    jax.block_until_ready(m.loss)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        state, m = step(state, windows, 0.3, 0.001)
        jax.block_until_ready(m.loss)
        times.append(time.perf_counter() - t)
    dt = float(np.median(times[1:]))
    return {"precision": precision, "batch": batch, "seq": seq, "step_s": dt, "tokens_per_s": batch * seq / dt,
            "compile_s": compile_s, "loss": float(m.loss),
            "flops_per_token": training_flops_per_token(cfg, seq)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--shapes", nargs="+", type=pair_arg("BATCHxSEQ", "8x256"), default=[(8, 256), (32, 1024)], metavar="BxT")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=["fp32", "bf16", "fp8"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's nominal dense bf16 peak")
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    device = jax.devices()[0].device_kind
    measured = measure_peak_flops(n=8192, dtype=jnp.bfloat16)
    print(f"{args.preset} preset on {device}: bf16 matmul measured {measured / 1e12:.0f} TFLOP/s, nominal "
          f"{args.peak_tflops:.0f}")
    rows = []
    for batch, seq in args.shapes:
        for precision in args.precisions:
            try:
                r = bench(cfg, precision, batch, seq, args.steps)
            except Exception as e:  # report and go on: one failing precision must not hide the others
                print(f"  {precision} {batch}x{seq}: FAILED {type(e).__name__}: {(str(e) or repr(e))[:300]}")
                rows.append({"precision": precision, "batch": batch, "seq": seq, "error": str(e)[:2000]})
                continue
            flops = r["tokens_per_s"] * r["flops_per_token"]
            r.update(tflops=flops / 1e12, mfu=flops / (args.peak_tflops * 1e12), mfu_measured_peak=flops / measured)
            rows.append(r)
            print(f"  {precision:4s} {batch:3d}x{seq:<5d} step {r['step_s'] * 1e3:8.2f} ms  {r['tokens_per_s']:10.0f} "
                  f"tokens/s  {r['tflops']:6.1f} TFLOP/s  MFU {r['mfu']:.1%} (of measured peak "
                  f"{r['mfu_measured_peak']:.1%})  compile {r['compile_s']:.0f} s  loss {r['loss']:.3f}", flush=True)
    if args.json:
        print(json.dumps({"device": device, "preset": args.preset, "measured_bf16_flops": measured,
                          "nominal_bf16_flops": args.peak_tflops * 1e12, "rows": rows}))


if __name__ == "__main__":
    main()
