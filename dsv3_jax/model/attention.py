"""Standard multi-head (MHA) and grouped-query (GQA) attention, the baselines MLA is measured against (paper
§2.1.1: MLA's KV cache against MHA's, "while maintaining comparable performance"; DeepSeek-V2 §2.1 compares
MHA, GQA and MQA). Selected by ModelConfig.attention; MHA is GQA with G = H.

Dimension letters: B batch, T query tokens, S key tokens, D model, H query heads, G key/value heads (groups of
H/G query heads share one), K head dim (cfg.attn_head_dim; values have the same width).

q = x W^Q, k = x W^K, v = x W^V; RoPE (the model's rope config, YaRN included) rotates the whole query and key
head; o = softmax(q.k^T * scale) v W^O with the mask MLA takes. The decoding cache keeps the rotated keys and the
values, [B, S, G, K] each: 2 G K values per token and layer, against MLA's C + R.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import fp8_dense
from dsv3_jax.model.dense import dense
from dsv3_jax.model.mla import masked_softmax
from dsv3_jax.model.params import param, values
from dsv3_jax.model.rope import apply_rope, softmax_scale

Params = dict[str, jax.Array]


def gqa_qkv(p: Params, x_BTD: jax.Array, cos_BTK: jax.Array, sin_BTK: jax.Array, fp8: bool = False):
    """Rotated queries q [B,T,H,K], rotated keys k [B,T,G,K] and values v [B,T,G,K]."""
    def proj(name):
        return fp8_dense(x_BTD, p[name]) if fp8 else dense(x_BTD, p[name])

    q_BTHK, k_BTGK, v_BTGK = proj("wq"), proj("wk"), proj("wv")
    cos, sin = cos_BTK[:, :, None, :], sin_BTK[:, :, None, :]
    return apply_rope(q_BTHK, cos, sin), apply_rope(k_BTGK, cos, sin), v_BTGK


def attend_grouped(q_BTHK, k_BSGK, v_BSGK, mask_BTS, scale: float) -> jax.Array:
    """softmax(q.k * scale) . v with query head h reading key/value head h // (H/G) -> o [B,T,H,K]."""
    b, t, h, k = q_BTHK.shape
    g = k_BSGK.shape[2]
    # head-major batched matmuls (as mla_naive: faster than token-major einsums on the CPU)
    q_BGRTK = q_BTHK.reshape(b, t, g, h // g, k).transpose(0, 2, 3, 1, 4)
    k_BG1KS = k_BSGK.transpose(0, 2, 3, 1)[:, :, None]
    v_BG1SK = v_BSGK.transpose(0, 2, 1, 3)[:, :, None]
    scores = (q_BGRTK @ k_BG1KS).reshape(b, h, t, -1)
    probs = masked_softmax(scores, mask_BTS, scale).astype(v_BSGK.dtype)
    o_BGRTK = probs.reshape(b, g, h // g, t, -1) @ v_BG1SK
    return o_BGRTK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, k)


def _output(p: Params, o_BTHK: jax.Array, fp8: bool) -> jax.Array:
    if fp8:  # as MLA's output projection: power-of-two scales on its input (§3.3.3)
        return fp8_dense(o_BTHK, p["wo"], n_in=2, scale_fmt="ue8m0")
    return dense(o_BTHK, p["wo"], n_in=2)


def gqa(p: Params, x_BTD, cos_BTK, sin_BTK, mask_BTS, scale: float, fp8: bool = False) -> jax.Array:
    """MHA/GQA over this sequence (training and full forward) -> [B,T,D]."""
    q, k, v = gqa_qkv(p, x_BTD, cos_BTK, sin_BTK, fp8)
    return _output(p, attend_grouped(q, k, v, mask_BTS, scale), fp8)


def gqa_cached(p: Params, x_BTD, cos_BTK, sin_BTK, positions_BT, k_cache_BSGK, v_cache_BSGK, scale: float):
    """MHA/GQA against a key/value cache: the new tokens' rotated keys and values are written at their positions,
    then each query attends to the slots at or before its own position (prefill, decode, verification alike).
    Returns (out [B,T,D], k_cache, v_cache)."""
    q, k, v = gqa_qkv(p, x_BTD, cos_BTK, sin_BTK)
    rows = jnp.arange(x_BTD.shape[0])[:, None]
    k_cache_BSGK = k_cache_BSGK.at[rows, positions_BT].set(k.astype(k_cache_BSGK.dtype))
    v_cache_BSGK = v_cache_BSGK.at[rows, positions_BT].set(v.astype(v_cache_BSGK.dtype))
    mask_BTS = jnp.arange(k_cache_BSGK.shape[1])[None, None, :] <= positions_BT[:, :, None]
    dt = x_BTD.dtype
    o = attend_grouped(q, k_cache_BSGK.astype(dt), v_cache_BSGK.astype(dt), mask_BTS, scale)
    return _output(p, o, False), k_cache_BSGK, v_cache_BSGK


class GQA(nnx.Module):
    """MHA/GQA parameters ([in, ..., out] layout); the interface of MLA in a Block (no released checkpoint layout)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, fp8: bool = False):
        self.cfg = cfg
        self.fp8 = fp8
        d, h, g, k, std = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.attn_head_dim, \
            cfg.initializer_range
        self.wq = param(rngs, (d, h, k), ("embed", "heads", "qk_head"), dtype, std=std)
        self.wk = param(rngs, (d, g, k), ("embed", "kv_heads", "qk_head"), dtype, std=std)
        self.wv = param(rngs, (d, g, k), ("embed", "kv_heads", "v_head"), dtype, std=std)
        self.wo = param(rngs, (h, k, d), ("heads", "v_head", "embed"), dtype, std=std)

    def __call__(self, x_BTD, cos_BTK, sin_BTK, mask_BTS, absorbed: bool = False) -> jax.Array:
        """`absorbed` is MLA's decoding form; MHA/GQA have one form, so it changes nothing."""
        del absorbed
        return gqa(values(self), x_BTD, cos_BTK, sin_BTK, mask_BTS, softmax_scale(self.cfg), self.fp8)

    def cached(self, x_BTD, cos_BTK, sin_BTK, positions_BT, k_cache_BSGK, v_cache_BSGK):
        """gqa_cached with this module's weights."""
        return gqa_cached(values(self), x_BTD, cos_BTK, sin_BTK, positions_BT, k_cache_BSGK, v_cache_BSGK,
                          softmax_scale(self.cfg))
