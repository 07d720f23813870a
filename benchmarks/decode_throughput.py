"""Decode throughput on the `small` preset at batch 1 and batch 8, side by side with transformers' generate on the
identical config (random weights, greedy, same prompt and token count), in the same run; and speculative vs plain
decoding on a model whose MTP module was trained (a `dsv3 train` work directory, e.g. the tiny pretraining run).

    python benchmarks/decode_throughput.py [--json] [--new-tokens N] [--workdir runs/tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from flax import nnx

from dsv3_jax.config import SMALL
from dsv3_jax.inference.speculative import speculative_generate
from dsv3_jax.model.transformer import Transformer

PROMPT = 32


def _rate(fn, batch: int, new_tokens: int) -> float:
    fn()  # compile / warm up
    t = time.perf_counter()
    fn()
    return batch * new_tokens / (time.perf_counter() - t)


def bench_dsv3(model, batch: int, new_tokens: int) -> float:
    prompt = np.random.default_rng(0).integers(0, SMALL.vocab_size, (batch, PROMPT)).astype(np.int32)
    return _rate(lambda: model.generate(prompt, new_tokens), batch, new_tokens)


def bench_transformers(batch: int, new_tokens: int) -> float:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = DeepseekV3Config(**{k: v for k, v in SMALL.replace(num_mtp_layers=0).to_hf().items()
                              if k not in ("architectures", "model_type")})
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    prompt = torch.as_tensor(np.random.default_rng(0).integers(0, SMALL.vocab_size, (batch, PROMPT)))

    def run():
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)

    return _rate(run, batch, new_tokens)


def bench_speculative(workdir: str, new_tokens: int) -> dict | None:
    from dsv3_jax.train.loop import load_workdir

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    model, tok = load_workdir(workdir)
    prompt = np.asarray([[tok.bos_id] + tok.encode("def __init__(self")], np.int32)
    plain = _rate(lambda: model.generate(prompt, new_tokens), 1, new_tokens)
    stats = []
    spec = _rate(lambda: stats.append(speculative_generate(model, prompt, new_tokens, return_stats=True)[1]), 1,
                 new_tokens)
    return {"plain_tokens_per_s": plain, "speculative_tokens_per_s": spec, "speedup": spec / plain,
            "acceptance_rate": stats[-1].acceptance_rate, "tokens_per_forward": stats[-1].tokens_per_forward}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--workdir", default="runs/tiny", help="a dsv3 train work directory with a trained MTP module")
    args = ap.parse_args()
    model = Transformer(SMALL.replace(num_mtp_layers=0), nnx.Rngs(0))
    ours = {b: bench_dsv3(model, b, args.new_tokens) for b in (1, 8)}
    theirs = {b: bench_transformers(b, args.new_tokens) for b in (1, 8)}
    spec = bench_speculative(args.workdir, args.new_tokens)
    print(f"small preset, greedy, prompt {PROMPT} tokens, {args.new_tokens} new tokens")
    for b in (1, 8):
        print(f"  batch {b}: dsv3-jax {ours[b]:8.1f} tokens/s   transformers {theirs[b]:8.1f} tokens/s   "
              f"ratio {ours[b] / theirs[b]:.2f}x")
    if spec:
        print(f"  speculative (MTP, {args.workdir}): {spec['speculative_tokens_per_s']:.1f} vs plain "
              f"{spec['plain_tokens_per_s']:.1f} tokens/s = {spec['speedup']:.2f}x; acceptance "
              f"{spec['acceptance_rate']:.1%}, {spec['tokens_per_forward']:.2f} tokens per forward")
    else:
        print(f"  speculative: no trained run in {args.workdir} (run the README's first command)")
    if args.json:
        print(json.dumps({"dsv3_tokens_per_s": ours[1], "transformers_tokens_per_s": theirs[1],
                          "ratio": ours[1] / theirs[1], "dsv3_batch8_tokens_per_s": ours[8],
                          "transformers_batch8_tokens_per_s": theirs[8],
                          "speculative_speedup": spec and spec["speedup"],
                          "acceptance_rate": spec and spec["acceptance_rate"]}))


if __name__ == "__main__":
    main()
