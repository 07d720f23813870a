"""Decode throughput on the `small` preset at batch 1 and batch 8, side by side with transformers' generate on the
identical config (random weights, greedy, same prompt and token count), in the same run; and speculative vs plain
decoding on a model whose MTP module was trained (a `dsv3 train` work directory, e.g. the tiny pretraining run).

Protocol (benchmarks/protocol.py): the load average is checked first, the implementations are run interleaved,
each --repeats times, and every figure is the median over the repeats (with min and max).

    python benchmarks/decode_throughput.py [--json] [--new-tokens N] [--repeats N] [--preset P] [--workdir runs/tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from flax import nnx

from dsv3_jax.config import get_preset
from dsv3_jax.inference.speculative import speculative_generate
from dsv3_jax.model.transformer import Transformer
from protocol import add_repeats_arg, check_repeats, header, interleave, machine_state, summarize  # beside this file

PROMPT = 32
BATCHES = (1, 8)


def _timed(fn, tokens: int) -> dict:
    """{"tokens_per_s", "cpu_tokens_per_s"} of one call of fn generating ``tokens`` tokens in all: per second of
    wall time and per second of this process's CPU time (steadier than wall time on a shared machine)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return {"tokens_per_s": tokens / (time.perf_counter() - t), "cpu_tokens_per_s": tokens / (time.process_time() - c)}


def prepare_dsv3(model, batch: int, new_tokens: int):
    """run() for greedy decoding with our model (compiled and warmed up here)."""
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, PROMPT)).astype(np.int32)
    model.generate(prompt, new_tokens)  # compile / warm up
    return lambda: _timed(lambda: model.generate(prompt, new_tokens), batch * new_tokens)


def prepare_transformers(cfg, batches, new_tokens: int) -> dict:
    """{batch: run()} for transformers' greedy generate on the same config (one model, warmed up here)."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    hf_cfg = DeepseekV3Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")})
    model = DeepseekV3ForCausalLM(hf_cfg).float().eval()
    runs = {}
    for batch in batches:
        prompt = torch.as_tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, PROMPT)))

        def gen(prompt=prompt):
            with torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)

        gen()  # warm up
        runs[batch] = lambda gen=gen, batch=batch: _timed(gen, batch * new_tokens)
    return runs


def prepare_speculative(workdir: str, new_tokens: int) -> dict | None:
    """{"plain": run(), "speculative": run()} on a trained work directory's model, or None without one."""
    from dsv3_jax.train.loop import load_workdir

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    model, tok = load_workdir(workdir)
    prompt = np.asarray([[tok.bos_id] + tok.encode("def __init__(self")], np.int32)
    model.generate(prompt, new_tokens)
    speculative_generate(model, prompt, new_tokens, return_stats=True)

    def speculative() -> dict:
        stats = []
        row = _timed(lambda: stats.append(speculative_generate(model, prompt, new_tokens, return_stats=True)[1]),
                     new_tokens)
        return row | {"acceptance_rate": stats[-1].acceptance_rate, "tokens_per_forward": stats[-1].tokens_per_forward}

    return {"plain": lambda: _timed(lambda: model.generate(prompt, new_tokens), new_tokens),
            "speculative": speculative}


def _fmt(s: dict, key: str, spec: str = ".1f") -> str:
    """"median [min-max]" of one summarised figure."""
    return f"{s[key]:{spec}} [{s[key + '_min']:{spec}}-{s[key + '_max']:{spec}}]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--preset", default="small", help="model preset (small; tiny for a quick check)")
    ap.add_argument("--workdir", default="runs/tiny", help="a dsv3 train work directory with a trained MTP module")
    ap.add_argument("--speculative-only", action="store_true",
                    help="only speculative vs plain decoding on --workdir's model (no transformers comparison)")
    add_repeats_arg(ap)
    args = ap.parse_args(argv)
    if args.new_tokens < 1:
        ap.error(f"--new-tokens must be positive, got {args.new_tokens}")
    check_repeats(args.repeats)
    state = machine_state()
    runners = {}
    batches = () if args.speculative_only else BATCHES
    if batches:
        cfg = get_preset(args.preset).replace(num_mtp_layers=0)
        model = Transformer(cfg, nnx.Rngs(0))
        theirs = prepare_transformers(cfg, batches, args.new_tokens)
    for b in batches:
        runners[f"dsv3_{b}"] = prepare_dsv3(model, b, args.new_tokens)
        runners[f"transformers_{b}"] = theirs[b]
    spec = prepare_speculative(args.workdir, args.new_tokens)
    if spec is None and args.speculative_only:
        raise FileNotFoundError(f"--speculative-only: no trained run in {args.workdir} (no checkpoints/ there; "
                                "run the README's first command)")
    runners.update(spec or {})
    runs = interleave(runners, args.repeats)
    rows = []
    for r in range(args.repeats):
        row = {}
        if batches:
            ours = {b: runs[f"dsv3_{b}"][r]["tokens_per_s"] for b in BATCHES}
            hf = {b: runs[f"transformers_{b}"][r]["tokens_per_s"] for b in BATCHES}
            row = {"dsv3_tokens_per_s": ours[1], "transformers_tokens_per_s": hf[1], "ratio": ours[1] / hf[1],
                   "dsv3_batch8_tokens_per_s": ours[8], "transformers_batch8_tokens_per_s": hf[8],
                   "ratio_batch8": ours[8] / hf[8]}
        row.update(speculative_speedup=None, speculative_speedup_cpu=None, acceptance_rate=None,
                   plain_tokens_per_s=None, speculative_tokens_per_s=None, tokens_per_forward=None)
        if spec:
            plain, fast = runs["plain"][r], runs["speculative"][r]
            row.update(speculative_speedup=fast["tokens_per_s"] / plain["tokens_per_s"],
                       speculative_speedup_cpu=fast["cpu_tokens_per_s"] / plain["cpu_tokens_per_s"],
                       acceptance_rate=fast["acceptance_rate"], plain_tokens_per_s=plain["tokens_per_s"],
                       speculative_tokens_per_s=fast["tokens_per_s"], tokens_per_forward=fast["tokens_per_forward"])
        rows.append(row)
    s = summarize(rows)
    print(f"{args.preset} preset, greedy, prompt {PROMPT} tokens, {args.new_tokens} new tokens; "
          + header(state, args.repeats))
    for b, suffix in ((1, ""), (8, "_batch8")) if batches else ():
        key = "dsv3_tokens_per_s" if b == 1 else "dsv3_batch8_tokens_per_s"
        print(f"  batch {b}: dsv3-jax {_fmt(s, key)} tokens/s   transformers "
              f"{_fmt(s, key.replace('dsv3', 'transformers'))} tokens/s   ratio {_fmt(s, 'ratio' + suffix, '.2f')}x")
    if spec:
        print(f"  speculative (MTP, {args.workdir}): {_fmt(s, 'speculative_tokens_per_s')} vs plain "
              f"{_fmt(s, 'plain_tokens_per_s')} tokens/s = {_fmt(s, 'speculative_speedup', '.2f')}x (CPU time: "
              f"{_fmt(s, 'speculative_speedup_cpu', '.2f')}x); acceptance "
              f"{s['acceptance_rate']:.1%}, {s['tokens_per_forward']:.2f} tokens per forward")
    else:
        print(f"  speculative: no trained run in {args.workdir} (run the README's first command)")
    if args.json:
        print(json.dumps({**s, "preset": args.preset, "new_tokens": args.new_tokens, "repeats": args.repeats,
                          **state}))


if __name__ == "__main__":
    main()
