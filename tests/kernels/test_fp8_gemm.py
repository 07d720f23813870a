"""Tests for pallas_kernels/fp8_gemm.py: the Pallas kernel (interpret mode) and the jnp reference against the FP32
product of the unquantized inputs (DeepGEMM's calc_diff, reference §5.2) and against exact integer products."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.fp8 import act_quant, act_quant_colwise, calc_diff, weight_quant
from pallas_kernels import fp8_gemm, fp8_gemm_ref

IMPLS = ["pallas", "ref"]
MODE = {"pallas": {"impl": "pallas", "interpret": True}, "ref": {"impl": "ref"}}  # kernel: interpret mode
MODE["pallas_bf16_dot"] = {**MODE["pallas"], "dot_dtype": jnp.bfloat16}  # Triton on Hopper: tiles -> bf16 MMA
MODE["mosaic"] = {"impl": "pallas", "interpret": False, "backend": "mosaic"}  # FP8 wgmma (Hopper only)
HOPPER = jax.default_backend() == "gpu" and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")
MOSAIC = pytest.param("mosaic", marks=pytest.mark.skipif(not HOPPER, reason="the Mosaic GPU FP8 kernel needs Hopper"))


def _quantized(M, K, N, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    return (x, w), (*act_quant(jnp.asarray(x)), *weight_quant(jnp.asarray(w)))


@pytest.fixture(scope="module")
def ragged():
    """K not a multiple of 128, N and M ending in partial blocks."""
    return _quantized(40, 300, 200, seed=0)


@pytest.fixture(scope="module")
def outputs(ragged):
    _, args = ragged
    return {impl: np.asarray(fp8_gemm(*args, out_dtype=jnp.float32, **MODE[impl])) for impl in IMPLS}


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_gemm_matches_float32_product(ragged, outputs, impl):
    (x, w), _ = ragged
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    out = outputs[impl]
    assert out.shape == (40, 200)
    diff = calc_diff(out, ref)
    assert diff < 1e-3, diff  # DeepGEMM's FP8xFP8 threshold


def test_fp8_gemm_kernel_matches_reference(outputs):
    ref = outputs["ref"]
    np.testing.assert_allclose(outputs["pallas"], ref, rtol=1e-5, atol=1e-6 * np.max(np.abs(ref)))


def test_fp8_gemm_bf16_output(ragged, outputs):
    _, args = ragged
    out = fp8_gemm(*args, impl="pallas", interpret=True)  # default out_dtype: bf16, cast once at the end
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), outputs["pallas"].astype(jnp.bfloat16))


def _exact_operands(M, K, N, seed):
    """e4m3 small integers with power-of-two scales: every partial product and sum is exact in FP32."""
    rng = np.random.default_rng(seed)
    nK, nN = -(-K // 128), -(-N // 128)
    x_q = rng.integers(-8, 9, (M, K)).astype(ml_dtypes.float8_e4m3fn)
    w_q = rng.integers(-8, 9, (N, K)).astype(ml_dtypes.float8_e4m3fn)
    x_s = (2.0 ** rng.integers(-3, 4, (M, nK))).astype(np.float32)
    w_s = (2.0 ** rng.integers(-3, 4, (nN, nK))).astype(np.float32)
    x = x_q.astype(np.float64) * np.repeat(x_s, 128, axis=1)[:, :K]
    w = w_q.astype(np.float64) * np.repeat(np.repeat(w_s, 128, axis=0), 128, axis=1)[:N, :K]
    return (x_q, x_s, w_q, w_s), x @ w.T


@pytest.mark.parametrize("impl", IMPLS + ["pallas_bf16_dot", MOSAIC])
def test_fp8_gemm_exact_on_representable_inputs(impl):
    # Several M blocks (block_m 16), two N blocks with distinct weight scales, three K blocks (the last partial):
    # a scale applied to the wrong row, column block or K block changes the result.
    args, expected = _exact_operands(40, 300, 200, seed=1)
    out = fp8_gemm(*map(jnp.asarray, args), out_dtype=jnp.float32, **MODE[impl], block_m=16)
    np.testing.assert_array_equal(np.asarray(out), expected.astype(np.float32))


@pytest.mark.skipif(not HOPPER, reason="the Mosaic GPU FP8 kernel needs Hopper")
@pytest.mark.parametrize("config", [dict(), dict(tile_m=64, tile_n=128, k_per_step=1),
                                    dict(tile_m=64, tile_n=64, max_concurrent_steps=2)])
def test_fp8_gemm_mosaic_configs_match_reference(ragged, outputs, config):
    # FP8 wgmma accumulates with ~14 significant bits inside each 128-wide slice (paper §3.3.2: why promotion),
    # so the kernel agrees with the FP32 reference to ~1e-4 per element, not bit for bit; a misplaced scale or tile
    # gives calc_diff ~1e-1. The exact-arithmetic tests above check the indexing bit for bit.
    from pallas_kernels.fp8_gemm_mosaic import MosaicConfig

    (x, w), args = ragged
    out = np.asarray(fp8_gemm(*args, out_dtype=jnp.float32, **MODE["mosaic"], mosaic=MosaicConfig(**config)))
    assert calc_diff(out, outputs["ref"]) < 1e-6
    assert calc_diff(out, x.astype(np.float64) @ w.astype(np.float64).T) < 1e-3  # DeepGEMM's FP8xFP8 threshold


def test_fp8_gemm_rejects_bad_backend(ragged):
    _, args = ragged
    with pytest.raises(ValueError, match=re.escape("backend must be one of ('mosaic', 'triton') or None")):
        fp8_gemm(*args, impl="pallas", interpret=True, backend="cuda")
    with pytest.raises(ValueError, match="Mosaic GPU kernel has no interpret mode"):
        fp8_gemm(*args, impl="pallas", interpret=True, backend="mosaic")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the default implementation depends on the backend")
def test_fp8_gemm_default_on_cpu_is_reference(ragged):
    _, args = ragged
    np.testing.assert_array_equal(np.asarray(fp8_gemm(*args)), np.asarray(fp8_gemm_ref(*args)))


def test_fp8_gemm_rejects_bad_input(ragged):
    _, (x_q, x_s, w_q, w_s) = ragged
    cases = [
        ((x_q, x_s[:, :1], w_q, w_s), {}, "x_s must be [M, ceil(K/128)] = (40, 3), got shape (40, 1)"),
        ((x_q, x_s, w_q, w_s[:1]), {}, "w_s must be [ceil(N/128), ceil(K/128)] = (2, 3), got shape (1, 3)"),
        ((x_q, x_s, w_q[:, :100], w_s), {}, "w_q must be [N, K=300]"),
        ((x_q, x_s, w_q.astype(jnp.bfloat16), w_s), {}, "x_q and w_q must share one floating dtype"),
        ((x_q, x_s, w_q, w_s), {"impl": "triton"}, "impl must be one of ('pallas', 'ref') or None"),
        ((x_q, x_s, w_q, w_s), {"block_m": 48}, "block_m must be a power of two >= 16, got 48"),
        ((x_q, x_s, w_q, w_s), {"w_granularity": "row"}, "row-wise w_s must be [N, ceil(K/128)] = (200, 3)"),
        ((x_q, x_s, w_q, w_s), {"w_granularity": "tile"}, "w_granularity must be one of ('block', 'row')"),
        ((x_q, x_s, w_q, w_s), {"dot_dtype": jnp.int8}, "dot_dtype must be None or one of"),
    ]
    for args, kwargs, message in cases:
        for impl in IMPLS:
            with pytest.raises(ValueError, match=re.escape(message)):
                fp8_gemm(*args, **{**MODE[impl], **kwargs})


@pytest.mark.parametrize("impl", IMPLS + [MOSAIC])
def test_fp8_gemm_row_scales_exact(impl):
    # w_granularity="row": one scale per weight row and K block; distinct per row, so a block-wise use shows.
    rng = np.random.default_rng(3)
    (x_q, x_s, w_q, _), _ = _exact_operands(40, 300, 200, seed=3)
    w_s = (2.0 ** rng.integers(-3, 4, (200, 3))).astype(np.float32)
    x = x_q.astype(np.float64) * np.repeat(x_s, 128, axis=1)[:, :300]
    w = w_q.astype(np.float64) * np.repeat(w_s, 128, axis=1)[:, :300]
    out = fp8_gemm(*map(jnp.asarray, (x_q, x_s, w_q, w_s)), out_dtype=jnp.float32, w_granularity="row",
                   **MODE[impl], block_m=16)
    np.testing.assert_array_equal(np.asarray(out), (x @ w.T).astype(np.float32))


@pytest.mark.parametrize("impl", IMPLS + [MOSAIC])
def test_fp8_gemm_weight_gradient_layout(impl):
    # dW = dy^T x with both operands quantized per 128x1 tile (contraction over tokens), reference §5.3.
    rng = np.random.default_rng(4)
    dy = rng.standard_normal((300, 40)).astype(np.float32)  # [M tokens, N out features]
    x = rng.standard_normal((300, 200)).astype(np.float32)  # [M tokens, K in features]
    dy_q, dy_s = act_quant_colwise(jnp.asarray(dy))
    x_q, x_s = act_quant_colwise(jnp.asarray(x))
    dw = fp8_gemm(dy_q.T, dy_s.T, x_q.T, x_s.T, jnp.float32, w_granularity="row", **MODE[impl])
    assert dw.shape == (40, 200)
    diff = calc_diff(dw, dy.astype(np.float64).T @ x.astype(np.float64))
    assert diff < 1e-3, diff
