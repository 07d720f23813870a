"""The absorbed-MLA decoding cache (paper §2.1.1; reference §3.3): per token and layer only the normalised latent
c^KV [C] and the rotated shared key k^R [R] are kept, C + R = 576 values for DeepSeek-V3. Models with MHA/GQA
attention (ModelConfig.attention) keep rotated keys and values instead, [G, K] each per token and layer."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig


class LatentCache(NamedTuple):
    c_kv: jax.Array  # [L, B, S, C]
    k_pe: jax.Array  # [L, B, S, R]


class KVCache(NamedTuple):
    """The MHA/GQA cache: the same two-field form as LatentCache, so the decoder handles both alike."""

    k: jax.Array  # [L, B, S, G, K] rotated keys
    v: jax.Array  # [L, B, S, G, K] values


def cache_layout(cfg: ModelConfig) -> tuple[type, tuple[int, ...], tuple[int, ...]]:
    """The cache type of cfg.attention and the per-token shapes of its two fields."""
    if cfg.attention == "mla":
        return LatentCache, (cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)
    per_token = (cfg.kv_heads, cfg.attn_head_dim)
    return KVCache, per_token, per_token


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> LatentCache | KVCache:
    """A zero cache for `batch` sequences of up to `max_len` tokens over the main model's layers."""
    kind, a, b = cache_layout(cfg)
    shape = (cfg.num_hidden_layers, batch, max_len)
    return kind(jnp.zeros(shape + a, dtype), jnp.zeros(shape + b, dtype))


def cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """Bytes one token occupies in the cache, from jax.eval_shape (nothing allocated)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, 1, dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
