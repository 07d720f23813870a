"""MLA vs MHA vs GQA at equal model width (paper §2.1.1; DeepSeek-V2 §2.1.4 Table 1): KV-cache bytes per token,
parameters, decode speed and held-out loss of the same model with its attention switched by ModelConfig.attention.

    python experiments/attention_variants.py --out runs/attention_variants        # default (~14 min on 2 cores)
    python experiments/attention_variants.py --out /tmp/av --quick                 # CI (well under a minute quiet)

Arms `mla`, `mha`, `gqa` share the preset's hidden_size, heads, layers and MoE; only the attention differs (MHA/GQA
heads are qk_nope_head_dim + qk_rope_head_dim wide, MLA's query/key width; GQA has --kv-heads key/value heads).
Per arm:
- kv_bytes_per_token: measured from the cache arrays inference.generate allocates (decoder.layer_cache, bf16,
  main-model layers), beside the analytic formula: MLA (kv_lora_rank + qk_rope_head_dim) x layers x 2 bytes,
  MHA 2 x heads x head_dim x layers x 2, GQA 2 x kv_heads x head_dim x layers x 2;
- total_params / attn_params (main model; attention projections of all main layers);
- decode_tok_s_b1 / decode_tok_s_b8: new tokens per second of greedy inference.generate after a --context-token
  prompt, timed from the first new token to the last (decode steps only, prefill excluded), median of 3 runs
  after a warm-up (compile) run, on the seed's trained models, the three arms timed in alternation (weights do not
  change the speed; the machine load does, so the spread over seeds is mostly timing noise: rerun on a quiet
  machine before reading much into a few tens of percent);
- val_loss: held-out cross-entropy (nats/token) after training every arm on the same data, seed and budget
  (several seeds; mean ± std over seeds in results.md).
Writes results.json, results.md and attention_variants.png (bars of the four measures, training curves).
"""

from __future__ import annotations

import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import apply_overrides, get_preset
from dsv3_jax.inference.decoder import layer_cache
from dsv3_jax.inference.generate import generate
from dsv3_jax.stats import model_stats
from dsv3_jax.train.loop import RunArgs, load_workdir
from experiments.harness import (arm_seconds, check_seeds, final_eval, new_out_dir, parser, pyplot, run_arm,
                                 train_curve, write_results)

ARMS = ("mla", "mha", "gqa")
SIZES = {
    "default": dict(steps=240, batch=16, seq_len=128, corpus_bytes=2_000_000, eval_every=60, eval_fraction=0.05,
                    seeds=[0, 1],
                    context=256, new_tokens=48, reps=3, extra_set=[], mtp_depth=None),
    "quick": dict(steps=12, batch=4, seq_len=32, corpus_bytes=400_000, eval_every=12, eval_fraction=0.2,
                  seeds=[0], context=16,
                  new_tokens=6, reps=1, extra_set=["num_hidden_layers=1"], mtp_depth=0),
}
METRICS = ["kv_bytes_per_token", "kv_bytes_formula", "total_params", "attn_params", "decode_tok_s_b1",
           "decode_tok_s_b8", "val_loss", "train_seconds"]


def arm_overrides(arm: str, kv_heads: int) -> list[str]:
    """The ModelConfig --set items of an arm."""
    if arm == "gqa":
        return ["attention=gqa", f"num_key_value_heads={kv_heads}"]
    return [f"attention={arm}"]


def kv_bytes_formula(cfg) -> int:
    """The analytic bf16 cache bytes per token over the main layers."""
    if cfg.attention == "mla":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.kv_heads * cfg.attn_head_dim
    return per_layer * cfg.num_hidden_layers * 2


def kv_bytes_measured(cfg, tokens: int = 64) -> float:
    """Bytes per token of the bf16 cache arrays the generator allocates, for one sequence of `tokens` slots."""
    cache = layer_cache(cfg, 1, tokens, jnp.bfloat16)
    return sum(a.nbytes for a in jax.tree.leaves(cache)) / tokens


def attn_params(model) -> int:
    """Parameters of the attention projections of the main model's layers."""
    return sum(math.prod(var.get_value().shape) for stack in (model.dense_layers, model.moe_layers)
               if stack is not None for _, var in nnx.to_flat_state(nnx.state(stack.attn, nnx.Param)))


def decode_tokens_per_s(models: dict, batch: int, context: int, new_tokens: int, reps: int,
                        seed: int = 0) -> dict[str, float]:
    """Per model, the median over `reps` runs of batch * (new_tokens - 1) / (time from the first new token to the
    last). After one warm-up (compile) run each, the rounds alternate the models, so a change of machine load
    between rounds touches every arm alike."""
    vocab = min(m.config.vocab_size for m in models.values())
    prompt = np.random.default_rng(seed).integers(2, vocab, (batch, context)).astype(np.int32)
    stamps: list[float] = []

    def stamp(step, tokens):
        stamps.append(time.perf_counter())

    rates: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(reps + 1):  # round 0 compiles
        for name, model in models.items():
            stamps.clear()
            generate(model, prompt, new_tokens, callback=stamp)
            if rep:
                rates[name].append(batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {name: statistics.median(r) for name, r in rates.items()}


def plot(path: pathlib.Path, arms: dict, curves: dict) -> None:
    """Bars of cache bytes, decode speeds and held-out loss; training loss curves (seed mean)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(20, 4))
    names = list(arms)
    colors = ["C0", "C1", "C2"][:len(names)]
    panels = [("kv_bytes_per_token", "KV cache bytes / token (bf16)"),
              ("decode_tok_s_b1", "decode tokens/s, batch 1"), ("decode_tok_s_b8", "decode tokens/s, batch 8"),
              ("val_loss", "held-out loss (nats/token)")]
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [arms[n][key] for n in names], color=colors,
               yerr=[arms[n].get(f"{key}_std", 0.0) for n in names])
        ax.set_title(title)
        if key == "val_loss":
            lo = min(arms[n][key] for n in names)
            ax.set_ylim(lo * 0.95, max(arms[n][key] for n in names) * 1.02)
    for name, color in zip(names, colors):
        axes[4].plot(np.arange(1, len(curves[name]) + 1), curves[name], color=color, lw=1, label=name)
    axes[4].set_title("training cross-entropy")
    axes[4].set_xlabel("step")
    axes[4].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; return the results object."""
    ap = parser(__doc__)
    ap.add_argument("--preset", default="tiny", help="the model every arm shares (default tiny)")
    ap.add_argument("--kv-heads", type=int, default=2, help="GQA's key/value heads (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per arm and seed")
    args = ap.parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "default"])
    seeds = check_seeds(args.seeds if args.seeds is not None else size["seeds"])
    steps = args.steps or size["steps"]
    base_cfg = get_preset(args.preset)
    configs = {arm: apply_overrides(base_cfg, size["extra_set"] + arm_overrides(arm, args.kv_heads))
               for arm in ARMS}  # ValueError here (e.g. --kv-heads not dividing the heads) before any training
    out = new_out_dir(args.out)
    base = RunArgs(workdir="", steps=steps, preset=args.preset, batch=size["batch"], seq_len=size["seq_len"],
                   corpus_bytes=size["corpus_bytes"], eval_every=size["eval_every"],
                   eval_fraction=size["eval_fraction"],
                   mtp_depth=size["mtp_depth"])
    per_seed: dict[str, dict[int, dict[str, float]]] = {arm: {} for arm in ARMS}
    curves: dict[str, list[np.ndarray]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        models = {}
        for arm in ARMS:
            workdir = run_arm(base, out / f"{arm}_seed{seed}", seed=seed,
                              set=size["extra_set"] + arm_overrides(arm, args.kv_heads))
            model, _ = load_workdir(workdir)
            cfg = configs[arm] = model.config  # the run's own (with its MTP depth)
            if cfg.attention != arm:
                raise RuntimeError(f"internal: arm {arm} trained attention={cfg.attention!r}")
            row = {"kv_bytes_per_token": kv_bytes_measured(cfg), "kv_bytes_formula": kv_bytes_formula(cfg),
                   "total_params": model_stats(cfg).total_params, "attn_params": attn_params(model),
                   "val_loss": final_eval(workdir)["ce"], "train_seconds": arm_seconds(workdir)}
            per_seed[arm][seed] = row
            models[arm] = model
            curves[arm].append(train_curve(workdir))
        for b in (1, 8):  # this seed's three models, timed in alternation
            for arm, rate in decode_tokens_per_s(models, b, size["context"], size["new_tokens"],
                                                 size["reps"]).items():
                per_seed[arm][seed][f"decode_tok_s_b{b}"] = rate
        for arm in ARMS:
            print(f"{arm} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in per_seed[arm][seed].items()),
                  flush=True)
    settings = {"preset": args.preset, "kv_heads": args.kv_heads, "steps": steps, "seeds": seeds,
                "batch": size["batch"], "seq_len": size["seq_len"], "corpus_bytes": size["corpus_bytes"],
                "eval_fraction": size["eval_fraction"], "decode_context": size["context"],
                "decode_new_tokens": size["new_tokens"],
                "decode_reps": size["reps"], "extra_set": size["extra_set"], "quick": args.quick,
                "configs": {arm: {"attention": c.attention, "hidden_size": c.hidden_size,
                                  "num_attention_heads": c.num_attention_heads, "kv_heads": c.kv_heads,
                                  "head_dim": c.attn_head_dim, "num_hidden_layers": c.num_hidden_layers}
                            for arm, c in configs.items()}}
    c = configs["mla"]
    notes = (f"Equal width: {args.preset}, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
             f"{c.num_hidden_layers} layers; MLA kv_lora_rank {c.kv_lora_rank} + rope {c.qk_rope_head_dim}; "
             f"MHA/GQA head_dim {configs['mha'].attn_head_dim}, GQA {args.kv_heads} kv heads. KV bytes in bf16 over "
             f"the main layers; decode over a {size['context']}-token prompt, {size['new_tokens']} greedy tokens, "
             f"median of {size['reps']}; {steps} steps x {size['batch']} x {size['seq_len']} tokens per arm.")
    results = write_results(out, per_seed, settings, METRICS, "MLA vs MHA vs GQA at equal width", notes)
    mean_curves = {arm: np.mean(np.stack(cs), axis=0) for arm, cs in curves.items()}
    plot(out / "attention_variants.png", results["arms"], mean_curves)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
