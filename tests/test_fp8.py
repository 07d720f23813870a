"""Tests for dsv3_jax/fp8.py and pallas_kernels/fp8_gemm.py (reference §5.1, §5.2, §13, §14.4)."""

import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.fp8 import (
    BLOCK,
    E4M3_MAX,
    act_quant,
    act_quant_colwise,
    calc_diff,
    weight_dequant,
    weight_dequant_np,
    weight_quant,
)
from pallas_kernels import fp8_gemm_ref

F8 = ml_dtypes.float8_e4m3fn
GOLDEN_IDX = [0, 1, 50, 127, 128, 200, 255]


def _f32(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


def _bits(q):
    return np.asarray(q).view(np.uint8)


def _golden_row():
    return (np.arange(256, dtype=np.float32) - 100.0) / 16.0


def _act_dequant_np(q, s, block=BLOCK):
    K = q.shape[-1]
    return _f32(q) * np.repeat(np.asarray(s), block, axis=-1)[..., :K]


def _act_quant_np(x, block=BLOCK, ue8m0=False):
    """Independent NumPy restatement of the official act_quant, one tile at a time."""
    x = np.asarray(x, np.float32)
    K = x.shape[-1]
    q_parts, s_parts = [], []
    for start in range(0, K, block):
        tile = x[..., start:start + block]
        amax = np.max(np.abs(tile), axis=-1)
        s = np.maximum(amax, np.float32(1e-4)) / np.float32(448.0)
        if ue8m0:
            s = (2.0 ** np.ceil(np.log2(s.astype(np.float64)))).astype(np.float32)
        q_parts.append(np.clip(tile / s[..., None], -448.0, 448.0).astype(F8))
        s_parts.append(s)
    return np.concatenate(q_parts, axis=-1), np.stack(s_parts, axis=-1)


# --------------------------------------------------------------------------------------------- act_quant


@pytest.mark.parametrize("in_dtype", [jnp.float32, jnp.bfloat16])
def test_act_quant_golden_default(in_dtype):
    x = _golden_row()[None]  # [1, 256], exact in bf16
    q, s = act_quant(jnp.asarray(x, in_dtype))
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (1, 256)
    assert s.dtype == jnp.float32 and s.shape == (1, 2)
    expected_s = np.array([0.013950892724096775, 0.0216238833963871], np.float32)
    np.testing.assert_array_equal(np.asarray(s)[0], expected_s)
    np.testing.assert_array_equal(_f32(q)[0, GOLDEN_IDX], [-448, -448, -224, 120, 80, 288, 448])
    max_err = np.max(np.abs(x - _act_dequant_np(q, s)))
    assert abs(max_err - 0.33929) <= 1e-5


def test_act_quant_golden_ue8m0():
    x = _golden_row()[None]
    q, s = act_quant(jnp.asarray(x), scale_fmt="ue8m0")
    np.testing.assert_array_equal(np.asarray(s)[0], np.array([0.015625, 0.03125], np.float32))
    np.testing.assert_array_equal(_f32(q)[0, GOLDEN_IDX], [-384, -384, -192, 112, 56, 192, 320])
    max_err = np.max(np.abs(x - _act_dequant_np(q, s)))
    assert abs(max_err - 0.5) <= 1e-5


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_partial_tile_matches_numpy(scale_fmt):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 200)).astype(np.float32) * 3.0
    x[1, 2, 128:] *= 1e-3  # the partial last tile gets a scale of its own, far from the full tile's
    q, s = act_quant(jnp.asarray(x), scale_fmt=scale_fmt)
    q_ref, s_ref = _act_quant_np(x, ue8m0=scale_fmt == "ue8m0")
    assert q.shape == (2, 3, 200) and s.shape == (2, 3, 2)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    np.testing.assert_array_equal(_bits(q), _bits(q_ref))


def test_act_quant_amax_floor_and_zero_tile():
    x = np.zeros((3, 130), np.float32)
    x[1, :] = 1e-6  # below the 1e-4 floor: scale is floored, values quantize to (sub)normal e4m3 or zero
    q, s = act_quant(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(s), np.full((3, 2), np.float32(1e-4) / np.float32(448.0)))
    np.testing.assert_array_equal(_f32(q)[0], 0.0)
    # 1e-6 / (1e-4/448) = 4.48 -> nearest e4m3 is 4.5
    np.testing.assert_array_equal(_f32(q)[1], 4.5)


def test_act_quant_ue8m0_rounds_up_to_power_of_two():
    x = np.zeros((4, 128), np.float32)
    x[0, 3] = 56.0  # s = 56/448 = 2^-3 exactly: already a power of two, must stay
    x[1, 3] = -57.0  # s = 0.1272 -> 2^-2
    x[2, 3] = 0.1  # s = 2.232e-4 -> 2^-12 = 2.441e-4
    # row 3 is zero: floored s = 1e-4/448 = 2.232e-7 -> 2^-22
    q, s = act_quant(jnp.asarray(x), scale_fmt="ue8m0")
    np.testing.assert_array_equal(np.asarray(s)[:, 0], 2.0 ** np.array([-3, -2, -12, -22], np.float32))
    np.testing.assert_array_equal(_f32(q)[:, 3], [448.0, -224.0, 416.0, 0.0])  # 0.1*4096 = 409.6 -> 416


def test_act_quant_rejects_bad_arguments():
    x = jnp.ones((2, 128))
    with pytest.raises(ValueError, match="scale_fmt"):
        act_quant(x, scale_fmt="e8m0")
    with pytest.raises(ValueError, match="block_size"):
        act_quant(x, block_size=0)
    with pytest.raises(ValueError, match="at least 2 axes"):
        act_quant_colwise(jnp.ones((128,)))


def test_act_quant_colwise_is_transposed_act_quant():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 300, 40)).astype(np.float32)
    q, s = act_quant_colwise(jnp.asarray(x), scale_fmt="ue8m0")
    q_t, s_t = act_quant(jnp.asarray(np.swapaxes(x, -1, -2)), scale_fmt="ue8m0")
    assert q.shape == (2, 300, 40) and s.shape == (2, 3, 40)
    np.testing.assert_array_equal(_bits(q), _bits(np.swapaxes(np.asarray(q_t), -1, -2)))
    np.testing.assert_array_equal(np.asarray(s), np.swapaxes(np.asarray(s_t), -1, -2))
    # Independent check of the 128x1 tiling: scale of rows 256..299 of column 7 in batch 1.
    amax = np.max(np.abs(x[1, 256:300, 7]))
    s_expected = 2.0 ** np.ceil(np.log2(np.float64(np.float32(amax) / np.float32(448.0))))
    assert np.asarray(s)[1, 2, 7] == np.float32(s_expected)


# ----------------------------------------------------------------------------------- weight quant/dequant


def test_weight_quant_partial_blocks_roundtrip():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((576, 300)).astype(np.float32)
    w[512:, :] *= 50.0  # the partial last row block (64 rows) has a much larger scale
    w[:128, 256:] *= 1e-3  # and a partial last column block a much smaller one
    q, s = weight_quant(jnp.asarray(w))
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (576, 300)
    assert s.dtype == jnp.float32 and s.shape == (5, 3)
    s_ref = np.empty((5, 3), np.float32)
    for i in range(5):
        for j in range(3):
            amax = np.max(np.abs(w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]))
            s_ref[i, j] = np.maximum(amax, np.float32(1e-4)) / np.float32(448.0)
    np.testing.assert_array_equal(np.asarray(s), s_ref)

    # Error bound. v = w/s lies in [-448, 448]. e4m3 has 3 mantissa bits, so for normal |v| in [2^e, 2^(e+1))
    # the spacing is 2^(e-3) and round-to-nearest is off by at most 2^(e-4) <= 2^-4 |v|; below the smallest
    # normal 2^-6 the spacing is the subnormal step 2^-9, error <= 2^-10. Multiplying back by s:
    #     |w - q*s| <= 2^-4 |w| + 2^-10 s        (+ float32 rounding of w/s and q*s, ~2^-24 relative).
    # (It implies the coarse per-block bound |err| <= (amax/448) * 448 * 2^-4 + 2^-10 s = amax/16 + 2^-10 s.)
    w_deq = np.asarray(weight_dequant(q, s))
    s_full = np.repeat(np.repeat(s_ref, 128, axis=0), 128, axis=1)[:576, :300]
    bound = 2.0**-4 * np.abs(w) + 2.0**-10 * s_full
    bound = bound * (1 + 2.0**-20) + 2.0**-20 * s_full
    err = np.abs(w - w_deq)
    assert np.all(err <= bound), float(np.max(err / bound))
    # The bound is nearly attained, so it would catch a scale that is off by a factor of two.
    assert np.max(err / bound) > 0.5


def _hand_built_blocks():
    """q_true with a 448 in every block (partial ones too) and a distinct power-of-two scale per block."""
    rng = np.random.default_rng(3)
    N, K = 300, 200  # scales [3, 2]; last row block has 44 rows, last column block 72 columns
    q_true = np.clip(rng.standard_normal((N, K)) * 100.0, -448, 448).astype(np.float32).astype(F8)
    s_true = (2.0 ** (np.arange(6).reshape(3, 2) - 3.0)).astype(np.float32)  # 1/8 .. 4, all distinct
    for i in range(3):
        for j in range(2):
            q_true[min(i * 128 + 5, N - 1), min(j * 128 + 7, K - 1)] = F8(448.0)
    rows, cols = np.arange(N) // 128, np.arange(K) // 128
    w = q_true.astype(np.float32) * s_true[rows][:, cols]  # exact: power-of-two scales
    return q_true, s_true, w


def test_weight_quant_dequant_hand_built_distinct_scales():
    q_true, s_true, w = _hand_built_blocks()
    q, s = weight_quant(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(s), s_true)
    np.testing.assert_array_equal(_bits(q), _bits(q_true))
    np.testing.assert_array_equal(np.asarray(weight_dequant(jnp.asarray(q_true), jnp.asarray(s_true))), w)
    np.testing.assert_array_equal(weight_dequant_np(q_true, s_true), w)

    # Non-power-of-two scales, expected values from direct W[i,j] = q[i,j] * s[i//128, j//128] indexing.
    s2 = (1.0 + 0.25 * np.arange(6).reshape(3, 2)).astype(np.float32)
    expected = np.empty(w.shape, np.float32)
    for i in range(w.shape[0]):
        for j in (0, 127, 128, 199):
            expected[i, j] = np.float32(q_true[i, j].astype(np.float32) * s2[i // 128, j // 128])
    got = np.asarray(weight_dequant(jnp.asarray(q_true), jnp.asarray(s2)))
    np.testing.assert_array_equal(got[:, [0, 127, 128, 199]], expected[:, [0, 127, 128, 199]])


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_weight_dequant_numpy_matches_jnp_bitwise(dtype):
    rng = np.random.default_rng(4)
    q, s = weight_quant(jnp.asarray(rng.standard_normal((576, 300)).astype(np.float32)))
    got_jnp = np.asarray(weight_dequant(q, s, dtype=jnp.dtype(dtype)))
    got_np = weight_dequant_np(np.asarray(q), np.asarray(s), dtype=dtype)
    assert got_jnp.dtype == got_np.dtype == np.dtype(dtype) and got_np.shape == (576, 300)
    np.testing.assert_array_equal(got_jnp.view(np.uint8), got_np.view(np.uint8))


def test_weight_dequant_rejects_wrong_scale_shape():
    q = np.zeros((576, 300), F8)
    s_bad = np.ones((4, 3), np.float32)
    for fn in (weight_dequant, weight_dequant_np):
        with pytest.raises(ValueError) as info:
            fn(q, s_bad)
        msg = str(info.value)
        assert "(4, 3)" in msg and "(576, 300)" in msg and "(5, 3)" in msg, msg
    with pytest.raises(ValueError, match="integer dtype"):
        weight_dequant_np(np.zeros((576, 300), np.uint8), np.ones((5, 3), np.float32))


def test_calc_diff():
    x = np.array([1.0, -2.0, 3.0])
    assert calc_diff(x, x) == 0.0
    assert calc_diff(np.zeros(3), np.zeros(3)) == 0.0
    assert calc_diff(x, -x) == pytest.approx(2.0)
    assert calc_diff(x, np.zeros(3)) == pytest.approx(1.0)
    # 1 - 2*(1*1 + 2*4) / ((1+1) + (4+16)) = 1 - 18/22
    assert calc_diff([1.0, 2.0], [1.0, 4.0]) == pytest.approx(1.0 - 18.0 / 22.0)


# ---------------------------------------------------------------------------------------------- fp8 GEMM


def _gemm_np(x_q, x_s, w_q, w_s):
    """Float64 NumPy restatement of the official fp8_gemm: a Python loop over 128-wide K blocks."""
    x = _f32(x_q).astype(np.float64)
    w = _f32(w_q).astype(np.float64)
    x_s, w_s = np.asarray(x_s, np.float64), np.asarray(w_s, np.float64)
    (M, K), N = x.shape, w.shape[0]
    acc = np.zeros((M, N))
    for kb in range(-(-K // 128)):
        ks = slice(kb * 128, (kb + 1) * 128)
        acc += (x[:, ks] @ w[:, ks].T) * x_s[:, kb][:, None] * w_s[np.arange(N) // 128, kb][None, :]
    return acc


def _quantized_pair(M, K, N, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    x_q, x_s = act_quant(jnp.asarray(x))
    w_q, w_s = weight_quant(jnp.asarray(w))
    return x, w, x_q, x_s, w_q, w_s


@pytest.mark.parametrize("M,K,N", [(64, 320, 200), (4, 384, 256)])
def test_fp8_gemm_ref_vs_float32_and_numpy(M, K, N):
    x, w, x_q, x_s, w_q, w_s = _quantized_pair(M, K, N, seed=M + K + N)
    out = fp8_gemm_ref(x_q, x_s, w_q, w_s)
    assert out.dtype == jnp.bfloat16 and out.shape == (M, N)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    diff = calc_diff(out, ref)
    assert diff < 1e-3, diff  # DeepGEMM's FP8xFP8 threshold (reference §13)

    out_f32 = np.asarray(fp8_gemm_ref(x_q, x_s, w_q, w_s, out_dtype=jnp.float32))
    expected = _gemm_np(x_q, x_s, w_q, w_s)
    np.testing.assert_allclose(out_f32, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)))


def test_fp8_gemm_ref_rejects_bad_shapes():
    _, _, x_q, x_s, w_q, w_s = _quantized_pair(8, 200, 130, seed=5)
    cases = [
        ((x_q, x_s[:, :1], w_q, w_s), "x_s must be [M, ceil(K/128)] = (8, 2), got shape (8, 1)"),
        ((x_q, x_s, w_q, w_s[:1]), "w_s must be [ceil(N/128), ceil(K/128)] = (2, 2), got shape (1, 2)"),
        ((x_q, x_s, w_q[:, :100], w_s), "w_q must be [N, K=200]"),
        ((x_q[0], x_s, w_q, w_s), "x_q must be [M, K]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            fp8_gemm_ref(*args)


def test_e4m3_max_constant():
    assert E4M3_MAX == float(ml_dtypes.finfo(F8).max)
