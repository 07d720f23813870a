"""Training throughput of the `small` preset at batch 8 x 256 on this machine, side by side with transformers'
DeepseekV3ForCausalLM + torch.optim.AdamW on the identical config, in the same run, in two precisions.

Same work: transformers' model has no MTP module, so the headline ratio compares our step on the same config
with num_mtp_layers=0 (CE + balance loss, AdamW, clipping; identical weights count and FLOPs). Our full recipe
(with the MTP module and its loss) is measured too and reported separately. Precisions: fp32 (everything in
float32 on both sides) and bf16 (float32 master weights and optimizer, bfloat16 matmuls with float32
accumulation: our `--precision bf16`, and transformers' forward under `torch.autocast("cpu", torch.bfloat16)`,
PyTorch's mixed-precision recipe). The fp32 figures keep the plain keys, the bf16 ones are prefixed `bf16_`.

Protocol (benchmarks/protocol.py): the load average is checked first, the three are run interleaved, each
--repeats times, and every figure is the median over the repeats (with min and max).

    python benchmarks/train_throughput.py [--json] [--steps N] [--warmup N] [--repeats N] [--preset P]
        [--batch B] [--seq-len T] [--precision fp32|bf16|both]
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

from dsv3_jax.config import get_preset
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.precision import Precision
from dsv3_jax.train.flops import measure_peak_flops, training_flops_per_token
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.train.step import StepConfig, init_state, make_train_step, split_model
from protocol import add_repeats_arg, check_repeats, header, interleave, machine_state, summarize  # beside this file


def _time(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def prepare_dsv3(cfg, steps: int, warmup: int, windows: np.ndarray, breakdown: bool = False, unroll: bool = True,
                 precision: str = "fp32"):
    """(compile seconds, run) for our train step (`unroll`: StepConfig.unroll_layers, `dsv3 train
    --unroll-layers`; `precision`: `dsv3 train --precision`); run() times ``steps`` steps after ``warmup`` and
    returns {"step_s", "tokens_per_s"} (with ``breakdown``, also "forward_s" and "forward_backward_s")."""
    model = Transformer(cfg, nnx.Rngs(0), Precision.named(precision))
    graphdef, params, bias = split_model(model)
    opt = make_optimizer(params, 1e-3, 1000)
    step = make_train_step(graphdef, opt, StepConfig(unroll_layers=unroll))
    state = [init_state(params, bias, opt)]
    w = jnp.asarray(windows[None])
    tokens = windows.shape[0] * (windows.shape[1] - 1)

    def one_step():
        state[0], m = step(state[0], w, 0.3, 0.001)
        jax.block_until_ready(m.loss)

    t0 = time.perf_counter()
    one_step()
    compile_s = time.perf_counter() - t0

    # where the time goes: forward only, forward+backward, and the rest (optimizer, bias update)
    def loss_only(p, b, x):
        out = nnx.merge(graphdef, p, b).forward(x[:, :-1], unroll=unroll)
        return jnp.mean(out.logits)

    fwd = jax.jit(loss_only)
    grad = jax.jit(jax.grad(loss_only))
    x = jnp.asarray(windows)

    def run() -> dict:
        dt = _time(one_step, steps, warmup)
        row = {"step_s": dt, "tokens_per_s": tokens / dt}
        if breakdown:
            p, b = state[0]["params"], state[0]["bias"]
            row["forward_s"] = _time(lambda: jax.block_until_ready(fwd(p, b, x)), steps, 1)
            row["forward_backward_s"] = _time(lambda: jax.block_until_ready(grad(p, b, x)), steps, 1)
        return row

    return compile_s, run


def prepare_transformers(cfg, steps: int, warmup: int, windows: np.ndarray, bf16: bool = False):
    """run() for transformers' model + torch AdamW on the same config: {"step_s", "tokens_per_s"}; `bf16`: the
    forward and the loss under torch.autocast(bfloat16) (float32 weights, gradients and AdamW)."""
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
    tokens = ids.numel()

    def one_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def run() -> dict:
        dt = _time(one_step, steps, warmup)
        return {"step_s": dt, "tokens_per_s": tokens / dt}

    return run


def _fmt(s: dict, key: str, spec: str) -> str:
    """"median [min-max]" of one summarised figure."""
    return f"{s[key]:{spec}} [{s[key + '_min']:{spec}}-{s[key + '_max']:{spec}}]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each run")
    ap.add_argument("--preset", default="small", help="model preset (small; tiny for a quick check)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both",
                    help="fp32, bf16 (mixed precision on both sides), or both (default)")
    ap.add_argument("--scan-layers", action="store_true",
                    help="our step with the layer scans (the default of `dsv3 train`) instead of unrolled layers "
                         "(`dsv3 train --unroll-layers`, the faster one on the CPU)")
    add_repeats_arg(ap)
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "seq_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    check_repeats(args.repeats)
    state = machine_state()
    full = get_preset(args.preset)
    batch, seq = args.batch, args.seq_len
    windows = np.random.default_rng(0).integers(0, full.vocab_size, (batch, seq + 1)).astype(np.int32)
    same = full.replace(num_mtp_layers=0)
    unroll = not args.scan_layers
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    prefix = {"fp32": "", "bf16": "bf16_"}
    peaks = {p: measure_peak_flops(dtype=Precision.named(p).compute_dtype) for p in precisions}
    runners, compile_s = {}, {}
    for p in precisions:
        compile_s[p], runners[prefix[p] + "dsv3"] = prepare_dsv3(same, args.steps, args.warmup, windows,
                                                                 breakdown=True, unroll=unroll, precision=p)
        _, runners[prefix[p] + "dsv3_mtp"] = prepare_dsv3(full, args.steps, args.warmup, windows, unroll=unroll,
                                                          precision=p)
        runners[prefix[p] + "transformers"] = prepare_transformers(same, args.steps, args.warmup, windows,
                                                                   bf16=p == "bf16")
    runs = interleave(runners, args.repeats)
    flops, flops_mtp = training_flops_per_token(same, seq, mtp=False), training_flops_per_token(full, seq)
    s, extra = {}, {}
    print(f"{args.preset} preset, batch {batch} x {seq}, {jax.devices()[0].platform}; " + header(state, args.repeats))
    for p in precisions:
        x = prefix[p]
        rows = [{"dsv3_tokens_per_s": a["tokens_per_s"], "transformers_tokens_per_s": c["tokens_per_s"],
                 "ratio": a["tokens_per_s"] / c["tokens_per_s"], "mfu": a["tokens_per_s"] * flops / peaks[p],
                 "dsv3_mtp_tokens_per_s": b["tokens_per_s"], "mfu_mtp": b["tokens_per_s"] * flops_mtp / peaks[p],
                 "dsv3_step_s": a["step_s"], "dsv3_forward_s": a["forward_s"],
                 "dsv3_forward_backward_s": a["forward_backward_s"], "transformers_step_s": c["step_s"]}
                for a, b, c in zip(runs[x + "dsv3"], runs[x + "dsv3_mtp"], runs[x + "transformers"])]
        r = summarize(rows)
        s.update({x + k: v for k, v in r.items()})
        extra.update({f"{x}compile_s": compile_s[p], f"{x}peak_flops": peaks[p]})
        torch_side = "torch AdamW, autocast bf16" if p == "bf16" else "torch AdamW"
        print(f" {p}: measured matmul peak {peaks[p] / 1e9:.0f} GFLOP/s")
        print(f"  dsv3-jax (no MTP, same work, layers {'unrolled' if unroll else 'scanned'}): "
              f"{_fmt(r, 'dsv3_tokens_per_s', '.0f')} tokens/s  step {r['dsv3_step_s']:.3f} s  MFU {r['mfu']:.1%}  "
              f"(compile {compile_s[p]:.0f} s)")
        print(f"    forward {r['dsv3_forward_s']:.3f} s, forward+backward {r['dsv3_forward_backward_s']:.3f} s, "
              f"optimizer+bias+loss bookkeeping {r['dsv3_step_s'] - r['dsv3_forward_backward_s']:.3f} s")
        print(f"  dsv3-jax (full recipe, MTP):  {_fmt(r, 'dsv3_mtp_tokens_per_s', '.0f')} tokens/s  MFU "
              f"{r['mfu_mtp']:.1%}")
        print(f"  transformers + {torch_side}: {_fmt(r, 'transformers_tokens_per_s', '.0f')} tokens/s  step "
              f"{r['transformers_step_s']:.3f} s")
        print(f"  ratio (same work, {p}): {_fmt(r, 'ratio', '.2f')}x")
    if args.json:
        print(json.dumps({**s, **extra, "preset": args.preset, "batch": batch, "seq_len": seq, "steps": args.steps,
                          "repeats": args.repeats, "unroll_layers": unroll, "precisions": list(precisions),
                          **state}))


if __name__ == "__main__":
    main()
