"""Tests for pallas_kernels/grouped_gemm.py: the contiguous-layout grouped FP8 GEMM (reference §5.2), kernel in
interpret mode and jnp reference, against a per-expert NumPy loop; and dispatch -> grouped GEMM -> combine as one
MoE layer against NumPy."""

import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.fp8 import act_quant, calc_diff, weight_quant
from dsv3_jax.model.experts import combine, dispatch
from pallas_kernels import fp8_grouped_gemm, grouped_gemm

IMPLS = ["pallas", "ref"]
MODE = {"pallas": {"impl": "pallas", "interpret": True}, "ref": {"impl": "ref"}}  # kernel: interpret mode
G, K, N = 3, 300, 200


def _m_indices():
    """Five 128-row blocks: group 0 (100 rows + padding), group 2 over two blocks, an all-padding block, group 1;
    group 2's second block ends in padding, group 1 has no rows before its block."""
    m = np.full(5 * 128, -1, np.int32)
    m[0:100] = 0
    m[128:306] = 2
    m[512:600] = 1
    return m


def _per_expert_np(x, w_GNK, m):
    out = np.zeros((x.shape[0], w_GNK.shape[1]))
    for g in range(w_GNK.shape[0]):
        out[m == g] = x[m == g].astype(np.float64) @ w_GNK[g].astype(np.float64).T
    return out


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    m = _m_indices()
    x = rng.standard_normal((m.shape[0], K)).astype(np.float32)
    w = rng.standard_normal((G, N, K)).astype(np.float32)
    args = (*act_quant(jnp.asarray(x)), *weight_quant(jnp.asarray(w)), jnp.asarray(m))
    outs = {impl: np.asarray(fp8_grouped_gemm(*args, out_dtype=jnp.float32, **MODE[impl])) for impl in IMPLS}
    return x, w, m, args, outs


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_gemm_matches_per_expert_product(problem, impl):
    x, w, m, _, outs = problem
    out = outs[impl]
    assert out.shape == (m.shape[0], N)
    diff = calc_diff(out, _per_expert_np(x, w, m))
    assert diff < 1e-3, diff
    assert np.all(out[m < 0] == 0)  # padding rows, including the all-padding block


def test_grouped_gemm_kernel_matches_reference(problem):
    ref = problem[4]["ref"]
    np.testing.assert_allclose(problem[4]["pallas"], ref, rtol=1e-5, atol=1e-6 * np.max(np.abs(ref)))


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_gemm_exact_on_representable_inputs(impl):
    # e4m3 integers with power-of-two scales: exact in FP32, so a wrong group, N block or K block scale shows.
    rng = np.random.default_rng(1)
    m = _m_indices()
    nK, nN = -(-K // 128), -(-N // 128)
    x_q = rng.integers(-8, 9, (m.shape[0], K)).astype(ml_dtypes.float8_e4m3fn)
    w_q = rng.integers(-8, 9, (G, N, K)).astype(ml_dtypes.float8_e4m3fn)
    x_s = (2.0 ** rng.integers(-3, 4, (m.shape[0], nK))).astype(np.float32)
    w_s = (2.0 ** rng.integers(-3, 4, (G, nN, nK))).astype(np.float32)
    x = x_q.astype(np.float64) * np.repeat(x_s, 128, axis=1)[:, :K]
    w = w_q.astype(np.float64) * np.repeat(np.repeat(w_s, 128, axis=1), 128, axis=2)[:, :N, :K]
    out = fp8_grouped_gemm(*map(jnp.asarray, (x_q, x_s, w_q, w_s, m)), out_dtype=jnp.float32, **MODE[impl])
    np.testing.assert_array_equal(np.asarray(out), _per_expert_np(x, w, m).astype(np.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_layer_dispatch_grouped_gemm_combine(impl):
    # One routed-expert projection end to end: y[t] = sum_k w[t, k] * x[t] @ W[e[t, k]]^T, bf16 operands.
    rng = np.random.default_rng(2)
    T, topk, D, F = 50, 2, 64, 32
    x = rng.standard_normal((T, D)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((G, F, D)).astype(ml_dtypes.bfloat16)
    experts = np.stack([rng.permutation(G)[:topk] for _ in range(T)]).astype(np.int32)
    weights = rng.random((T, topk)).astype(np.float32)
    x_PD, layout = dispatch(jnp.asarray(x), jnp.asarray(experts), G, align=128, **MODE[impl])
    y_PF = grouped_gemm(x_PD, jnp.asarray(w), layout.expert_P, jnp.float32, **MODE[impl])
    y = np.asarray(combine(y_PF, layout, jnp.asarray(weights), **MODE[impl]))
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    expected = sum(weights[:, k, None] * np.einsum("td,tfd->tf", x64, w64[experts[:, k]]) for k in range(topk))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_grouped_gemm_rejects_bad_input(problem):
    x_q, x_s, w_q, w_s, m = problem[3]
    cases = [
        ((x_q[:-1], x_s[:-1], w_q, w_s, m[:-1]), {}, "P=639 rows must be a multiple of block_m=128"),
        ((x_q, x_s, w_q, w_s[:, :1], m), {}, "w_s must be [G, ceil(N/128), ceil(K/128)] = (3, 2, 3)"),
        ((x_q, x_s, w_q[0], w_s, m), {}, "w_q must be [G, N, K]"),
        ((x_q, x_s, w_q, w_s, m[:128]), {}, "m_indices_P must be an integer [P=640] array"),
        ((x_q, x_s, w_q, w_s, m.astype(jnp.float32)), {}, "m_indices_P must be an integer [P=640] array"),
        ((x_q, x_s, w_q, w_s, m), {"block_m": 96}, "block_m must be a power of two >= 1, got 96"),
    ]
    for args, kwargs, message in cases:
        for impl in IMPLS:
            with pytest.raises(ValueError, match=re.escape(message)):
                fp8_grouped_gemm(*args, **{**MODE[impl], **kwargs})
