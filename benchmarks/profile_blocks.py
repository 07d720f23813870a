"""Where the time of a training step or a decode step goes, per block of the model (issue 12): runs the compiled
step under `jax.profiler`, maps every XLA op it executed to the named scope of the model code it came from
(attention core and projections, router, dispatch, expert GEMMs, combine, shared experts, dense MLP, head, loss,
optimizer; forward and backward apart) and prints per block the op time per step, its share, the FLOPs the block
executes and the achieved GFLOP/s against the measured matmul peak in the compute dtype (f32 accumulation).

Op times are the summed durations of the leaf ops (the bodies of loops and conditionals, not the loops), so
they add up to the CPU time spent in XLA ops, across threads. A trace costs some time itself: compare blocks within
one run, and take step times from train_throughput.py / decode_throughput.py.

    python benchmarks/profile_blocks.py [--mode train|decode] [--preset small] [--batch 8] [--seq-len 256]
        [--steps 3] [--mtp] [--json]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig, get_preset
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.precision import PRECISION_NAMES, Precision
from dsv3_jax.train.flops import measure_peak_flops
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.train.step import StepConfig, init_state, make_train_step, split_model
from protocol import machine_state  # beside this file

# (block, pattern in the op's scope path), first match wins; the scopes are the model's jax.named_scope names
BLOCKS = (
    ("attention core", r"attention/.*core|attention\)?/core|core"),
    ("attention proj", r"attention"),
    ("router", r"router"),
    ("dispatch", r"dispatch"),
    ("expert gemms", r"expert_gemms"),
    ("combine", r"combine"),
    ("shared experts", r"shared_experts"),
    ("dense mlp", r"mlp"),
    ("mtp", r"mtp"),
    ("head", r"head"),
    ("embed", r"embed"),
    ("loss", r"loss"),
    ("optimizer", r"optimizer"),
)
_CONTAINERS = ("while", "call", "conditional", "end:", "Thunk", "Pjit", "CommonPjRt", "ParseArguments", "Slinky",
               "Threadpool", "Wait", "Handle", "DevicePut", "Allocate", "PythonRef")


def block_flops(cfg: ModelConfig, tokens: int, keys: int, decode: bool = False) -> dict[str, float]:
    """Forward FLOPs per step of each block as executed (attention over all `keys`, the causal mask applied after
    the products; routed experts over the chosen pairs only)."""
    d, h, e, k = cfg.hidden_size, cfg.num_attention_heads, cfg.n_routed_experts, cfg.num_experts_per_tok
    nope, rope, v, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q = cfg.q_lora_rank
    q_proj = d * q + q * h * (nope + rope) if q else d * h * (nope + rope)
    if decode:  # absorbed: W^UK folded into the query, W^UV into the output; attention over the latent
        proj = q_proj + d * (c + rope) + h * nope * c + h * c * v + h * v * d
        core = h * keys * (c + rope + c)
    else:
        proj = q_proj + d * (c + rope) + c * h * (nope + v) + h * v * d
        core = h * keys * (nope + rope + v)
    layers, moe = cfg.num_hidden_layers, cfg.num_moe_layers
    f = cfg.moe_intermediate_size
    return {k_: 2.0 * tokens * n for k_, n in {
        "attention core": layers * core, "attention proj": layers * proj, "router": moe * d * e,
        "expert gemms": moe * k * 3 * d * f, "shared experts": moe * cfg.n_shared_experts * 3 * d * f,
        "dense mlp": cfg.num_dense_layers * 3 * d * cfg.intermediate_size, "head": d * cfg.vocab_size}.items()}


def _op_scopes(hlo_text: str) -> dict[str, str]:
    """{instruction name: its op_name metadata} from a compiled module's text; an instruction that XLA's passes
    left without metadata (e.g. a canonicalised dot) takes the scope of its first operand that has one."""
    out: dict[str, str] = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = [^=]*?\b[\w\-]+\((.*?)\)", line)
        if not m:
            continue
        meta = re.search(r'op_name="([^"]*)"', line)
        if meta:
            out[m.group(1)] = meta.group(1)
            continue
        for operand in re.findall(r"%([\w.\-]+)", m.group(2)):
            if operand in out:
                out[m.group(1)] = out[operand]
                break
    return out


def _block_of(op_name: str) -> tuple[str, str]:
    """(block, 'forward' or 'backward') of an op from its scope path."""
    direction = "backward" if "transpose(" in op_name else "forward"
    for block, pattern in BLOCKS:
        if re.search(pattern, op_name):
            return block, direction
    return "other", direction


def profile(fn, args, steps: int, top: dict | None = None) -> dict[tuple[str, str], float]:
    """{(block, direction): op seconds per call} of the jitted `fn(*args)` traced over `steps` calls; `top`, if
    given, collects {block: Counter({(op, scope path): seconds per call})}."""
    scopes = _op_scopes(fn.lower(*args).compile().as_text())
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                out = fn(*args)
            jax.block_until_ready(out)
        path = sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))[-1]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times: collections.Counter = collections.Counter()
    for ev in events:
        name = ev.get("name", "")
        if ev.get("ph") != "X" or name.startswith("$") or name.startswith(_CONTAINERS):
            continue
        op = ev.get("args", {}).get("hlo_op", name)
        if op not in scopes:
            continue
        block = _block_of(scopes[op])
        times[block] += ev.get("dur", 0.0) * 1e-6 / steps
        if top is not None:
            top.setdefault(block[0], collections.Counter())[(op, scopes[op])] += ev.get("dur", 0.0) * 1e-6 / steps
    return dict(times)


def train_case(cfg: ModelConfig, batch: int, seq: int, unroll: bool = True, precision: str = "fp32"):
    """(jitted step function, its arguments) of one training step (AdamW, clipping, bias update) in `precision`
    (`dsv3 train --precision`), with the layer scans unrolled (`dsv3 train --unroll-layers`, as
    benchmarks/train_throughput.py measures) or not."""
    graphdef, params, bias = split_model(Transformer(cfg, nnx.Rngs(0), Precision.named(precision)))
    opt = make_optimizer(params, 1e-3, 1000)
    step = make_train_step(graphdef, opt, StepConfig(unroll_layers=unroll), donate=False)
    state = init_state(params, bias, opt)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq + 1)).astype(np.int32)
    args = step.arguments(state, jnp.asarray(windows), 0.3, 0.001, None)
    return step.jitted, args


def decode_case(cfg: ModelConfig, batch: int, seq: int, precision: str = "fp32"):
    """(jitted decode step, its arguments): one token per row at position `seq` against a cache of seq + 1, the
    model (and its cache) in `precision`."""
    from dsv3_jax.inference.decoder import Decoder, compile_step, layer_cache
    from dsv3_jax.inference.generate import _last_logits_step

    model = Transformer(cfg, nnx.Rngs(0), Precision.named(precision))
    dec = Decoder.of(model)
    step = compile_step(_last_logits_step, dec.static(), ())
    cache = layer_cache(cfg, batch, seq + 1, model.precision.compute_dtype)
    # distinct tokens: rows that all fed one token would route alike and run only K experts whatever the batch
    tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 1)).astype(np.int32)
    pos = np.full((batch, 1), seq, np.int32)
    return step, (dec.state, dec.layer_states, tok, pos, cache, np.zeros((batch,), np.int32))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("train", "decode"), default="train")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256, help="training window, or the decode position")
    ap.add_argument("--steps", type=int, default=3, help="traced steps (after one untraced)")
    ap.add_argument("--mtp", action="store_true", help="keep the preset's MTP modules (default: none)")
    ap.add_argument("--ops", metavar="BLOCK", action="append", default=[],
                    help="also list the 12 costliest ops of this block (repeatable; e.g. other)")
    ap.add_argument("--scan-layers", action="store_true", help="train: the layer scans kept (default: unrolled)")
    ap.add_argument("--precision", default="fp32", choices=PRECISION_NAMES, help="as `dsv3 train --precision`")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for name in ("batch", "seq_len", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    state = machine_state()
    cfg = get_preset(args.preset)
    cfg = cfg if args.mtp else cfg.replace(num_mtp_layers=0)
    decode = args.mode == "decode"
    fn, fargs = (decode_case(cfg, args.batch, args.seq_len, args.precision) if decode
                 else train_case(cfg, args.batch, args.seq_len, not args.scan_layers, args.precision))
    jax.block_until_ready(fn(*fargs))
    t = time.perf_counter()
    for _ in range(args.steps):
        out = fn(*fargs)
    jax.block_until_ready(out)
    step_s = (time.perf_counter() - t) / args.steps
    top: dict = {}
    times = profile(fn, fargs, args.steps, top)
    peak = measure_peak_flops(dtype=Precision.named(args.precision).compute_dtype)
    tokens = args.batch * (1 if decode else args.seq_len)
    flops = block_flops(cfg, tokens, args.seq_len + (1 if decode else 0), decode)
    total = sum(times.values())
    rows = []
    for block in [b for b, _ in BLOCKS] + ["other"]:
        fwd, bwd = times.get((block, "forward"), 0.0), times.get((block, "backward"), 0.0)
        if fwd + bwd == 0:
            continue
        fl = flops.get(block, 0.0) * (1 if decode else 3)  # backward: two products per forward product
        rows.append({"block": block, "forward_ms": fwd * 1e3, "backward_ms": bwd * 1e3, "share": (fwd + bwd) / total,
                     "gflop": fl / 1e9, "gflops": fl / (fwd + bwd) / 1e9 if fl else None,
                     "of_peak": fl / (fwd + bwd) / peak if fl else None})
    print(f"{args.mode} step, {args.preset} preset, {args.precision}, batch {args.batch} x {args.seq_len}: "
          f"{step_s * 1e3:.1f} ms per "
          f"step; XLA ops {total * 1e3:.1f} ms (summed over threads); {args.precision} matmul peak {peak / 1e9:.0f} GFLOP/s"
          + ("" if state["quiet"] else f"; BUSY machine (load {state['load_average']:.1f})"))
    print(f"  {'block':16s} {'fwd ms':>8s} {'bwd ms':>8s} {'share':>6s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for r in rows:
        g = "" if r["gflops"] is None else f"{r['gflops']:8.1f}"
        p = "" if r["of_peak"] is None else f"{r['of_peak']:8.0%}"
        print(f"  {r['block']:16s} {r['forward_ms']:8.1f} {r['backward_ms']:8.1f} {r['share']:6.0%} "
              f"{r['gflop']:7.2f} {g:>8s} {p:>8s}")
    for block in args.ops:
        print(f"  costliest ops of {block}:")
        for (op, path), sec in top.get(block, collections.Counter()).most_common(12):
            print(f"    {sec * 1e3:8.1f} ms  {op:36s} {path[-110:]}")
    if args.json:
        print(json.dumps({"mode": args.mode, "preset": args.preset, "precision": args.precision,
                          "batch": args.batch, "seq_len": args.seq_len,
                          "step_s": step_s, "op_s": total, "peak_flops": peak, "blocks": rows, **state}))


if __name__ == "__main__":
    main()
