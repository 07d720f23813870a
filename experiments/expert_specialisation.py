"""Expert specialisation across domains (paper §4.5.3, Fig. 9): the auxiliary-loss-free and auxiliary-loss models
of experiments/balance_aux_free_vs_aux_loss.py evaluated on two held-out domains, Python code (stdlib source files
never trained on) and English prose (held-out pydoc_data topics), with the per-expert load of every MoE layer per
domain. The paper finds the aux-free model's experts more specialised (larger differences between domains).

    python experiments/expert_specialisation.py --out runs/expert_specialisation \\
        --from runs/balance_aux_free_vs_aux_loss       # evaluate that run's models only (about a minute)
    python experiments/expert_specialisation.py --out runs/expert_specialisation   # train both arms (~3 min, 2 cores)
    python experiments/expert_specialisation.py --out /tmp/s --quick [--from DIR]  # CI size

Without --from the two arms are trained here exactly as balance_aux_free_vs_aux_loss.py trains them (its sizes,
two-domain corpus in DIR/data; default one seed). With --from DIR the checkpoints DIR/ARM/seedS of a finished
balance_aux_free_vs_aux_loss run are loaded (dsv3_jax.load.load_model_and_tokenizer) with its held-out domain files
DIR/data/code_eval.jsonl and DIR/data/prose_eval.jsonl (less any document that also occurs in DIR's training files;
the count is in settings); nothing is trained. Each domain is evaluated with
dsv3_jax.train.heldout.Evaluator on fixed windows of the run's sequence length.

Metrics per arm (mean ± std over seeds): `tv_code_prose` (total-variation distance between the code and prose
expert-load distributions, 0.5 sum_i |p_i - q_i|, mean over MoE layers; 0: no specialisation), `max_rel_load`
(largest load / balanced load of any expert in any layer and domain), `max_vio_code`, `max_vio_prose` (global
MaxVio per domain), `ce_code`, `ce_prose` (main-model cross-entropy per domain). Writes results.json (with the
per-domain loads), results.md and load_heatmaps.png (relative load per expert, domain and layer, both models, of the
first seed: experts are not aligned across seeds).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from dsv3_jax.load import load_model_and_tokenizer
from dsv3_jax.train.tokens import prepare_tokens
from dsv3_jax.train.heldout import Evaluator, eval_windows
from dsv3_jax.train.step import split_model
from experiments.balance_aux_free_vs_aux_loss import (SIZES, add_common_flags, aux_free_vs_aux_loss_arms,
                                                      base_args, prepare, run_arms, settings_of)
from experiments.harness import check_seeds, new_out_dir, parser, pyplot, write_results

ARMS = ("aux_free", "aux_loss")
DOMAINS = ("code", "prose")
EVAL = {"default": dict(batches=8, micro=16), "quick": dict(batches=2, micro=4)}  # at most; fewer if a domain is short
METRICS = ["tv_code_prose", "max_rel_load", "max_vio_code", "max_vio_prose", "ce_code", "ce_prose"]


def specialisation(loads: dict[str, np.ndarray]) -> dict[str, float]:
    """Scalar specialisation figures of one model from its per-domain load fractions {domain: [L, E]}."""
    code, prose = (np.asarray(loads[d], np.float64) for d in DOMAINS)
    n_experts = code.shape[-1]
    return {"tv_code_prose": float((0.5 * np.abs(code - prose).sum(-1)).mean()),
            "max_rel_load": float(max(code.max(), prose.max()) * n_experts)}


def evaluate_domains(workdir: pathlib.Path, eval_files: dict[str, str], seq_len: int, batches: int, micro: int,
                     cache: pathlib.Path) -> dict[str, dict]:
    """{domain: heldout.set_metrics} of the newest checkpoint in `workdir` on each domain's evaluation file: the
    first `batches` x `micro` windows of each, or as many micro-batches as the shortest domain holds."""
    model, tokenizer = load_model_and_tokenizer(workdir)
    graphdef, params, bias = split_model(model)
    tokens = {name: prepare_tokens([path], tokenizer, cache, model.config.vocab_size)
              for name, path in eval_files.items()}
    fit = min(t.shape[0] // (seq_len + 1) for t in tokens.values()) // micro
    batches = min(batches, fit) or batches  # the same number for every domain; eval_windows names a short one
    sets = {name: eval_windows(t, seq_len, batches, micro, name) for name, t in tokens.items()}
    evaluator = Evaluator(graphdef, sets, every=0, stop=0, path=cache / "unused.jsonl", enabled=False)
    return evaluator.evaluate({"params": params, "bias": bias})


def plot_heatmaps(path: pathlib.Path, loads: dict[str, dict[str, np.ndarray]], seed: int) -> None:
    """One panel per model and MoE layer: relative load (load / balanced load) per domain (rows) and expert, of the
    models trained with `seed`."""
    plt = pyplot()
    n_layers, n_experts = np.asarray(loads[ARMS[0]][DOMAINS[0]]).shape
    rel = {arm: {d: np.asarray(loads[arm][d]) * n_experts for d in DOMAINS} for arm in ARMS}
    vmax = max(float(rel[a][d].max()) for a in ARMS for d in DOMAINS)
    fig, axes = plt.subplots(len(ARMS), n_layers, figsize=(max(6.0, 0.45 * n_experts * n_layers + 2), 2.2 * len(ARMS)),
                             squeeze=False, layout="constrained")
    for i, arm in enumerate(ARMS):
        for layer in range(n_layers):
            ax = axes[i, layer]
            grid = np.stack([rel[arm][d][layer] for d in DOMAINS])
            im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
            if n_experts <= 16:
                for (r, c), v in np.ndenumerate(grid):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 * vmax else "black")
            ax.set_yticks(range(len(DOMAINS)), DOMAINS)
            ax.set_xticks(range(n_experts))
            ax.set_title(f"{arm}, MoE layer {layer}", fontsize=9)
            ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="relative load (1 = balanced)")
    fig.suptitle(f"Expert load per domain (paper Fig. 9), models of seed {seed}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonl_texts(path: pathlib.Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def _from_run(src: pathlib.Path, out: pathlib.Path) -> tuple[list[int], dict, dict]:
    """(seeds, eval files, settings) of a finished balance_aux_free_vs_aux_loss --out directory; its held-out domain
    files are copied into out/data without any document that also occurs in its training files."""
    results = src / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"--from {src}: no results.json (not a finished balance_aux_free_vs_aux_loss run)")
    settings = json.loads(results.read_text())["settings"]
    missing = [a for a in ARMS if a not in settings.get("arms", {})]
    if missing:
        raise ValueError(f"--from {src}: arms {missing} missing (have {sorted(settings.get('arms', {}))})")
    trained = {t for name in ("code_train.jsonl", "prose_train.jsonl") if (src / "data" / name).is_file()
               for t in _jsonl_texts(src / "data" / name)}
    files, removed = {}, {}
    (out / "data").mkdir()
    for d in DOMAINS:
        path = src / "data" / f"{d}_eval.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"--from {src}: held-out domain file {path} missing")
        docs = _jsonl_texts(path)
        kept = [t for t in docs if t not in trained]
        removed[d] = len(docs) - len(kept)
        files[d] = str(out / "data" / f"{d}_eval.jsonl")
        pathlib.Path(files[d]).write_text("".join(json.dumps({"text": t}) + "\n" for t in kept))
        if removed[d]:
            print(f"--from {src}: {removed[d]} of {len(docs)} {d} evaluation documents also occur in its training "
                  "data and are left out", flush=True)
    return list(settings["seeds"]), files, {**settings, "eval_documents_found_in_training_and_left_out": removed}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    add_common_flags(ap)
    ap.add_argument("--from", dest="src", default=None,
                    help="a finished balance_aux_free_vs_aux_loss --out directory: evaluate its models, train nothing")
    args = ap.parse_args(argv)
    kind = "quick" if args.quick else "default"
    ev = EVAL[kind]
    if args.src is not None:
        src = pathlib.Path(args.src)
        out = new_out_dir(args.out)
        seeds, eval_files, src_settings = _from_run(src, out)
        if args.seeds is not None:
            unknown = sorted(set(check_seeds(args.seeds)) - set(seeds))
            if unknown:
                raise SystemExit(f"--seeds {unknown} were not trained in --from {src} (it has {seeds})")
            seeds = args.seeds
        workdirs = {arm: {s: src / arm / f"seed{s}" for s in seeds} for arm in ARMS}
        seq_len = src_settings["seq_len"]
        settings = {"models": f"loaded from --from {src.resolve()} (not trained here)", "from_settings": src_settings}
    else:
        size = dict(SIZES[kind], seeds=[0])
        out, seeds, corpus = prepare(args, size)
        arms = aux_free_vs_aux_loss_arms(args.alpha, args.gamma)
        base = base_args(size, corpus, args.preset)
        run_arms(out, arms, seeds, base)
        workdirs = {arm: {s: out / arm / f"seed{s}" for s in seeds} for arm in ARMS}
        eval_files, seq_len = corpus["eval"], base.seq_len
        settings = {"models": "trained here as balance_aux_free_vs_aux_loss.py trains them",
                    "training": settings_of(size, seeds, base, corpus, arms)}
    settings.update(seeds=seeds, seq_len=seq_len, max_eval_windows_per_domain=ev["batches"] * ev["micro"],
                    eval_files=eval_files, tv_code_prose="mean over MoE layers of 0.5 sum_i |load_code_i - "
                    "load_prose_i|", max_rel_load="max over layers, domains, experts of load_i x n_experts")

    per_seed: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    loads: dict[str, dict[str, list]] = {arm: {d: [] for d in DOMAINS} for arm in ARMS}
    for arm in ARMS:
        for seed in seeds:
            sets = evaluate_domains(workdirs[arm][seed], eval_files, seq_len, ev["batches"], ev["micro"],
                                    out / "cache" / f"{arm}_seed{seed}")
            row = specialisation({d: sets[d]["load"] for d in DOMAINS})
            settings["eval_tokens_per_domain"] = sets[DOMAINS[0]]["tokens"]
            for d in DOMAINS:
                row[f"max_vio_{d}"], row[f"ce_{d}"] = sets[d]["max_vio_global"], sets[d]["ce"]
                loads[arm][d].append(sets[d]["load"])
            per_seed[arm][seed] = row
            print(f"{arm} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    # experts are not aligned across seeds (each initialisation specialises its own), so the plot shows one seed
    plot_heatmaps(out / "load_heatmaps.png", {arm: {d: loads[arm][d][0] for d in DOMAINS} for arm in ARMS}, seeds[0])
    extra = {"loads": {arm: {d: {str(s): v for s, v in zip(seeds, loads[arm][d])} for d in DOMAINS} for arm in ARMS}}
    notes = ("tv_code_prose: total-variation distance between the code and prose expert-load distributions, mean "
             "over MoE layers (0: the same experts serve both domains); max_rel_load: largest expert load relative "
             "to a balanced load over layers and domains; max_vio_*: global MaxVio per domain; ce_*: main-model "
             f"cross-entropy per domain. Models: {settings['models']}. Paper (Fig. 9): the aux-free model shows "
             "greater expert specialisation across domains than the aux-loss model.")
    write_results(out, per_seed, settings, METRICS, "Expert specialisation: code vs prose (paper Fig. 9)", notes,
                  extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
