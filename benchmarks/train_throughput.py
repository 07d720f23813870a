"""Training throughput of the `small` preset at batch 8 x 256 on this machine, side by side with transformers'
DeepseekV3ForCausalLM + torch.optim.AdamW on the identical config, in the same run.

Same work: transformers' model has no MTP module, so the headline ratio compares our step on the same config
with num_mtp_layers=0 (CE + balance loss, AdamW, clipping; identical weights count and FLOPs). Our full recipe
(with the MTP module and its loss) is measured too and reported separately.

    python benchmarks/train_throughput.py [--json] [--steps N] [--warmup N]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import SMALL
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.train.flops import measure_peak_flops, training_flops_per_token
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.train.step import StepConfig, init_state, make_train_step, split_model

BATCH, SEQ = 8, 256


def _time(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def bench_dsv3(cfg, steps: int, warmup: int, windows: np.ndarray) -> dict:
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params, bias = split_model(model)
    opt = make_optimizer(params, 1e-3, 1000)
    step = make_train_step(graphdef, opt, StepConfig())
    state = [init_state(params, bias, opt)]
    w = jnp.asarray(windows[None])

    def run():
        state[0], m = step(state[0], w, 0.3, 0.001)
        jax.block_until_ready(m.loss)

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    dt = _time(run, steps, warmup)

    # where the time goes: forward only, forward+backward, and the rest (optimizer, bias update)
    def loss_only(p, b, x):
        out = nnx.merge(graphdef, p, b).forward(x[:, :-1])
        return jnp.mean(out.logits)

    fwd = jax.jit(loss_only)
    grad = jax.jit(jax.grad(loss_only))
    p, b = state[0]["params"], state[0]["bias"]
    x = jnp.asarray(windows)
    fwd_s = _time(lambda: jax.block_until_ready(fwd(p, b, x)), steps, 1)
    grad_s = _time(lambda: jax.block_until_ready(grad(p, b, x)), steps, 1)
    return {"step_s": dt, "tokens_per_s": BATCH * SEQ / dt, "compile_s": compile_s,
            "forward_s": fwd_s, "forward_backward_s": grad_s}


def bench_transformers(cfg, steps: int, warmup: int, windows: np.ndarray) -> dict:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    hf_cfg = DeepseekV3Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.as_tensor(windows[:, :-1], dtype=torch.long)
    labels = torch.as_tensor(windows[:, 1:], dtype=torch.long)

    def run():
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    dt = _time(run, steps, warmup)
    return {"step_s": dt, "tokens_per_s": BATCH * SEQ / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    windows = np.random.default_rng(0).integers(0, SMALL.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    same = SMALL.replace(num_mtp_layers=0)
    peak = measure_peak_flops()
    ours = bench_dsv3(same, args.steps, args.warmup, windows)
    ours_mtp = bench_dsv3(SMALL, args.steps, args.warmup, windows)
    theirs = bench_transformers(same, args.steps, args.warmup, windows)
    mfu = ours["tokens_per_s"] * training_flops_per_token(same, SEQ, mtp=False) / peak
    mfu_mtp = ours_mtp["tokens_per_s"] * training_flops_per_token(SMALL, SEQ) / peak
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    print(f"small preset, batch {BATCH} x {SEQ}, {jax.devices()[0].platform}, measured f32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"  dsv3-jax (no MTP, same work): {ours['tokens_per_s']:8.0f} tokens/s  step {ours['step_s']:.3f} s  "
          f"MFU {mfu:.1%}  (compile {ours['compile_s']:.0f} s)")
    print(f"    forward {ours['forward_s']:.3f} s, forward+backward {ours['forward_backward_s']:.3f} s, "
          f"optimizer+bias+loss bookkeeping {ours['step_s'] - ours['forward_backward_s']:.3f} s")
    print(f"  dsv3-jax (full recipe, MTP):  {ours_mtp['tokens_per_s']:8.0f} tokens/s  step {ours_mtp['step_s']:.3f} s"
          f"  MFU {mfu_mtp:.1%}")
    print(f"  transformers + torch AdamW:   {theirs['tokens_per_s']:8.0f} tokens/s  step {theirs['step_s']:.3f} s")
    print(f"  ratio (same work): {ratio:.2f}x")
    if args.json:
        print(json.dumps({"dsv3_tokens_per_s": ours["tokens_per_s"], "transformers_tokens_per_s": theirs["tokens_per_s"],
                          "ratio": ratio, "mfu": mfu, "dsv3_mtp_tokens_per_s": ours_mtp["tokens_per_s"],
                          "mfu_mtp": mfu_mtp}))


if __name__ == "__main__":
    main()
