"""YaRN RoPE golden values (reference §3.4, §14 item 1) and the interleaved/half-split equivalence (§12.1)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import DEEPSEEK_V2_LITE, DEEPSEEK_V3, ModelConfig
from dsv3_jax.model.rope import (apply_rope, rope_attention_factor, rope_cos_sin, rope_inv_freq, softmax_scale,
                                 yarn_correction_range, yarn_ramp)

J = [0, 1, 9, 10, 11, 22, 23, 31]
BASE_FREQS = [1.0, 0.7498942, 0.074989416, 0.056234129, 0.042169649, 1.7782794e-3, 1.3335214e-3, 1.3335215e-4]
YARN_FREQS = [1.0, 0.7498942, 0.074989416, 0.056234129, 0.039006926, 1.7782794e-4, 3.3338038e-5, 3.3338038e-6]


def test_yarn_correction_range_and_ramp():
    assert yarn_correction_range(DEEPSEEK_V3) == (10, 23)
    ramp = yarn_ramp(DEEPSEEK_V3)
    assert ramp.dtype == np.float32 and ramp.shape == (32,)
    np.testing.assert_array_equal(ramp[:11], 0.0)
    np.testing.assert_array_equal(ramp[23:], 1.0)
    np.testing.assert_allclose(ramp[11:23], [(j - 10) / 13 for j in range(11, 23)], rtol=1e-6)
    np.testing.assert_allclose(ramp[[11, 12, 22]], [0.07692308, 0.15384616, 0.9230769], rtol=1e-7)


def test_yarn_frequencies_golden():
    base = rope_inv_freq(DEEPSEEK_V3.replace(rope_type="default"))
    yarn = rope_inv_freq(DEEPSEEK_V3)
    np.testing.assert_allclose(base[J], BASE_FREQS, rtol=2e-7)
    np.testing.assert_allclose(yarn[J], YARN_FREQS, rtol=2e-7)


def test_softmax_scale_golden():
    assert softmax_scale(DEEPSEEK_V3) == pytest.approx(0.1352337788608801, rel=1e-15)
    assert softmax_scale(DEEPSEEK_V2_LITE) == pytest.approx(0.1147213867929261, rel=1e-15)
    mscale = 0.1 * math.log(40) + 1
    assert mscale == pytest.approx(1.3688879454113936, rel=1e-15)
    assert softmax_scale(DEEPSEEK_V3.replace(rope_type="default")) == pytest.approx(192 ** -0.5)
    assert rope_attention_factor(DEEPSEEK_V3) == 1.0


def test_attention_factor_follows_transformers():
    # mscale/mscale_all_dim differ: cos and sin carry mscale(f, 1.0)/mscale(f, 0.8); without mscale keys, mscale(f)
    cfg = DEEPSEEK_V3.replace(rope_mscale=1.0, rope_mscale_all_dim=0.8)
    f = 40.0
    expect = (0.1 * math.log(f) + 1) / (0.08 * math.log(f) + 1)
    assert rope_attention_factor(cfg) == pytest.approx(expect)
    assert rope_attention_factor(DEEPSEEK_V3.replace(rope_mscale=None, rope_mscale_all_dim=None)) == pytest.approx(
        0.1 * math.log(f) + 1)


def _half_split_rope(x, angles):
    """transformers' route: permute interleaved pairs to [evens; odds], then rotate_half."""
    perm = np.concatenate([np.arange(0, x.shape[-1], 2), np.arange(1, x.shape[-1], 2)])
    xp = x[..., perm]
    cos = np.concatenate([np.cos(angles)] * 2, -1)
    sin = np.concatenate([np.sin(angles)] * 2, -1)
    half = xp.shape[-1] // 2
    rot = np.concatenate([-xp[..., half:], xp[..., :half]], -1)
    return xp * cos + rot * sin


def test_interleaved_and_half_split_give_same_scores():
    cfg = ModelConfig(qk_rope_head_dim=16, rope_factor=4.0, rope_original_max_position_embeddings=8)
    rng = np.random.default_rng(0)
    t = 12
    q = rng.standard_normal((t, 16)).astype(np.float32)
    k = rng.standard_normal((t, 16)).astype(np.float32)
    pos = jnp.arange(t)
    cos, sin = rope_cos_sin(pos, cfg)
    qi, ki = np.asarray(apply_rope(q, cos, sin)), np.asarray(apply_rope(k, cos, sin))
    angles = np.arange(t)[:, None] * rope_inv_freq(cfg)[None]
    qh, kh = _half_split_rope(q, angles), _half_split_rope(k, angles)
    np.testing.assert_allclose(qi @ ki.T, qh @ kh.T, rtol=1e-5, atol=1e-5)
    # the rotated vectors themselves differ by the pair permutation
    assert not np.allclose(qi, qh)
    # a pure rotation keeps norms
    np.testing.assert_allclose(np.linalg.norm(qi, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
