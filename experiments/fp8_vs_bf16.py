"""FP8 vs BF16 training: the same preset, data, seed and schedule trained twice with `dsv3_jax.train.loop.train`,
once with `--precision bf16` and once with `--precision fp8`; prints the relative loss difference along the run
(paper Appendix B.1 / Fig. 10: below 0.25% for FP8 against BF16; reference §5.3).

    python experiments/fp8_vs_bf16.py [--preset small] [--steps N] [--out DIR] [--every K]

Writes DIR/bf16 and DIR/fp8 (ordinary training work directories), DIR/fp8_vs_bf16.json (per-step losses, relative
differences and the summary) and DIR/fp8_vs_bf16.png. The relative difference is (fp8 - bf16) / bf16 of the
next-token cross-entropy; "smoothed" compares the two losses after a moving average over --smooth steps.
On the CPU the FP8 GEMMs are simulated (quantize, dequantize, FP32 GEMM), so FP8 steps are slower, not faster.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from dsv3_jax.train.loop import RunArgs, train
from dsv3_jax.train.plot import read_metrics

PRECISIONS = ("bf16", "fp8")


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` steps (shorter at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def compare(losses: dict[str, np.ndarray], smooth: int, tail: float) -> dict:
    """Relative differences of the fp8 loss curve against bf16, raw and smoothed, with a summary of the last part."""
    bf16, fp8 = losses["bf16"], losses["fp8"]
    rel = (fp8 - bf16) / bf16
    rel_smooth = (_moving_average(fp8, smooth) - _moving_average(bf16, smooth)) / _moving_average(bf16, smooth)
    start = int(len(rel) * (1 - tail))
    return {
        "rel": rel.tolist(),
        "rel_smoothed": rel_smooth.tolist(),
        "summary": {
            "steps": len(rel),
            "tail_from_step": start + 1,
            "mean_rel_tail": float(np.mean(rel[start:])),
            "mean_abs_rel_tail": float(np.mean(np.abs(rel[start:]))),
            "max_abs_rel_smoothed_tail": float(np.max(np.abs(rel_smooth[start:]))),
            "final_rel_smoothed": float(rel_smooth[-1]),
            "max_abs_rel": float(np.max(np.abs(rel))),
            "final_loss_bf16_smoothed": float(_moving_average(bf16, smooth)[-1]),
            "final_loss_fp8_smoothed": float(_moving_average(fp8, smooth)[-1]),
        },
    }


def plot(path: pathlib.Path, losses: dict[str, np.ndarray], result: dict, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(losses["bf16"]) + 1)
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name in PRECISIONS:
        ax0.plot(steps, losses[name], label=name, lw=1)
    ax0.set_ylabel("cross-entropy")
    ax0.set_yscale("log")
    ax0.legend()
    ax1.plot(steps, 100 * np.asarray(result["rel"]), lw=0.6, alpha=0.5, label="per step")
    ax1.plot(steps, 100 * np.asarray(result["rel_smoothed"]), lw=1.5, label=f"moving average ({smooth} steps)")
    for y in (-0.25, 0.25):
        ax1.axhline(y, color="k", ls="--", lw=0.8)
    ax1.set_ylabel("(fp8 - bf16) / bf16  [%]")
    ax1.set_xlabel("step")
    ax1.legend()
    fig.suptitle("FP8 vs BF16 training loss (paper Fig. 10: within 0.25%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, help="peak learning rate (loop default for the preset if omitted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    p.add_argument("--out", default="runs/fp8_vs_bf16")
    p.add_argument("--every", type=int, default=10, help="print the comparison every K steps")
    p.add_argument("--smooth", type=int, default=20, help="moving-average window for the smoothed difference")
    p.add_argument("--tail", type=float, default=0.25, help="fraction of the run at the end that is summarised")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "every", "smooth"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.tail <= 1:
        raise ValueError(f"--tail must be in (0, 1], got {args.tail}")

    out = pathlib.Path(args.out)
    losses, seconds = {}, {}
    for precision in PRECISIONS:
        t0 = time.perf_counter()
        train(RunArgs(workdir=str(out / precision), steps=args.steps, preset=args.preset, batch=args.batch,
                      seq_len=args.seq_len, seed=args.seed, corpus_bytes=args.corpus_bytes, precision=precision,
                      lr=args.lr, save_every=args.steps, keep=1, sample_tokens=0, progress=False))
        seconds[precision] = time.perf_counter() - t0
        rows = read_metrics(out / precision)
        losses[precision] = np.array([r["ce"] for r in rows], np.float64)
        step_times = [r["step_time"] for r in rows[1:]]
        print(f"{precision}: {args.steps} steps in {seconds[precision]:.0f} s "
              f"(median step {np.median(step_times):.2f} s)", flush=True)

    result = compare(losses, args.smooth, args.tail)
    print(f"\n{'step':>6} {'bf16 ce':>9} {'fp8 ce':>9} {'rel %':>8} {'smoothed %':>11}")
    for i in range(args.every - 1, args.steps, args.every):
        print(f"{i + 1:>6} {losses['bf16'][i]:>9.4f} {losses['fp8'][i]:>9.4f} {100 * result['rel'][i]:>8.3f} "
              f"{100 * result['rel_smoothed'][i]:>11.3f}")
    s = result["summary"]
    print(f"\nlast {args.tail:.0%} of the run (steps {s['tail_from_step']}-{s['steps']}): mean relative difference "
          f"{100 * s['mean_rel_tail']:+.3f}%, mean |rel| {100 * s['mean_abs_rel_tail']:.3f}%, max |smoothed rel| "
          f"{100 * s['max_abs_rel_smoothed_tail']:.3f}%; final smoothed {100 * s['final_rel_smoothed']:+.3f}% "
          f"(paper: below 0.25%)")

    report = {"args": vars(args), "seconds": seconds, "ce": {k: v.tolist() for k, v in losses.items()}, **result}
    (out / "fp8_vs_bf16.json").write_text(json.dumps(report, indent=1))
    plot(out / "fp8_vs_bf16.png", losses, result, args.smooth)
    print(f"wrote {out / 'fp8_vs_bf16.json'} and {out / 'fp8_vs_bf16.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
