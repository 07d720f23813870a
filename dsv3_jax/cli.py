"""The `dsv3` command line: `dsv3 info` (parameter and cache accounting of a config)."""

from __future__ import annotations

import argparse
import json
import sys

from dsv3_jax.config import PRESETS, ModelConfig, get_preset


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
        print(json.dumps(stats.as_dict()))
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter counts and KV-cache size of a config (nothing allocated)")
    _add_model_args(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
