"""Parameter accounting from jax.eval_shape (nothing allocated): total, MTP and activated-per-token counts."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.inference.cache import cache_bytes_per_token
from dsv3_jax.model.transformer import Transformer

_ROUTED = ("w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class ModelStats:
    total_params: int  # main model: embedding, layers, final norm, head (expert biases included, as stored)
    mtp_params: int  # MTP modules without the copies of the shared embedding and head
    activated_params: int  # per token: everything but the routed experts, plus K of E routed experts per MoE layer
    kv_cache_bytes_per_token: int  # absorbed latent cache (MHA/GQA: keys and values), bf16, main-model layers
    adam_bytes_bf16: int = 0  # AdamW moments (both) of main + MTP parameters stored in bf16 (paper §3.3.3)
    adam_bytes_fp32: int = 0  # the same in float32

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def headline(self) -> dict[str, int]:
        """The four figures of `dsv3 info --json`."""
        return {k: getattr(self, k) for k in ("total_params", "activated_params", "mtp_params",
                                                 "kv_cache_bytes_per_token")}


def model_stats(cfg: ModelConfig) -> ModelStats:
    """Count parameters of `cfg` from the abstract model."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    total = mtp = routed = 0
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        n = math.prod(var.get_value().shape)
        if path[0] == "mtp":
            mtp += n
            continue
        total += n
        if path[0] == "moe_layers" and path[-2:-1] == ("ffn",) and path[-1] in _ROUTED:
            routed += n
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    activated = total - routed + (routed * k // e if e else 0)
    trainable = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    return ModelStats(total, mtp, activated, cache_bytes_per_token(cfg, jnp.bfloat16),
                      adam_bytes_bf16=2 * 2 * trainable, adam_bytes_fp32=2 * 4 * trainable)
