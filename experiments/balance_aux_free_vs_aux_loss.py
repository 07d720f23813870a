"""Auxiliary-loss-free vs auxiliary-loss load balancing (paper §2.1.2, §4.5.2, Table 5): the same MoE model, data,
seeds and token budget trained with the bias rule and no balance loss (arm `aux_free`: ``balance="aux-free"``,
alpha 0 as the paper's ablation removes all auxiliary losses) and with a conventional sequence-wise auxiliary loss
and no bias (arm `aux_loss`: ``balance="aux-loss"``, alpha ``--alpha``).

    python experiments/balance_aux_free_vs_aux_loss.py --out runs/balance_aux_free_vs_aux_loss   # ~7 min, 2 cores
    python experiments/balance_aux_free_vs_aux_loss.py --out /tmp/b --quick                        # ~30 s (CI)

Data: the two-domain corpus of experiments/domains.py (stdlib Python source + English prose from pydoc_data),
written into DIR/data, so that experiments/expert_specialisation.py --from DIR can evaluate these models on the
held-out code and prose. Metrics per arm (mean ± std over seeds): `val_loss` (main-model cross-entropy on the
held-out split at the end, MTP discarded), `max_vio_batch` (MaxVio of each evaluated micro-batch, averaged over
micro-batches and MoE layers, at the end), `max_vio_global` (MaxVio of the whole held-out set's counts),
`train_loss` (training cross-entropy averaged over the last tenth of the steps). Writes DIR/ARM/seedS (training
work directories), results.json, results.md and curves.png (held-out loss and MaxVio over steps per arm).
The default (tiny preset, 250 steps of 16 x 128 tokens, 3 seeds, 2 arms) takes about 7 minutes on a quiet
2-core machine.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from dsv3_jax.train.loop import DEFAULT_BALANCE_ALPHA, RunArgs
from experiments.domains import write_corpus
from experiments.harness import (arm_seconds, check_seeds, final_eval, new_out_dir, parser, pyplot, read_evals,
                                 run_arm, train_curve, write_results)

SIZES = {
    "default": dict(steps=250, batch=16, seq_len=128, code_bytes=800_000, code_eval_bytes=100_000, eval_every=25,
                    eval_batches=4, eval_fraction=0.1, seeds=[0, 1, 2]),
    "quick": dict(steps=12, batch=4, seq_len=32, code_bytes=120_000, code_eval_bytes=30_000, eval_every=6,
                  eval_batches=2, eval_fraction=0.1, seeds=[0]),
}
METRICS = ["val_loss", "max_vio_batch", "max_vio_global", "train_loss"]


def aux_free_arm(gamma: float | None) -> dict:
    """RunArgs overrides of the auxiliary-loss-free arm: bias rule (speed `gamma`, None: the paper's schedule), no
    balance loss."""
    return dict(balance="aux-free", balance_alpha=0.0) | ({} if gamma is None else dict(gamma=gamma))


def aux_free_vs_aux_loss_arms(alpha: float | None, gamma: float | None = None) -> dict[str, dict]:
    """The two arms' RunArgs overrides: aux_free (bias rule, no balance loss), aux_loss (sequence-wise loss, no
    bias)."""
    alpha = DEFAULT_BALANCE_ALPHA["aux-loss"] if alpha is None else alpha
    return {"aux_free": aux_free_arm(gamma), "aux_loss": dict(balance="aux-loss", balance_alpha=alpha)}


def base_args(size: dict, corpus: dict, preset: str) -> RunArgs:
    """The RunArgs every arm shares (workdir and seed are set per run)."""
    return RunArgs(workdir="", steps=size["steps"], preset=preset, batch=size["batch"], seq_len=size["seq_len"],
                   data=corpus["train"], eval_every=size["eval_every"], eval_batches=size["eval_batches"],
                   eval_fraction=size["eval_fraction"], save_every=size["steps"], keep=1)


def arm_metrics(workdir: pathlib.Path) -> dict[str, float]:
    """The final held-out metrics and training loss of one trained arm."""
    held = final_eval(workdir)
    ce = train_curve(workdir)
    return {"val_loss": held["ce"], "max_vio_batch": held["max_vio_batch"], "max_vio_global": held["max_vio_global"],
            "train_loss": float(ce[-max(1, len(ce) // 10):].mean()), "seconds": arm_seconds(workdir)}


def run_arms(out: pathlib.Path, arms: dict[str, dict], seeds: list[int], base: RunArgs) -> dict:
    """Train every arm (RunArgs overrides) for every seed into out/ARM/seedS; {arm: {seed: arm_metrics}}."""
    per_seed: dict[str, dict[int, dict]] = {name: {} for name in arms}
    for seed in seeds:
        for name, overrides in arms.items():
            workdir = run_arm(base, out / name / f"seed{seed}", seed=seed, **overrides)
            per_seed[name][seed] = arm_metrics(workdir)
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in per_seed[name][seed].items()),
                  flush=True)
    return per_seed


def eval_curves(out: pathlib.Path, arms, seeds: list[int], key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{arm: (steps, values [seeds, steps])} of one held-out metric along the run."""
    curves = {}
    for name in arms:
        rows = [read_evals(out / name / f"seed{s}") for s in seeds]
        curves[name] = (np.array([r["step"] for r in rows[0]]),
                        np.array([[r["sets"]["heldout"][key] for r in seed_rows] for seed_rows in rows]))
    return curves


def plot_curves(path: pathlib.Path, out: pathlib.Path, arms, seeds: list[int], title: str) -> None:
    """Held-out loss and MaxVio (per batch solid, global dashed) over steps, mean over seeds with the min-max band."""
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(arms):
        color = f"C{i}"
        for ax, key, style in ((ax0, "ce", "-"), (ax1, "max_vio_batch", "-"), (ax1, "max_vio_global", "--")):
            steps, values = eval_curves(out, [name], seeds, key)[name]
            label = name if key != "max_vio_global" else f"{name} (global)"
            ax.plot(steps, values.mean(0), style, color=color, label=label)
            if len(seeds) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.15)
    ax0.set_ylabel("held-out cross-entropy (main model)")
    ax1.set_ylabel("MaxVio (solid: per batch, dashed: whole set)")
    for ax in (ax0, ax1):
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle(f"{title} (mean over seeds {seeds}, band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metric_notes(base: RunArgs, gamma: float | None) -> str:
    """The results.md note on the metrics and the aux_free arm shared by the balancing scripts."""
    speed = "the paper's schedule, 0.001" if gamma is None else f"{gamma:g}"
    return ("val_loss: held-out main-model CE at the last step; max_vio_batch: MaxVio of each evaluated micro-batch "
            f"({base.batch} x {base.seq_len} tokens), mean over micro-batches and MoE layers; max_vio_global: MaxVio "
            "of the whole held-out set's counts (the two are equal when the same expert is the most loaded in every "
            "micro-batch); train_loss: training CE over the last tenth of the steps. "
            f"aux_free: bias rule (speed {speed}), no balance loss.")


def add_paired(out: pathlib.Path, ref: str, keys: tuple[str, ...] = ("val_loss", "max_vio_batch")) -> dict:
    """Add each arm's per-seed difference from arm `ref` (same seed, data and windows) to out/results.json ("paired")
    and a line per arm to out/results.md; return the differences {arm: {key: {"per_seed", "mean"}}}."""
    path = out / "results.json"
    results = json.loads(path.read_text())
    seeds = results["seeds"]
    paired, lines = {}, []
    for arm in seeds:
        if arm == ref:
            continue
        paired[arm] = {}
        for key in keys:
            diff = {s: seeds[arm][s][key] - seeds[ref][s][key] for s in seeds[ref]}
            paired[arm][key] = {"per_seed": diff, "mean": float(np.mean(list(diff.values())))}
            lines.append(f"- {key} {arm} - {ref}: mean {paired[arm][key]['mean']:+.4f}, per seed "
                         + ", ".join(f"{s}: {d:+.4f}" for s, d in diff.items()))
    results["paired"] = {"reference": ref, "differences": paired}
    path.write_text(json.dumps(results, indent=1) + "\n")
    with open(out / "results.md", "a") as f:
        f.write(f"\nPaired differences from {ref} (same seed, data and evaluation windows):\n\n"
                + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return paired


def prepare(args, size: dict) -> tuple[pathlib.Path, list[int], dict]:
    """(out directory, seeds, corpus) after checking the flags and writing the two-domain corpus into out/data."""
    seeds = check_seeds(args.seeds if args.seeds is not None else size["seeds"])
    if args.alpha is not None and not args.alpha > 0:
        raise SystemExit(f"--alpha must be positive, got {args.alpha}")
    if args.gamma is not None and not args.gamma > 0:
        raise SystemExit(f"--gamma must be positive, got {args.gamma}")
    out = new_out_dir(args.out)
    corpus = write_corpus(out / "data", size["code_bytes"], size["code_eval_bytes"])
    return out, seeds, corpus


def add_common_flags(ap) -> None:
    """--preset and --alpha (the auxiliary loss weight) shared by the balancing scripts."""
    ap.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    ap.add_argument("--alpha", type=float, default=None,
                    help=f"auxiliary-loss weight of the aux-loss arms (default {DEFAULT_BALANCE_ALPHA['aux-loss']:g})")
    ap.add_argument("--gamma", type=float, default=None,
                    help="constant bias update speed of the aux_free arm (default the paper's schedule, 0.001; a short "
                         "run may need more for the bias to catch up with the router)")


def settings_of(size: dict, seeds: list[int], base: RunArgs, corpus: dict, arms: dict) -> dict:
    """results.json settings: sizes, seeds, the shared run arguments, the arms' overrides and the corpus."""
    shared = {k: getattr(base, k) for k in ("preset", "steps", "batch", "seq_len", "eval_every", "eval_batches",
                                            "eval_fraction", "fim_rate", "lr")}
    return {**shared, "seeds": seeds, "tokens_per_arm": base.steps * base.batch * base.seq_len,
            "code_bytes": size["code_bytes"], "arms": arms, "corpus": corpus["stats"],
            "train_loss": "mean training CE over the last tenth of the steps"}


def run_experiment(args, arms: dict[str, dict], title: str, arm_notes: str, reference: str) -> None:
    """Train `arms` on the two-domain corpus over args' seeds, plot the curves, write results.json / results.md
    (with `arm_notes` after the shared metric notes) and the paired differences from the `reference` arm."""
    size = SIZES["quick" if args.quick else "default"]
    out, seeds, corpus = prepare(args, size)
    base = base_args(size, corpus, args.preset)
    per_seed = run_arms(out, arms, seeds, base)
    plot_curves(out / "curves.png", out, arms, seeds, title)
    write_results(out, per_seed, settings_of(size, seeds, base, corpus, arms), METRICS, title,
                  metric_notes(base, args.gamma) + " " + arm_notes)
    add_paired(out, reference)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    add_common_flags(ap)
    args = ap.parse_args(argv)
    arms = aux_free_vs_aux_loss_arms(args.alpha, args.gamma)
    run_experiment(args, arms, "Auxiliary-loss-free vs auxiliary-loss balancing (paper Table 5)",
                   f"aux_loss: sequence-wise auxiliary loss, alpha {arms['aux_loss']['balance_alpha']:g}, no bias. "
                   "Paper (Table 5, 16B/230B models): aux-free has lower validation loss and a much lower "
                   "MaxVio_batch.", reference="aux_loss")
    return 0

if __name__ == "__main__":
    sys.exit(main())
