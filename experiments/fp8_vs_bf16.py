"""FP8 vs BF16 training over widths (paper §3.3 and Appendix B.1 / Fig. 10: FP8 stays within 0.25% of BF16 at
scale; reference §5.3): does the relative loss gap shrink as the model gets wider? A width ladder around `tiny`
towards `small` (every matrix dimension of `tiny` scaled with the hidden size d; depth, heads and experts kept),
each width trained with --precision bf16 and fp8, and fp32 as the noise floor (how far two precisions that are
both "exact enough" drift apart along the same run), on the same data, seed and schedule.

    python experiments/fp8_vs_bf16.py --out runs/fp8_vs_bf16                # default: ~12 min at load ~4, 2 cores
    python experiments/fp8_vs_bf16.py --out /tmp/fp8 --quick                # ~40 s (CI; no fp32 arms)
    python experiments/fp8_vs_bf16.py --out runs/fp8 --widths 64 128 256 512 --no-fp32
    python experiments/fp8_vs_bf16.py --out runs/all --merge runs/d64_s0 runs/d128_s0 ...  # report parallel runs

Arms are named PRECISION_dWIDTH (bf16_d128, fp8_d128, fp32_d128). Metrics per arm (mean ± std over seeds):
final_loss (training cross-entropy of the main model, mean of the last `smooth` steps, 10 by default), rel_gap_vs_bf16
((fp8 - bf16) / bf16 of the final losses, the same seed; fp8 arms) and rel_gap_vs_fp32 ((arm - fp32) / fp32;
bf16 and fp8 arms), train_seconds. results.json also has "widths": per width the parameter count and the two
relative gaps over seeds (mean, std, min, max). Writes rel_gap.png (the gap against width, and the smoothed gap
along the run). On the CPU the FP8 GEMMs are simulated (quantize, dequantize, FP32 GEMM), so FP8 steps are slower,
not faster (about 10x a bf16 step at d=64): the default ladder is d = 32, 64, 128, 256 at 60 steps (the issue's
setting: 60 tiny steps at 8 x 64; d = 32-128 took 7 min 15 s and d = 256 4 min 50 s at load ~4);
`--widths 256 512` reaches `small`'s width (d=512).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from dsv3_jax.config import apply_overrides, get_preset
from dsv3_jax.stats import model_stats
from dsv3_jax.train.inputs import default_corpus_files
from dsv3_jax.train.loop import RunArgs
from experiments.harness import (arm_seconds, check_seeds, merge_runs, new_out_dir, parser, pyplot, run_arm,
                                 train_curve, write_results)

PRESET = "tiny"
BASE_WIDTH = 64  # tiny's hidden size
SIZES = {
    "default": dict(widths=[32, 64, 128, 256], steps=60, batch=8, seq_len=64, corpus_bytes=2_000_000, smooth=10,
                    seeds=[0, 1, 2]),
    "quick": dict(widths=[16, 32], steps=10, batch=4, seq_len=32, corpus_bytes=400_000, smooth=4, seeds=[0],
                  mtp_depth=0),  # quick: no MTP module (less to compile; the default keeps tiny's)
}


def width_overrides(d: int) -> list[str]:
    """ModelConfig --set items of the width-d rung: tiny (d=64) with every matrix dimension scaled by d/64."""
    if not isinstance(d, int) or d < 16 or d % 16:
        raise ValueError(f"width {d!r}: must be a positive multiple of 16 (the rope head dimension is d/8, even)")
    return [f"hidden_size={d}", f"intermediate_size={2 * d}", f"moe_intermediate_size={d // 2}",
            f"q_lora_rank={d // 2}", f"kv_lora_rank={d // 2}", f"qk_nope_head_dim={d // 4}",
            f"qk_rope_head_dim={d // 8}", f"v_head_dim={d // 4}"]


def arm_name(precision: str, d: int) -> str:
    """The arm of one precision and width, e.g. fp8_d128."""
    return f"{precision}_d{d}"


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` steps (shorter at the start)."""
    c = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def relative_gaps(final: dict[str, dict[int, float]], widths: list[int], precisions: list[str]
                  ) -> dict[str, dict[int, dict[str, float]]]:
    """{arm: {seed: {rel_gap_vs_bf16, rel_gap_vs_fp32}}} for the bf16/fp8 arms from the final losses, paired by
    seed: (arm - bf16) / bf16 for fp8, (arm - fp32) / fp32 for bf16 and fp8 when fp32 was trained."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for d in widths:
        for p, refs in (("fp8", ("bf16", "fp32")), ("bf16", ("fp32",))):
            name = arm_name(p, d)
            for seed, loss in final.get(name, {}).items():
                for ref in refs:
                    if ref in precisions:
                        ref_loss = final[arm_name(ref, d)][seed]
                        gap = (loss - ref_loss) / ref_loss
                        out.setdefault(name, {}).setdefault(seed, {})[f"rel_gap_vs_{ref}"] = gap
    return out


def _spread(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def width_summary(per_seed: dict[str, dict[int, dict]], widths: list[int], precisions: list[str]) -> dict:
    """Per width: parameters and the fp8-vs-bf16 (and bf16-vs-fp32 noise floor) relative gaps over seeds."""
    out = {}
    for d in widths:
        cfg = apply_overrides(get_preset(PRESET), width_overrides(d))
        row = {"hidden_size": d, "params": model_stats(cfg).total_params,
               "fp8_vs_bf16": _spread([r["rel_gap_vs_bf16"] for r in per_seed[arm_name("fp8", d)].values()])}
        if "fp32" in precisions:
            row["bf16_vs_fp32"] = _spread([r["rel_gap_vs_fp32"] for r in per_seed[arm_name("bf16", d)].values()])
            row["fp8_vs_fp32"] = _spread([r["rel_gap_vs_fp32"] for r in per_seed[arm_name("fp8", d)].values()])
        out[str(d)] = row
    return out


def width_table(summary: dict) -> str:
    """Markdown: per width, the relative gaps in percent (mean ± std [min, max] over seeds)."""
    def pct(s):
        return f"{100 * s['mean']:+.2f}% ± {100 * s['std']:.2f} [{100 * s['min']:+.2f}, {100 * s['max']:+.2f}]"

    lines = ["| width d | params | (fp8 - bf16) / bf16 | (bf16 - fp32) / fp32 (noise floor) |", "|---|---|---|---|"]
    for d, row in summary.items():
        floor = pct(row["bf16_vs_fp32"]) if "bf16_vs_fp32" in row else "-"
        lines.append(f"| {d} | {row['params']:,} | {pct(row['fp8_vs_bf16'])} | {floor} |")
    return "\n".join(lines) + "\n"


def plot(path, summary: dict, curves: dict[str, dict[int, np.ndarray]], widths: list[int], smooth: int) -> None:
    """Left: the final relative gap against width (mean ± std over seeds), with the bf16-vs-fp32 floor; right:
    the smoothed (fp8 - bf16) / bf16 along the run per width, mean over seeds."""
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    ws = np.array(widths, np.float64)
    for key, label, color in (("fp8_vs_bf16", "(fp8 - bf16) / bf16", "C3"),
                              ("bf16_vs_fp32", "(bf16 - fp32) / fp32 (noise floor)", "C0")):
        if key not in summary[str(widths[0])]:
            continue
        mean = np.array([summary[str(d)][key]["mean"] for d in widths]) * 100
        std = np.array([summary[str(d)][key]["std"] for d in widths]) * 100
        ax0.errorbar(ws, mean, yerr=std, color=color, marker="o", capsize=4, label=label)
    for y in (-0.25, 0.25):
        ax0.axhline(y, color="k", ls="--", lw=0.8)
    ax0.axhline(0, color="k", lw=0.5)
    ax0.set_xscale("log", base=2)
    ax0.set_xticks(ws, [str(d) for d in widths])
    ax0.set_xlabel("width (hidden size)")
    ax0.set_ylabel("relative loss gap at the end [%]")
    ax0.legend(fontsize=8)
    ax0.set_title("final gap vs width (dashed: paper's 0.25%)")
    for i, d in enumerate(widths):
        fp8, bf16 = curves[arm_name("fp8", d)], curves[arm_name("bf16", d)]
        rel = [(moving_average(fp8[s], smooth) - moving_average(bf16[s], smooth)) / moving_average(bf16[s], smooth)
               for s in fp8]
        ax1.plot(np.arange(1, len(rel[0]) + 1), 100 * np.mean(rel, axis=0), color=f"C{i}", label=f"d={d}")
    for y in (-0.25, 0.25):
        ax1.axhline(y, color="k", ls="--", lw=0.8)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"(fp8 - bf16) / bf16, {smooth}-step moving average [%]")
    ax1.legend(fontsize=8)
    ax1.set_title("along the run (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out, workdirs: dict[str, dict[int, pathlib.Path]], settings: dict) -> dict:
    """Metrics of the trained arms' work directories, the gaps per width, rel_gap.png, results.json/.md in `out`."""
    widths, precisions, smooth = settings["widths"], settings["precisions"], settings["smooth"]
    missing = [arm_name(p, d) for d in widths for p in precisions if arm_name(p, d) not in workdirs]
    if missing:
        raise ValueError(f"arms {missing} were not trained")
    per_seed: dict[str, dict[int, dict]] = {}
    curves: dict[str, dict[int, np.ndarray]] = {}
    for d in widths:
        for p in precisions:
            name = arm_name(p, d)
            for seed, workdir in sorted(workdirs[name].items()):
                ce = train_curve(workdir, "ce")
                curves.setdefault(name, {})[seed] = ce
                per_seed.setdefault(name, {})[seed] = {"final_loss": float(ce[-smooth:].mean()),
                                                       "train_seconds": arm_seconds(workdir)}
    final = {name: {s: row["final_loss"] for s, row in rows.items()} for name, rows in per_seed.items()}
    for name, rows in relative_gaps(final, widths, precisions).items():
        for seed, gaps in rows.items():
            per_seed[name][seed].update(gaps)

    summary = width_summary(per_seed, widths, precisions)
    plot(out / "rel_gap.png", summary, curves, widths, smooth)
    notes = (f"Widths: `{PRESET}` (d=64) with every matrix dimension scaled by d/64 (3 layers, 4 heads, 8 routed "
             f"experts kept); {settings['steps']} steps x {settings['batch']} x {settings['seq_len']} tokens "
             f"({settings['train_tokens']:,}) per arm. final_loss: mean training CE of the last {smooth} steps; "
             "gaps paired by seed.\n\nRelative gap at the end per width (mean ± std [min, max] over seeds; paper: "
             "below 0.25% at scale):\n\n" + width_table(summary))
    results = write_results(out, per_seed, settings,
                            ["final_loss", "rel_gap_vs_bf16", "rel_gap_vs_fp32", "train_seconds"],
                            "FP8 vs BF16 over widths (paper Fig. 10)", notes, extra={"widths": summary}, fmt=_cell)
    print(width_table(summary))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="hidden sizes of the ladder (multiples of 16; 64 is tiny); default per size")
    ap.add_argument("--fp32", action=argparse.BooleanOptionalAction, default=None,
                    help="also train an fp32 arm per width, the noise floor (default: on, off with --quick)")
    ap.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                    help="train nothing: report the arms of earlier --out directories of this script (e.g. one "
                         "per width and seed, run in parallel) together into --out")
    args = ap.parse_args(argv)
    if args.merge:
        workdirs, settings = merge_runs(args.merge, vary=("seeds", "widths", "set"))
        settings["set"] = {str(d): width_overrides(d) for d in settings["widths"]}
        report(new_out_dir(args.out), workdirs, settings)
        return 0
    size = SIZES["quick" if args.quick else "default"]
    seeds = check_seeds(args.seeds if args.seeds is not None else size["seeds"])
    widths = list(args.widths if args.widths is not None else size["widths"])
    if len(set(widths)) != len(widths):
        raise SystemExit(f"--widths must be distinct, got {widths}")
    try:
        overrides = {d: width_overrides(d) for d in sorted(widths)}
    except ValueError as e:
        raise SystemExit(f"--widths: {e}") from None
    widths = sorted(widths)
    fp32 = not args.quick if args.fp32 is None else args.fp32
    precisions = (["fp32"] if fp32 else []) + ["bf16", "fp8"]
    out = new_out_dir(args.out)

    data = [str(p) for p in default_corpus_files(size["corpus_bytes"])]
    base = RunArgs(workdir="", steps=size["steps"], preset=PRESET, batch=size["batch"], seq_len=size["seq_len"],
                   data=data, eval_fraction=0.0, save_every=size["steps"], keep=1, mtp_depth=size.get("mtp_depth"))
    workdirs: dict[str, dict[int, pathlib.Path]] = {}
    first = None
    for d in widths:
        for seed in seeds:
            for p in precisions:
                name = arm_name(p, d)
                workdir = run_arm(base, out / f"{name}_s{seed}", reuse_cache=first, seed=seed, precision=p,
                                  set=overrides[d])
                workdirs.setdefault(name, {})[seed] = workdir
                first = first or workdir
                print(f"d={d} seed {seed} {p}: final training CE {train_curve(workdir)[-1]:.4f}", flush=True)
    settings = {**{k: v for k, v in size.items() if k not in ("widths", "seeds")}, "widths": widths,
                "seeds": seeds, "preset": PRESET, "precisions": precisions, "quick": args.quick,
                "train_tokens": size["steps"] * size["batch"] * size["seq_len"],
                "set": {str(d): o for d, o in overrides.items()}}
    report(out, workdirs, settings)
    return 0


def _cell(key: str, value: float) -> str:
    """A results.md cell: gaps in percent, seconds to 0.1 s, losses to 4 decimals."""
    if key.startswith("rel_gap"):
        return f"{100 * value:.2f}%"
    return f"{value:.1f}" if key.endswith("seconds") else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
