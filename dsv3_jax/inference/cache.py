"""The absorbed-MLA decoding cache (paper §2.1.1; reference §3.3): per token and layer only the normalised latent
c^KV [C] and the rotated shared key k^R [R] are kept, C + R = 576 values for DeepSeek-V3."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig


class LatentCache(NamedTuple):
    c_kv: jax.Array  # [L, B, S, C]
    k_pe: jax.Array  # [L, B, S, R]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> LatentCache:
    """A zero cache for `batch` sequences of up to `max_len` tokens over the main model's layers."""
    shape = (cfg.num_hidden_layers, batch, max_len)
    return LatentCache(jnp.zeros(shape + (cfg.kv_lora_rank,), dtype), jnp.zeros(shape + (cfg.qk_rope_head_dim,), dtype))


def cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """Bytes one token occupies in the cache, from jax.eval_shape (nothing allocated)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, 1, dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
