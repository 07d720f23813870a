"""The `dsv3` command line: `dsv3 info` (parameter and cache accounting of a config), `train`, `sft`,
`distill-data`, `grpo`, `generate`, `eval`, `plot` and `plan` (the analytic parallel-training planner of
sharding/planner.py)."""

from __future__ import annotations

import argparse
import json
import sys

from dsv3_jax.config import PRESETS, ModelConfig, get_preset


UNROLL_HELP = ("unroll the scans over the layer stacks: the same numbers, a faster step on the CPU (7%% on `small`), "
               "a compile time that grows with the depth")


def _load_config(args: argparse.Namespace) -> ModelConfig:
    if args.config:
        return ModelConfig.from_json_file(args.config)
    return get_preset(args.preset)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="deepseek-v3", choices=sorted(PRESETS), help="named architecture")
    g.add_argument("--config", help="a Hugging Face config.json")


def cmd_info(args: argparse.Namespace) -> int:
    from dsv3_jax.stats import model_stats

    cfg = _load_config(args)
    stats = model_stats(cfg)
    if args.json:
        print(json.dumps(stats.headline()))
        return 0
    name = args.config or args.preset
    print(f"model: {name}")
    print(f"  layers {cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense), hidden {cfg.hidden_size}, "
          f"heads {cfg.num_attention_heads}, vocab {cfg.vocab_size}")
    print(f"  experts: {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups, "
          f"top-{cfg.topk_group} groups) + {cfg.n_shared_experts} shared; scoring {cfg.scoring_func}"
          f"{' with bias' if cfg.expert_bias else ''}; MTP depth {cfg.num_mtp_layers}")
    print(f"  total parameters (main model):   {stats.total_params:>18,}")
    print(f"  MTP parameters (own, no copies): {stats.mtp_params:>18,}")
    print(f"  activated parameters per token:  {stats.activated_params:>18,}"
          "  (all non-routed weights incl. embedding and head, plus top-K routed experts per MoE layer)")
    print(f"  KV cache per token (bf16):       {stats.kv_cache_bytes_per_token:>18,} bytes"
          f"  ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim} values x {cfg.num_hidden_layers} layers)")
    saved = stats.adam_bytes_fp32 - stats.adam_bytes_bf16
    print(f"  AdamW moments in bf16:           {stats.adam_bytes_bf16 / 2**30:>18,.1f} GiB"
          f"  (fp32: {stats.adam_bytes_fp32 / 2**30:,.1f} GiB; saves {saved / 2**30:,.1f} GiB)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dsv3_jax.train.loop import RunArgs, TrainingInterrupted, train

    run = RunArgs(workdir=args.workdir, steps=args.steps, preset=None if args.config else args.preset,
                  config=args.config, batch=args.batch, micro_batch=args.micro_batch, seq_len=args.seq_len,
                  seed=args.seed, data=args.data, data_field=args.data_field, data_dtype=args.data_dtype,
                  corpus_bytes=args.corpus_bytes, precision=args.precision, lr=args.lr, remat=args.remat,
                  unroll_layers=args.unroll_layers, resume=args.resume, stop_at=args.stop_at,
                  save_every=args.save_every, keep=args.keep,
                  spike_factor=args.spike_factor, spike_warmup=args.spike_warmup, max_spikes=args.max_spikes,
                  prompt=args.prompt,
                  sample_tokens=args.sample_tokens, progress=not args.no_progress, mesh=args.mesh,
                  pipeline=args.pipeline, microbatches=args.microbatches, stage_layers=args.stage_layers,
                  init=args.init,
                  yarn_factor=args.yarn_factor, yarn_original_len=args.yarn_original_len, balance=args.balance,
                  balance_scope=args.balance_scope, balance_alpha=args.balance_alpha, gamma=args.gamma,
                  mtp_depth=args.mtp_depth, mtp_weight=args.mtp_weight, set=args.set, fim_rate=args.fim_rate,
                  eval_fraction=args.eval_fraction, eval_every=args.eval_every, eval_batches=args.eval_batches,
                  eval_data=args.eval_data)
    try:
        summary = train(run)
    except TrainingInterrupted:
        print("dsv3 train: interrupted; checkpoint saved, continue with --resume", file=sys.stderr)
        return 130
    first, last = summary["first_loss"], summary["last_loss"]
    if first is not None and last is not None:
        print(f"dsv3 train: steps {summary['steps_done']}, loss {first:.4f} -> {last:.4f} "
              f"({(first - last) / first:.1%} lower); metrics in {summary['workdir']}/metrics.jsonl")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from dsv3_jax.posttrain.sft import SFTArgs, default_report, sft
    from dsv3_jax.train.loop import TrainingInterrupted

    run = SFTArgs(workdir=args.workdir, init=args.init, data=args.data, steps=args.steps, epochs=args.epochs,
                  batch=args.batch, micro_batch=args.micro_batch, seq_len=args.seq_len, seed=args.seed, lr=args.lr,
                  min_lr=args.min_lr, warmup=args.warmup, precision=args.precision, remat=args.remat,
                  unroll_layers=args.unroll_layers, truncate=args.truncate, resize_vocab=args.resize_vocab,
                  gamma=args.gamma, mtp_weight=args.mtp_weight, teacher=args.teacher,
                  distill_weight=args.distill_weight, distill_temperature=args.distill_temperature,
                  resume=args.resume, stop_at=args.stop_at, save_every=args.save_every, keep=args.keep,
                  spike_factor=args.spike_factor, spike_warmup=args.spike_warmup, max_spikes=args.max_spikes,
                  progress=not args.no_progress, mesh=args.mesh)
    try:
        summary = sft(run)
    except TrainingInterrupted:
        print("dsv3 sft: interrupted; checkpoint saved, continue with --resume", file=sys.stderr)
        return 130
    if summary["first_loss"] is not None:
        print(default_report(summary))
    return 0


def cmd_distill_data(args: argparse.Namespace) -> int:
    from dsv3_jax.posttrain.distill import distill_data

    r = distill_data(args.teacher, args.prompts, args.out, samples=args.samples, temperature=args.temperature,
                     max_new_tokens=args.max_new_tokens, batch=args.batch, seed=args.seed, top_p=args.top_p)
    print(f"dsv3 distill-data: {r['written']} answers to {r['prompts']} prompts in {r['out']} "
          f"({r['truncated']} hit --max-new-tokens without <|eos|>, marked \"truncated\")")
    return 0


def cmd_grpo(args: argparse.Namespace) -> int:
    from dsv3_jax.posttrain.grpo import GRPOArgs, GRPOInterrupted, parse_task_options, run_grpo

    run = GRPOArgs(init=args.init, workdir=args.workdir, task=args.task,
                   task_options=parse_task_options(args.task_option), iterations=args.iterations,
                   prompts_per_batch=args.prompts_per_batch, group_size=args.group_size,
                   updates_per_batch=args.updates_per_batch, lr=args.lr, lr_schedule=args.lr_schedule,
                   weight_decay=args.weight_decay, clip_eps=args.clip_eps, kl_beta=args.kl_beta,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, rewards=tuple(args.reward or ()), gamma=args.gamma, mtp_weight=args.mtp_weight,
                   system=args.system, seed=args.seed, save_every=args.save_every, keep=args.keep,
                   resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress)
    try:
        summary = run_grpo(run)
    except GRPOInterrupted:
        print("dsv3 grpo: interrupted; checkpoint saved, continue with --resume", file=sys.stderr)
        return 130
    if "first_reward" in summary:
        print(f"dsv3 grpo: {summary['iterations_done']} iterations, reward {summary['first_reward']:.3f} -> "
              f"{summary['last_reward']:.3f}, accuracy {summary['first_accuracy']:.3f} -> "
              f"{summary['last_accuracy']:.3f}; metrics in {summary['workdir']}/metrics.jsonl")
    return 0


def _load_for_generation(path: str):
    """(model, tokenizer, bos id) of a work directory or released checkpoint (dsv3_jax.load)."""
    from dsv3_jax.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path)
    return model, tokenizer, tokenizer.bos_id


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    model, tokenizer, bos = _load_for_generation(args.checkpoint)
    ids = ([bos] if bos is not None else []) + tokenizer.encode(args.prompt)
    prompt = np.asarray([ids], np.int32)
    stops = [] if model.config.eos_token_id is None else [model.config.eos_token_id]
    print(args.prompt, end="", flush=True)
    generated: list[int] = []
    shown = [""]

    def stream(_, tokens):
        generated.append(int(tokens[0]))
        text = tokenizer.decode([t for t in generated if t not in stops])
        print(text[len(shown[0]):], end="", flush=True)
        shown[0] = text

    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stops)
    if args.speculative:
        from dsv3_jax.inference.speculative import speculative_generate

        out, stats = speculative_generate(model, prompt, args.max_new_tokens, return_stats=True, **kw)
        new = [int(t) for t in out[0, prompt.shape[1]:] if int(t) not in stops]
        print(tokenizer.decode(new))
        print(f"[speculative: acceptance {stats.acceptance_rate:.1%}, {stats.tokens_per_forward:.2f} tokens per "
              "forward]", file=sys.stderr)
    else:
        model.generate(prompt, args.max_new_tokens, callback=stream, **kw)
        print()
    return 0


def _load_for_eval(path: str):
    """(model, tokenizer or None, bos): a checkpoint without a tokenizer still loads (tasks as token ids)."""
    from dsv3_jax.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, tokenizer_required=False)
    return model, tokenizer, model.config.bos_token_id if tokenizer is None else tokenizer.bos_id


def _csv(cast):
    def parse(text: str):
        try:
            return tuple(cast(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {cast.__name__} values, got {text!r}")
    return parse


def cmd_eval(args: argparse.Namespace) -> int:
    from dsv3_jax.eval.cli import run_eval

    return run_eval(args, _load_for_eval)


def cmd_plot(args: argparse.Namespace) -> int:
    from dsv3_jax.train.plot import plot_run

    for path in plot_run(args.workdir):
        print(path)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from dsv3_jax.config import apply_overrides
    from sharding.mesh import MESH_AXES, parse_mesh_spec
    from sharding.planner import HARDWARE, TrainSettings, format_plan, plan

    settings = TrainSettings(global_batch=args.global_batch, seq_len=args.seq_len, micro_batch=args.micro_batch,
                             schedule=args.schedule, precision=args.precision,
                             gemm_efficiency=args.gemm_efficiency, attention_efficiency=args.attention_efficiency,
                             comm_sms=args.comm_sms, tokens=args.tokens, master_weights=args.master_weights,
                             edges=args.edges, activations=args.activations)
    cfg = _load_config(args)
    if args.set:
        cfg = apply_overrides(cfg, args.set)
    hardware = HARDWARE[args.hardware]
    if args.memory_gb is not None:
        if not args.memory_gb > 0:
            raise ValueError(f"--memory-gb must be > 0, got {args.memory_gb}")
        hardware = dataclasses.replace(hardware, hbm_gb=args.memory_gb)
    mesh = parse_mesh_spec(args.mesh, allow_auto=True)
    result = plan(cfg, mesh, hardware, settings, gpus=args.gpus)
    if not args.compile:
        print(json.dumps(result) if args.json else format_plan(result, args.config or args.preset))
        return 0
    from sharding.compile_check import compile_in_subprocess, format_compiled

    mesh_spec = ",".join(f"{a}={result[a]}" for a in MESH_AXES)
    compiled = compile_in_subprocess(
        cfg, mesh_spec, seq_len=settings.seq_len, micro_batch=settings.micro_batch,
        microbatches=result["micro_batches_per_step"], pipeline=None if result["pp"] == 1 else settings.schedule,
        precision=settings.precision, remat=args.remat)
    # compared with the planner's figure for what the code holds: the compiled precision, FP32 weights held whole,
    # the edges on every pp rank, stage activations recomputed
    estimate = plan(cfg, mesh, hardware, dataclasses.replace(settings, precision=compiled["precision"],
                                                             master_weights="whole", edges="replicated",
                                                             activations="recomputed"),
                    gpus=args.gpus)
    compiled |= {"planner_bytes": estimate["total_bytes"], "planner_state_bytes": estimate["state_bytes"],
                 "ratio": compiled["peak_bytes"] / estimate["total_bytes"],
                 "state_ratio": compiled["argument_bytes"] / estimate["state_bytes"]}
    limit = hardware.hbm_gb * 1e9
    if args.json:
        print(json.dumps(result | {"compiled": compiled}))
    else:
        print(format_plan(result, args.config or args.preset))
        print()
        print(format_compiled(compiled, limit))
    if compiled["peak_bytes"] > limit:
        print(f"dsv3 plan: the compiled step needs {compiled['peak_bytes'] / 1e9:.1f} GB per device, more than the "
              f"{hardware.hbm_gb:g} GB of the {hardware.name}", file=sys.stderr)
        return 3
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter counts and KV-cache size of a config (nothing allocated)")
    _add_model_args(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    tr = sub.add_parser("train", help="pretrain with the paper's recipe (default: tiny model on Python's sources)")
    g = tr.add_mutually_exclusive_group()
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="named architecture (default tiny)")
    g.add_argument("--config", help="a Hugging Face config.json")
    tr.add_argument("--steps", type=int, default=300, help="the run's total length; schedules scale to it")
    tr.add_argument("--workdir", default="runs/tiny", help="checkpoints, metrics and caches go here")
    tr.add_argument("--batch", type=int, default=16, help="global batch in sequences (after the ramp)")
    tr.add_argument("--micro-batch", type=int, help="sequences per gradient-accumulation micro-batch")
    tr.add_argument("--seq-len", type=int, default=128)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--data", nargs="+", help="text files, globs, .jsonl, or pre-tokenized .bin/.npy (default: "
                                              "the Python standard library's sources)")
    tr.add_argument("--data-field", default="text", help="JSONL text field")
    tr.add_argument("--data-dtype", default="uint16", choices=["uint16", "uint32"], help=".bin token dtype")
    tr.add_argument("--corpus-bytes", type=int, default=4_000_000, help="size of the default corpus subset")
    tr.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp8"],
                    help="fp8: bf16 compute with the Linear GEMMs in block-scaled FP8 (paper §3.3)")
    tr.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3 tiny, 1e-3 small, else 2.2e-4)")
    tr.add_argument("--remat", default="none", choices=["none", "paper", "full"], help="recomputation policy")
    tr.add_argument("--unroll-layers", action="store_true", help=UNROLL_HELP)
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    tr.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint, as an interruption would")
    tr.add_argument("--save-every", type=int, default=100)
    tr.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    tr.add_argument("--spike-factor", type=float, default=3.0, help="skip updates whose loss exceeds this times "
                                                                   "the running mean (0 disables)")
    tr.add_argument("--spike-warmup", type=int, default=20, help="steps before loss spikes are judged")
    tr.add_argument("--max-spikes", type=int, default=3, help="consecutive skipped updates before restoring")
    tr.add_argument("--prompt", default="def ", help="prompt of the sample printed at the end")
    tr.add_argument("--sample-tokens", type=int, default=64)
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--mesh", help="device mesh, e.g. dp=2,ep=4 (axes pp, dp, ep, tp; sizes multiply to the device "
                                   "count; default: every device on dp)")
    from sharding.pipeline import SCHEDULES as PIPELINE_SCHEDULES

    tr.add_argument("--pipeline", choices=PIPELINE_SCHEDULES, help="pipeline schedule over the mesh's pp axis (required "
                                                          "when pp > 1)")
    tr.add_argument("--microbatches", type=int, help="pipeline micro-batches per --micro-batch (default 2 * pp)")
    tr.add_argument("--stage-layers", help="transformer layers per pipeline stage, e.g. 4,4,3 (the first stage's count "
                                           "includes the dense layers; default: balanced by a FLOP cost model)")
    tr.add_argument("--init", help="continue pretraining from this work directory or released-format checkpoint "
                                   "(its config and tokenizer; paper §4.3 recipe: constant LR = the run's peak x "
                                   "7.3e-6/2.2e-4 unless --lr, fixed batch, MTP weight 0.1, bias speed 0)")
    tr.add_argument("--yarn-factor", type=float, help="with --init: context extension, rope switched to YaRN with "
                                                      "this scale factor (beta 32/1, mscale 1)")
    tr.add_argument("--yarn-original-len", type=int, help="YaRN's original length (default: the --init run's "
                                                          "--seq-len)")
    sw = tr.add_argument_group("research switches")
    sw.add_argument("--balance", default="aux-free", choices=["aux-free", "aux-loss", "none"],
                    help="load balancing: the bias rule plus a small sequence-wise loss (alpha 1e-4; paper), a "
                         "conventional auxiliary loss without bias (alpha 1e-3), or none")
    sw.add_argument("--balance-scope", default="sequence", choices=["sequence", "batch"],
                    help="balance term per sequence (eqs. 17-20) or over the batch's tokens (paper §4.5.3)")
    sw.add_argument("--balance-alpha", type=float, help="balance-loss weight (overrides the strategy's default)")
    sw.add_argument("--gamma", type=float, help="constant expert-bias update speed (default: 0.001 then 0)")
    sw.add_argument("--mtp-depth", type=int, help="number of MTP modules (0 turns MTP off; default: the config's)")
    sw.add_argument("--mtp-weight", type=float, help="constant MTP loss weight (default: 0.3 then 0.1)")
    sw.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override ModelConfig fields, e.g. --set n_group=1 "
                                                                 "topk_group=1 num_experts_per_tok=2")
    sw.add_argument("--fim-rate", type=float, default=0.1, help="fill-in-the-middle rate of text documents "
                                                                "(paper §4.1: 0.1; 0 turns it off)")
    sw.add_argument("--eval-fraction", type=float, default=0.01, help="whole documents held out from training for "
                                                                      "validation (0: none)")
    sw.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps and at the end, "
                                                              "rows in WORKDIR/eval.jsonl (0: off)")
    sw.add_argument("--eval-batches", type=int, default=4, help="micro-batches per evaluated set")
    sw.add_argument("--eval-data", nargs="+", metavar="NAME=PATH", help="extra evaluation sets (per-domain CE and "
                                                                        "expert loads), tokenised with the run's "
                                                                        "tokenizer")
    tr.set_defaults(func=cmd_train)

    st = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL (paper §5.1), optionally distilling a "
                                    "teacher's logits")
    st.add_argument("--init", required=True, help="a dsv3 train/sft work directory or a released-format checkpoint "
                                                  "(config.json + safetensors + tokenizer.json)")
    st.add_argument("--data", nargs="+", required=True, help='chat JSONL files: {"messages": [{"role", "content"}]}')
    st.add_argument("--workdir", default="runs/sft")
    length = st.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: --epochs)")
    length.add_argument("--epochs", type=float, help="passes over the packed rows (default 2, the paper's)")
    st.add_argument("--batch", type=int, default=16, help="packed rows per step")
    st.add_argument("--micro-batch", type=int, help="rows per gradient-accumulation micro-batch")
    st.add_argument("--seq-len", type=int, default=128, help="row length (rows hold seq-len + 1 tokens)")
    st.add_argument("--seed", type=int, default=0, help="conversation shuffle and per-epoch row order")
    st.add_argument("--lr", type=float, default=5e-6, help="peak LR of the cosine (paper: 5e-6)")
    st.add_argument("--min-lr", type=float, default=1e-6, help="LR at the last step (paper: 1e-6)")
    st.add_argument("--warmup", type=int, default=0, help="linear warmup steps before the cosine")
    st.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp8"])
    st.add_argument("--remat", default="none", choices=["none", "paper", "full"])
    st.add_argument("--unroll-layers", action="store_true", help=UNROLL_HELP)
    st.add_argument("--truncate", action="store_true", help="cut conversations longer than a row (counted) instead "
                                                            "of failing")
    st.add_argument("--resize-vocab", action="store_true", help="grow the embedding and head (new rows: the mean) "
                                                                "when the role tokens need ids past vocab_size")
    st.add_argument("--gamma", type=float, default=0.0, help="expert-bias update speed (default 0: frozen)")
    st.add_argument("--mtp-weight", type=float, default=0.1, help="MTP loss weight (0 turns the term off)")
    st.add_argument("--teacher", help="logit distillation: a checkpoint with the same vocabulary")
    st.add_argument("--distill-weight", type=float, default=0.0, help="w in (1-w) CE + w tau^2 KL(teacher||student)")
    st.add_argument("--distill-temperature", type=float, default=1.0, help="tau")
    st.add_argument("--resume", action="store_true")
    st.add_argument("--stop-at", type=int)
    st.add_argument("--save-every", type=int, default=100)
    st.add_argument("--keep", type=int, default=3)
    st.add_argument("--spike-factor", type=float, default=3.0)
    st.add_argument("--spike-warmup", type=int, default=20)
    st.add_argument("--max-spikes", type=int, default=3)
    st.add_argument("--no-progress", action="store_true")
    st.add_argument("--mesh", help="device mesh as for train (dp, ep, tp; sft has no --pipeline)")
    st.set_defaults(func=cmd_sft)

    dd = sub.add_parser("distill-data", help="a teacher's sampled answers to prompts, as chat JSONL for dsv3 sft")
    dd.add_argument("--teacher", required=True, help="work directory or released-format checkpoint")
    dd.add_argument("--prompts", required=True, help='JSONL: {"prompt": ...} or {"messages": [... user turn]}')
    dd.add_argument("--out", required=True)
    dd.add_argument("--samples", type=int, default=1, help="answers per prompt")
    dd.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    dd.add_argument("--top-p", type=float)
    dd.add_argument("--max-new-tokens", type=int, default=256)
    dd.add_argument("--batch", type=int, default=8, help="sequences generated together")
    dd.add_argument("--seed", type=int, default=0)
    dd.set_defaults(func=cmd_distill_data)

    gen = sub.add_parser("generate", help="generate text from a released-format checkpoint or a training workdir")
    gen.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + safetensors + "
                                                         "tokenizer.json) or a `dsv3 train` work directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--speculative", action="store_true", help="draft with the MTP module (paper §5.4.3)")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="evaluate a checkpoint: multiple choice, generation, code pass@k, perplexity, "
                                     "passkey retrieval")
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + safetensors [+ "
                                                        "tokenizer.json]) or a `dsv3 train` work directory")
    ev.add_argument("--task", action="append", required=True, help="FILE.jsonl or builtin:NAME (passkey, addition, "
                                                                   "sorting, countdown); repeatable")
    ev.add_argument("--kind", choices=["multiple_choice", "generate", "code", "perplexity"],
                    help="kind of the JSONL tasks (default: from their fields)")
    ev.add_argument("--limit", type=int, help="first N examples of each task")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-new-tokens", type=int, default=64, help="generation and code tasks")
    ev.add_argument("--chat", action="store_true", help="generation prompts as a user turn of the chat template "
                    "(models after dsv3 sft / dsv3 grpo)")
    ev.add_argument("--top-k", type=int, help="code sampling")
    ev.add_argument("--top-p", type=float, help="code sampling")
    ev.add_argument("--samples", type=int, default=1, help="code samples per problem (n of pass@k)")
    ev.add_argument("--temperature", type=float, help="code sampling temperature (default 0 for one sample, else "
                                                      "0.8); generation tasks are greedy")
    ev.add_argument("--pass-k", type=_csv(int), default=(1, 10, 100), help="k values of pass@k (those <= --samples)")
    ev.add_argument("--timeout", type=float, default=5.0, help="seconds per code program")
    ev.add_argument("--ppl-window", type=int, help="perplexity window in tokens (default: the model's context)")
    ev.add_argument("--ppl-stride", type=int, help="perplexity stride (default: the window, disjoint chunks)")
    ev.add_argument("--lengths", type=_csv(int), default=(64, 128, 256), help="passkey prompt lengths in tokens")
    ev.add_argument("--depths", type=_csv(float), default=(0.1, 0.5, 0.9), help="passkey depths in [0, 1]")
    ev.add_argument("--trials", type=int, default=5, help="passkey prompts per length x depth")
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    ev.add_argument("--dump-scores", help="write per-example scores to this JSONL file")
    ev.set_defaults(func=cmd_eval)

    _add_grpo_parser(sub)

    from sharding.planner import ACTIVATIONS, EDGES, HARDWARE, MASTER_WEIGHTS, SCHEDULES, TrainSettings

    d = TrainSettings()
    pn = sub.add_parser("plan", help="analytic memory and step-time estimate of a parallel training setup, next to "
                                     "the paper's GPU-hours")
    _add_model_args(pn)
    pn.add_argument("--mesh", default="pp=16,dp=2,ep=64", help="AXIS=SIZE,... over pp, dp, ep, tp; one size may be "
                                                              "'auto' (needs --gpus). Default: the paper's layout")
    pn.add_argument("--gpus", type=int, help="GPU count the mesh must multiply to (default: the mesh's product)")
    pn.add_argument("--hardware", default="h800", choices=sorted(HARDWARE))
    pn.add_argument("--global-batch", type=int, default=d.global_batch, help="sequences per step")
    pn.add_argument("--seq-len", type=int, default=d.seq_len)
    pn.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per micro-batch per rank")
    pn.add_argument("--schedule", "--pipeline", dest="schedule", default=d.schedule, choices=SCHEDULES,
                    help="pipeline schedule (pp > 1)")
    pn.add_argument("--precision", default=d.precision, choices=["fp8", "bf16"], help="GEMM precision")
    pn.add_argument("--gemm-efficiency", type=float, default=d.gemm_efficiency,
                    help="achieved fraction of the dense GEMM peak")
    pn.add_argument("--attention-efficiency", type=float, default=d.attention_efficiency,
                    help="achieved fraction of the BF16 peak in attention kernels")
    pn.add_argument("--comm-sms", type=int, default=d.comm_sms, help="SMs reserved for the overlapped all-to-all")
    pn.add_argument("--tokens", type=float, default=d.tokens, help="pre-training tokens")
    pn.add_argument("--json", action="store_true", help="print one JSON object")
    pn.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override ModelConfig fields, e.g. --set "
                                                                 "num_hidden_layers=64 first_k_dense_replace=0")
    pn.add_argument("--master-weights", default=d.master_weights, choices=MASTER_WEIGHTS,
                    help="sharded: the paper's ZeRO-1 (BF16 weights, FP32 master sharded); whole: this code's "
                         "(FP32 weights held whole, moments sharded)")
    pn.add_argument("--edges", default=d.edges, choices=EDGES,
                    help="where embedding, dense blocks, MTP and head live under pp: own: on their stages' ranks "
                         "(the paper); replicated: on every pp rank (this code's pipeline state)")
    pn.add_argument("--activations", default=d.activations, choices=ACTIVATIONS,
                    help="what a pipeline stage keeps for its backward: kept: each chunk in flight its activations "
                         "(the paper); recomputed: each micro-batch in flight its stage input and output gradient, "
                         "the stage forward recomputed in the backward (this code's executor)")
    pn.add_argument("--memory-gb", type=float, help="device memory in GB (default: the hardware's)")
    pn.add_argument("--compile", action="store_true",
                    help="also lower and compile the real train step for the mesh on as many fake CPU devices "
                         "(a subprocess; nothing allocated) and print XLA's per-device memory beside the "
                         "estimate; exit 3 when it exceeds the device memory")
    pn.add_argument("--remat", default="paper", choices=["none", "paper", "full"],
                    help="recomputation policy of the compiled step (default: the paper's)")
    pn.set_defaults(func=cmd_plan)

    pl = sub.add_parser("plot", help="PNG plots of loss, MaxVio and throughput from a run's metrics.jsonl")
    pl.add_argument("workdir")
    pl.set_defaults(func=cmd_plot)
    return parser


def _add_grpo_parser(sub) -> None:
    gr = sub.add_parser("grpo", help="GRPO (paper §5.2.2) with rule rewards on built-in verifiable tasks or JSONL")
    gr.add_argument("--init", required=True, help="policy and reference: a dsv3 train/sft work directory or a "
                                                  "released-format checkpoint with tokenizer.json")
    gr.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and events.jsonl go here")
    gr.add_argument("--task", default="builtin:addition", help="builtin:addition|sorting|countdown or a JSONL "
                                                               "file of {\"prompt\", \"answer\"} lines")
    gr.add_argument("--task-option", action="append", metavar="KEY=INT",
                    help="built-in task option, repeatable (addition: digits; sorting: length, digits; "
                         "countdown: count, max_number)")
    gr.add_argument("--iterations", type=int, default=100)
    gr.add_argument("--prompts-per-batch", type=int, default=8)
    gr.add_argument("--group-size", type=int, default=8, help="G samples per prompt")
    gr.add_argument("--updates-per-batch", type=int, default=1, help="mu: gradient steps per batch of samples")
    gr.add_argument("--lr", type=float, default=1e-5)
    gr.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    gr.add_argument("--weight-decay", type=float, default=0.0)
    gr.add_argument("--clip-eps", type=float, default=0.2)
    gr.add_argument("--kl-beta", type=float, default=0.04)
    gr.add_argument("--max-new-tokens", type=int, default=32)
    gr.add_argument("--temperature", type=float, default=1.0)
    gr.add_argument("--top-k", type=int)
    gr.add_argument("--top-p", type=float)
    gr.add_argument("--reward", action="append", metavar="NAME=WEIGHT",
                    help="rule reward and weight, repeatable (exact, format; default exact=1.0 format=0.1)")
    gr.add_argument("--gamma", type=float, default=0.0, help="expert-bias update speed (0: bias frozen)")
    gr.add_argument("--mtp-weight", type=float, default=0.0, help="MTP loss weight on completions (0: MTP "
                                                                   "not trained)")
    gr.add_argument("--system", help="system message of every prompt")
    gr.add_argument("--seed", type=int, default=0)
    gr.add_argument("--save-every", type=int, default=50, help="checkpoint every this many iterations")
    gr.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    gr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    gr.add_argument("--stop-at", type=int, help="stop after this iteration with a checkpoint, as an interruption "
                                                "would")
    gr.add_argument("--no-progress", action="store_true")
    gr.set_defaults(func=cmd_grpo)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
