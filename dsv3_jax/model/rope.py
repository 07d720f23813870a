"""Decoupled RoPE with YaRN extension (paper §2.1.1 eqs. 3, 8; §4.3; reference §3.4).

The rotated width is cfg.rope_dim: MLA's decoupled qk_rope_head_dim, or the whole head of MHA/GQA.

Rotations act on interleaved pairs (2j, 2j+1), the layout of the released checkpoint's RoPE rows. transformers
permutes to a half-split layout first; q.k is identical either way (tests/model/test_rope.py checks it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's sqrt(t) = 0.1 * mscale * ln(factor) + 1, or 1 when factor <= 1."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_range(cfg: ModelConfig) -> tuple[float, float]:
    """The (low, high) rotary-dimension bounds of the ramp: (10, 23) for DeepSeek-V3."""
    dim, base, orig = cfg.rope_dim, cfg.rope_theta, cfg.rope_original_max_position_embeddings

    def corr(n_rot: float) -> float:
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr(cfg.rope_beta_fast), corr(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(cfg: ModelConfig) -> np.ndarray:
    """ramp[j] = clip((j - low) / (high - low), 0, 1), j < dim/2; 0 keeps the original frequency."""
    low, high = yarn_correction_range(cfg)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    j = np.arange(cfg.rope_dim // 2, dtype=np.float32)
    return np.clip((j - np.float32(low)) / np.float32(high - low), 0, 1).astype(np.float32)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [R/2] (float32): base^(-2j/R), YaRN-blended when cfg.rope_type == 'yarn'."""
    dim = cfg.rope_dim
    freqs = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    freqs = freqs.astype(np.float32)
    if not cfg.uses_yarn:
        return freqs
    ramp = yarn_ramp(cfg)
    interpolated = (freqs / np.float32(cfg.rope_factor)).astype(np.float32)
    return (interpolated * ramp + freqs * (np.float32(1) - ramp)).astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """Multiplier of cos/sin: mscale(f, mscale)/mscale(f, mscale_all_dim) (1.0 for V3), as transformers does."""
    if not cfg.uses_yarn:
        return 1.0
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return yarn_get_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_get_mscale(cfg.rope_factor,
                                                                                   cfg.rope_mscale_all_dim)
    return yarn_get_mscale(cfg.rope_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim) (MHA/GQA: head_dim), times mscale^2 under YaRN (0.1352337788608801 for DeepSeek-V3)."""
    scale = cfg.attn_head_dim ** -0.5
    if cfg.uses_yarn and cfg.rope_mscale_all_dim:
        m = yarn_get_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., R/2] (float32) of positions [...] times the inverse frequencies."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    factor = rope_attention_factor(cfg)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of x [..., R] by cos/sin [..., R/2] (broadcast); float32 math, x's dtype out."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
