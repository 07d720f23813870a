"""Write the notebooks of this folder (without outputs) from the cells below: `python notebooks/make_notebooks.py`.

Each notebook reads DSV3_NB_QUICK=1 (tiny sizes, for CI) and notebooks 2-4 the shared work directory DSV3_NB_WORKDIR
(default runs/nb_tiny, trained on first use); notebook 3 reads DSV3_NB_RESULTS (a results.json or a folder searched
for them, default runs/). tests/test_notebooks.py executes them.
"""

from __future__ import annotations

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).parent

SETUP = '''import os
import pathlib

QUICK = os.environ.get("DSV3_NB_QUICK", "0") == "1"  # tiny sizes (CI); unset for the real thing
WORKDIR = pathlib.Path(os.environ.get("DSV3_NB_WORKDIR", "runs/nb_tiny"))  # one pretraining run shared by notebooks 2-4
RUN = dict(steps=20, batch=4, seq_len=32, corpus_bytes=200_000) if QUICK else dict(steps=300, batch=16, seq_len=128,
                                                                                   corpus_bytes=4_000_000)
print("quick" if QUICK else "full", "mode; work directory", WORKDIR)'''

TRAIN_IF_MISSING = '''from dsv3_jax.train.loop import RunArgs, train

if (WORKDIR / "checkpoints").is_dir():
    print(f"reusing the run in {WORKDIR}")
else:  # what `dsv3 train --preset tiny --workdir WORKDIR ...` does
    summary = train(RunArgs(workdir=str(WORKDIR), preset="tiny", save_every=RUN["steps"], sample_tokens=0,
                            progress=False, **RUN))
    print(summary)'''


def tour() -> list:
    return [
        new_markdown_cell("# A tour of dsv3-jax\n\nDeepSeek-V3 (arXiv:2412.19437) at toy scale: build the `tiny` "
                          "preset, save and load it in the released checkpoint layout, look at its logits, inside "
                          "Multi-head Latent Attention (§2.1.1) and the DeepSeekMoE router (§2.1.2), and at the size "
                          "of the latent KV cache."),
        new_code_cell('''import os
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import dsv3_jax

QUICK = os.environ.get("DSV3_NB_QUICK", "0") == "1"
cfg = dsv3_jax.get_preset("tiny")
model = dsv3_jax.Transformer(cfg, nnx.Rngs(0))
ckpt = tempfile.mkdtemp(prefix="dsv3-tour-")
dsv3_jax.save_pretrained(model, ckpt)  # config.json + safetensors, the layout of the released weights
model = dsv3_jax.from_pretrained(ckpt)
print(sorted(os.listdir(ckpt)))
fields = ("hidden_size", "num_hidden_layers", "first_k_dense_replace", "n_routed_experts", "num_experts_per_tok",
          "n_group", "topk_group", "kv_lora_rank", "num_mtp_layers")
print({k: getattr(cfg, k) for k in fields})'''),
        new_markdown_cell("## Logits\n\n`model(tokens)` and `model.forward(tokens)` run compiled: the first call of "
                          "a shape compiles, later calls reuse the program and always see the current parameters. "
                          "Inside your own `jax.jit` they run as plain traced code. For debugging, "
                          "`with jax.disable_jit(): model(tokens)` runs op by op (slow, every value concrete)."),
        new_code_cell('''tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
logits = model(tokens)  # [B, T, V] float32; position i predicts token i + 1
out = model.forward(tokens)  # + MTP logits [D, B, T, V] (§2.2), expert counts [L_moe, E], balance terms
print("logits", logits.shape, "mtp_logits", out.mtp_logits.shape, "expert_counts", out.expert_counts.shape)
print("mean next-token entropy (nats):", float(-(jax.nn.softmax(logits) * jax.nn.log_softmax(logits)).sum(-1).mean()),
      "vs uniform", float(np.log(cfg.vocab_size)))'''),
        new_markdown_cell("## Inside MLA (§2.1.1, eqs. 1-11)\n\nKeys and values come from a shared latent "
                          "$c^{KV}_t = W^{DKV} h_t$ of `kv_lora_rank` dimensions plus one decoupled RoPE key "
                          "$k^R_t$ shared by all heads; only these two are cached. Below: the latents of the first "
                          "MoE layer for our tokens."),
        new_code_cell('''from dsv3_jax.model.mla import mla_latents
from dsv3_jax.model.params import values
from dsv3_jax.model.rope import rope_cos_sin

p = {name: w[0] for name, w in values(model.moe_layers.attn).items()}  # layer 0 of the stacked MoE layers
positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
cos, sin = rope_cos_sin(positions, cfg)
x = model.dense_layers.attn_norm(model.embed_tokens(tokens))  # stand-in input: normalised embeddings
q_nope, q_pe, c_kv, k_pe = mla_latents(p, x, cos, sin, cfg)
for name, a in dict(q_nope=q_nope, q_pe=q_pe, c_kv=c_kv, k_pe=k_pe).items():
    print(f"{name:7s} {a.shape}")'''),
        new_markdown_cell("The weight-absorbed form (the decoding form) folds $W^{UK}$ into the query and $W^{UV}$ "
                          "into the output, so attention runs directly against the cached latents. It computes "
                          "the same function:"),
        new_code_cell('''naive = model.forward(tokens, mtp=False).logits
absorbed = model.forward(tokens, mtp=False, absorbed=True).logits
print("max |naive - absorbed| =", float(jnp.max(jnp.abs(naive - absorbed))))
assert jnp.allclose(naive, absorbed, atol=1e-4)'''),
        new_markdown_cell("Cache bytes per token (bf16) against a standard multi-head cache of the same heads "
                          "(keys `qk_head_dim`, values `v_head_dim` per head and layer):"),
        new_code_cell('''from dsv3_jax.inference.cache import cache_bytes_per_token

for name in ("tiny", "deepseek-v3"):
    c = dsv3_jax.get_preset(name)
    mla = cache_bytes_per_token(c)
    mha = 2 * c.num_hidden_layers * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    print(f"{name:12s} MLA {mla:>9,d} B/token   MHA {mha:>11,d} B/token   ratio {mha / mla:5.1f}x")'''),
        new_markdown_cell("## The router (§2.1.2, eqs. 12-16)\n\nAffinities $s_{i,t} = \\sigma(u_t^\\top e_i)$; "
                          "the top-K choice uses $s_{i,t} + b_i$ (the balancing bias, §2.1.2 auxiliary-loss-free) "
                          "within the `topk_group` best of `n_group` expert groups (group-limited routing); the "
                          "gate values are the unbiased affinities of the chosen experts, normalised and scaled."),
        new_code_cell('''from dsv3_jax.model.moe import route

router_DE = model.moe_layers.ffn.router[...][0]
bias_E = model.moe_layers.ffn.expert_bias[...][0]
r = route(x.reshape(-1, cfg.hidden_size), router_DE, bias_E, cfg)
print("scores of token 0:", np.round(np.asarray(r.scores_TE[0]), 3))
print("chosen experts (first 4 tokens):", np.asarray(r.experts_TK[:4]).tolist())
print("gate weights   (first 4 tokens):", np.round(np.asarray(r.weights_TK[:4]), 3).tolist())
group_TK = np.asarray(r.experts_TK) // (cfg.n_routed_experts // cfg.n_group)
groups_per_token = [len(set(g)) for g in group_TK]
print(f"groups used per token: max {max(groups_per_token)} (topk_group = {cfg.topk_group})")
assert max(groups_per_token) <= cfg.topk_group'''),
        new_code_cell('''counts = np.asarray(out.expert_counts)  # [L_moe, E] tokens per expert in each MoE layer
fig, axes = plt.subplots(1, counts.shape[0], figsize=(4 * counts.shape[0], 2.5), squeeze=False)
for layer, ax in enumerate(axes[0]):
    ax.bar(range(cfg.n_routed_experts), counts[layer])
    ax.set(title=f"MoE layer {layer}", xlabel="expert", ylabel="tokens")
plt.tight_layout()
mean = counts.mean(-1, keepdims=True)
print("MaxVio per layer (max load / mean load - 1):", np.round((counts.max(-1) / mean[:, 0]) - 1, 3))'''),
    ]


def pretrain() -> list:
    return [
        new_markdown_cell("# Pretraining `tiny`\n\nThe paper's recipe (§4.2: AdamW, warmup-constant-cosine "
                          "schedule, batch-size ramp, MTP weight 0.3 -> 0.1, aux-loss-free bias updates) on the Python "
                          "standard library's sources, then its metrics. Set `DSV3_NB_WORKDIR` to reuse a run; the "
                          "cell trains only when the work directory has no checkpoint."),
        new_code_cell(SETUP),
        new_code_cell(TRAIN_IF_MISSING),
        new_markdown_cell("`metrics.jsonl` has one row per step (`dsv3 plot WORKDIR` draws the same figures)."),
        new_code_cell('''import matplotlib.pyplot as plt
import numpy as np

from dsv3_jax.train.plot import read_metrics

rows = read_metrics(WORKDIR)
step = np.array([r["step"] for r in rows])
print(len(rows), "rows; keys:", sorted(rows[0]))
fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.2))
for key in ("loss", "ce", "mtp_loss"):
    ax1.plot(step, [r[key] for r in rows], label=key)
ax1.set(xlabel="step", title="loss (nats)"); ax1.legend()
ax2.plot(step, [r["max_vio"] for r in rows])
ax2.set(xlabel="step", title="MaxVio (expert load imbalance, §4.5.2)")
ax3.plot(step, [r["lr"] for r in rows])
ax3.set(xlabel="step", title="learning rate")
plt.tight_layout()
print(f"cross-entropy {rows[0]['ce']:.3f} -> {rows[-1]['ce']:.3f}")'''),
        new_markdown_cell("The trained model loads from the work directory with its tokenizer:"),
        new_code_cell('''from dsv3_jax.train.loop import load_workdir

model, tokenizer = load_workdir(WORKDIR)
prompt = [tokenizer.bos_id] + tokenizer.encode("def ")
out = model.generate(np.array([prompt], np.int32), max_new_tokens=24)
print(repr(tokenizer.decode(out[0, len(prompt):])))'''),
    ]


def results() -> list:
    return [
        new_markdown_cell("# Reading experiment results\n\nAn experiment script trains its arms on identical data "
                          "and writes `results.json`: `{\"arms\": {NAME: {metric: value}}, \"settings\": {...}}`. The "
                          "post-training demo (`experiments/posttrain_demo.py`, paper §4-§5) writes "
                          "`{\"exact_match\": {stage: value}, \"settings\": {...}, ...}`; both read into one table "
                          "of arms x metrics. `DSV3_NB_RESULTS` names a results.json or a folder searched for "
                          "them (default `runs/`)."),
        new_code_cell('''import json
import numbers
import os
import pathlib

import matplotlib.pyplot as plt

source = pathlib.Path(os.environ.get("DSV3_NB_RESULTS", "runs"))
paths = [source] if source.is_file() else sorted(source.rglob("results.json"))
if not paths:
    raise FileNotFoundError(f"no results.json under {source}; run an experiment first, e.g. "
                            "python experiments/posttrain_demo.py --out runs/posttrain_demo --quick")
print("\\n".join(map(str, paths)))'''),
        new_code_cell('''def load_results(path):
    """(arms {name: {metric: value}}, settings) from either results.json layout."""
    data = json.loads(pathlib.Path(path).read_text())
    if "arms" in data:
        return data["arms"], data.get("settings", {})
    arms = {}  # {metric: {arm: value}} tables, e.g. the post-training demo's exact_match per stage
    for metric, table in data.items():
        if isinstance(table, dict) and table and all(isinstance(v, numbers.Number) for v in table.values()) \\
                and metric != "settings":
            for arm, value in table.items():
                arms.setdefault(arm, {})[metric] = value
    if not arms:
        raise ValueError(f"{path}: neither an 'arms' table nor any {{metric: {{arm: value}}}} table")
    return arms, data.get("settings", {})


def show(path):
    arms, settings = load_results(path)
    metrics = sorted({m for row in arms.values() for m in row})
    print(f"## {path}\\nsettings: {json.dumps(settings)[:300]}")
    print("| arm | " + " | ".join(metrics) + " |")
    for arm, row in arms.items():
        print(f"| {arm} | " + " | ".join(f"{row[m]:.4g}" if m in row else "-" for m in metrics) + " |")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        names = [a for a in arms if m in arms[a]]
        ax.barh(names, [arms[a][m] for a in names])
        ax.set(title=m)
    fig.suptitle(pathlib.Path(path).parent.name)
    plt.tight_layout()
    return arms


all_results = {str(p): show(p) for p in paths}'''),
    ]


def generation() -> list:
    return [
        new_markdown_cell("# Generation and speculative decoding\n\nGreedy and sampled decoding with the compressed "
                          "latent cache, then speculative decoding with the MTP module as the drafter (§2.2, §5.4.3: "
                          "the paper reports 85-90% acceptance of the second token and 1.8x tokens per second). A "
                          "short toy run accepts far fewer drafts; a longer one more."),
        new_code_cell(SETUP),
        new_code_cell(TRAIN_IF_MISSING),
        new_code_cell('''import numpy as np

from dsv3_jax.inference.speculative import speculative_generate
from dsv3_jax.train.loop import load_workdir

model, tokenizer = load_workdir(WORKDIR)
N = 16 if QUICK else 64
texts = ["def ", "import os\\n", "class ", "    return "]
prompts = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
width = max(map(len, prompts))
batch = np.array([p + [0] * (width - len(p)) for p in prompts], np.int32)  # right-padded ...
lengths = [len(p) for p in prompts]  # ... with each row's true length: row b continues at lengths[b]'''),
        new_code_cell('''greedy = model.generate(batch, N, prompt_lengths=lengths)
sampled = model.generate(batch, N, temperature=0.8, top_k=50, seed=0, prompt_lengths=lengths)
for t, n, g, s in zip(texts, lengths, greedy, sampled):
    print(f"{t!r:14} greedy  {tokenizer.decode(g[n:n + N])!r}\\n{'':14} sampled {tokenizer.decode(s[n:n + N])!r}")'''),
        new_markdown_cell("Speculative decoding: each main-model forward verifies the MTP module's draft; greedy "
                          "output is token for token the plain greedy output."),
        new_code_cell('''spec, stats = speculative_generate(model, batch, N, prompt_lengths=lengths, return_stats=True)
assert (np.asarray(spec) == np.asarray(greedy)).all()
print(stats)
print(f"acceptance rate {stats.acceptance_rate:.2f}, "
      f"new tokens per row per forward {stats.tokens_per_forward:.2f}")'''),
        new_markdown_cell("With sampling, a draft is accepted with probability min(1, p/q) (p: the main model's, q: "
                          "the draft's distribution), so two near-uniform distributions (an undertrained model) "
                          "accept almost every draft, while greedy acceptance needs the two argmaxes to agree."),
        new_code_cell('''import matplotlib.pyplot as plt

temperatures = [0.0, 1.0] if QUICK else [0.0, 0.5, 0.8, 1.0]
rates = [speculative_generate(model, batch, N, temperature=t, seed=0, prompt_lengths=lengths,
                              return_stats=True)[1].acceptance_rate for t in temperatures]
plt.figure(figsize=(4, 3))
plt.plot(temperatures, rates, "o-")
plt.xlabel("temperature"); plt.ylabel("draft acceptance rate"); plt.ylim(0, 1)
print(dict(zip(temperatures, np.round(rates, 3))))'''),
    ]


NOTEBOOKS = {"01_tour.ipynb": tour, "02_pretrain_tiny.ipynb": pretrain, "03_experiment_results.ipynb": results,
             "04_generation.ipynb": generation}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name` (no outputs), with a Python 3 kernelspec."""
    nb = new_notebook(cells=NOTEBOOKS[name]())
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating an unchanged notebook changes nothing
        cell.id = f"cell-{i:02d}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main() -> None:
    for name in NOTEBOOKS:
        nbformat.write(build(name), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
