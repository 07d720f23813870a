"""MTP vs no MTP at the same main model (paper §2.2 and §4.5.1, Table 4): the `tiny` main model trained with one
multi-token-prediction module (arm `mtp`, the paper's 0.3 -> 0.1 weight schedule or a constant --mtp-weight) and
without (arm `no_mtp`, mtp_depth=0) on the same data, seed and token budget; the MTP module is discarded at
evaluation, so `val_loss` is the main model's held-out next-token cross-entropy (what --eval-every logs).

    python experiments/mtp_vs_no_mtp.py --out runs/mtp_vs_no_mtp           # default: ~10 min on 2 quiet cores (est.)
    python experiments/mtp_vs_no_mtp.py --out /tmp/mtp --quick             # ~30 s (CI)
    python experiments/mtp_vs_no_mtp.py --out runs/mtp2 --depth2           # adds arm `mtp_d2` (depth 2)
    python experiments/mtp_vs_no_mtp.py --out runs/all --merge runs/s0 runs/s1 # report runs made per seed

Metrics per arm (mean ± std over seeds): val_loss (held-out main-model CE at the last step), train_ce (main-model
training CE, mean of the last --smooth steps), delta_val_loss (val_loss minus the same seed's no_mtp val_loss,
the paired difference; the paper's Table 4 gains are 0.01-0.1 in Pile loss at 16B-229B), params_main and
params_total (without and with the MTP modules, dsv3_jax.stats.model_stats) and train_seconds.
Writes into --out one work directory per arm and seed, results.json, results.md and val_loss.png.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from dsv3_jax.config import get_preset
from dsv3_jax.stats import model_stats
from dsv3_jax.train.inputs import default_corpus_files
from dsv3_jax.train.loop import RunArgs
from experiments.harness import (arm_seconds, check_seeds, final_eval, merge_runs, new_out_dir, parser, pyplot,
                                 read_evals, run_arm, train_curve, write_results)

PRESET = "tiny"
SIZES = {
    "default": dict(steps=400, batch=16, seq_len=128, corpus_bytes=3_000_000, eval_every=50, eval_batches=8,
                    smooth=50, seeds=[0, 1, 2]),
    "quick": dict(steps=12, batch=4, seq_len=32, corpus_bytes=900_000, eval_every=6, eval_batches=2,
                  smooth=4, seeds=[0]),
}
EVAL_FRACTION = 0.1  # whole stdlib files go to the held-out split (train/data.py is_heldout); the same for every arm


def arm_depths(depth2: bool) -> dict[str, int]:
    """{arm name: MTP depth}: no_mtp (0) and mtp (1), plus mtp_d2 (2) with --depth2."""
    return {"no_mtp": 0, "mtp": 1, **({"mtp_d2": 2} if depth2 else {})}


def arm_metrics(workdir, depth: int, smooth: int) -> dict[str, float]:
    """One trained arm's metrics: held-out main-model CE, smoothed training CE, parameter counts, seconds."""
    stats = model_stats(get_preset(PRESET).replace(num_mtp_layers=depth))
    ce = train_curve(workdir, "ce")
    return {"val_loss": float(final_eval(workdir)["ce"]), "train_ce": float(ce[-smooth:].mean()),
            "params_main": stats.total_params, "params_total": stats.total_params + stats.mtp_params,
            "train_seconds": arm_seconds(workdir)}


def _cell(key: str, value: float) -> str:
    """A results.md cell: parameter counts as integers, seconds to 0.1 s, losses to 4 decimals."""
    if key.startswith("params"):
        return f"{value:,.0f}"
    return f"{value:.1f}" if key.endswith("seconds") else f"{value:.4f}"


def plot(path, curves: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]) -> None:
    """Held-out main-model CE over steps: one thin line per seed, a thick line for the mean over seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, per_seed) in enumerate(curves.items()):
        color = f"C{i}"
        for steps, ce in per_seed.values():
            ax.plot(steps, ce, color=color, lw=0.6, alpha=0.4)
        steps = next(iter(per_seed.values()))[0]
        ax.plot(steps, np.mean([ce for _, ce in per_seed.values()], axis=0), color=color, lw=2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy (main model, MTP discarded)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("MTP vs no MTP (paper Table 4)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out, workdirs: dict[str, dict[int, pathlib.Path]], settings: dict) -> dict:
    """Metrics of the trained arms' work directories, the plot, results.json and results.md in `out`."""
    if "no_mtp" not in workdirs:
        raise ValueError("no no_mtp arm to compare against")
    workdirs = dict(sorted(workdirs.items(), key=lambda item: settings["depths"][item[0]]))  # no_mtp first
    per_seed: dict[str, dict[int, dict]] = {name: {} for name in workdirs}
    curves: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {name: {} for name in workdirs}
    for name, runs in workdirs.items():
        for seed, workdir in sorted(runs.items()):
            per_seed[name][seed] = arm_metrics(workdir, settings["depths"][name], settings["smooth"])
            rows = read_evals(workdir)
            curves[name][seed] = (np.array([r["step"] for r in rows]),
                                  np.array([r["sets"]["heldout"]["ce"] for r in rows]))
            if name != "no_mtp":
                per_seed[name][seed]["delta_val_loss"] = (per_seed[name][seed]["val_loss"]
                                                          - final_eval(workdirs["no_mtp"][seed])["ce"])
    plot(out / "val_loss.png", curves)
    weight = settings["mtp_weight"]
    notes = (f"`{PRESET}` main model, {settings['steps']} steps x {settings['batch']} x {settings['seq_len']} tokens "
             f"({settings['train_tokens']:,} training tokens) per arm; MTP weight {weight}. val_loss: main-model "
             f"held-out CE ({settings['eval_batches']} x {settings['batch']} windows of whole held-out stdlib "
             "files), MTP discarded; delta_val_loss: paired against no_mtp of the same seed (negative: MTP helps). "
             f"train_ce: mean main-model training CE of the last {settings['smooth']} steps.")
    return write_results(out, per_seed, settings,
                         ["val_loss", "delta_val_loss", "train_ce", "params_main", "params_total", "train_seconds"],
                         "MTP vs no MTP (paper Table 4)", notes, fmt=_cell)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--mtp-weight", type=float, default=None,
                    help="constant MTP loss weight of the MTP arms (default the paper's 0.3 -> 0.1 schedule)")
    ap.add_argument("--depth2", action="store_true", help="also train an arm with MTP depth 2 (mtp_d2)")
    ap.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                    help="train nothing: report the arms of earlier --out directories of this script (e.g. one "
                         "per seed, run in parallel) together into --out")
    args = ap.parse_args(argv)
    if args.mtp_weight is not None and not args.mtp_weight > 0:
        raise SystemExit(f"--mtp-weight must be > 0 (0 is the no_mtp arm), got {args.mtp_weight}")
    if args.merge:
        workdirs, settings = merge_runs(args.merge)
        report(new_out_dir(args.out), workdirs, settings)
        return 0
    size = SIZES["quick" if args.quick else "default"]
    seeds = check_seeds(args.seeds if args.seeds is not None else size["seeds"])
    out = new_out_dir(args.out)

    data = [str(p) for p in default_corpus_files(size["corpus_bytes"])]
    base = RunArgs(workdir="", steps=size["steps"], preset=PRESET, batch=size["batch"], seq_len=size["seq_len"],
                   data=data, eval_every=size["eval_every"], eval_batches=size["eval_batches"],
                   eval_fraction=EVAL_FRACTION, save_every=size["steps"], keep=1)
    depths = arm_depths(args.depth2)
    workdirs: dict[str, dict[int, pathlib.Path]] = {name: {} for name in depths}
    first = None
    for seed in seeds:
        for name, depth in depths.items():
            workdirs[name][seed] = run_arm(base, out / f"{name}_s{seed}", reuse_cache=first, seed=seed,
                                           mtp_depth=depth, mtp_weight=args.mtp_weight if depth else None)
            first = first or workdirs[name][seed]
            print(f"seed {seed} {name}: val_loss {final_eval(workdirs[name][seed])['ce']:.4f}", flush=True)
    settings = {**size, "preset": PRESET, "seeds": seeds, "quick": args.quick, "eval_fraction": EVAL_FRACTION,
                "mtp_weight": ("the 0.3 -> 0.1 schedule" if args.mtp_weight is None
                               else f"constant {args.mtp_weight:g}"),
                "depths": depths, "train_tokens": size["steps"] * size["batch"] * size["seq_len"]}
    report(out, workdirs, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
