"""MoE dispatch and combine in the contiguous layout (reference §5.2): model/experts.py's entry points over the
Pallas gathers of pallas_kernels/dispatch.py (interpret mode) and their jnp references, against a NumPy
restatement of the layout."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.experts import buffer_rows, combine, dispatch

IMPLS = ["pallas", "ref"]
MODE = {"pallas": {"impl": "pallas", "interpret": True}, "ref": {"impl": "ref"}}  # kernel: interpret mode
T, K, E, D, ALIGN = 37, 3, 5, 96, 16


def _layout_np(experts_TK, num_experts, align):
    """NumPy restatement: pairs in (token, slot) order, grouped by expert, each segment padded to ``align``."""
    flat = experts_TK.reshape(-1)
    rows = np.full(flat.shape, -1)
    start = 0
    for e in range(num_experts):
        pairs = np.flatnonzero(flat == e)
        rows[pairs] = start + np.arange(len(pairs))
        start += -(-len(pairs) // align) * align
    return rows.reshape(experts_TK.shape)


def _combine_np(x_TD, weights_TK):
    out = np.zeros(x_TD.shape, np.float32)
    for k in range(weights_TK.shape[1]):
        out = out + weights_TK[:, k, None] * x_TD
    return out


@pytest.fixture(scope="module")
def routed():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D)).astype(np.float32)
    experts = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    weights = rng.random((T, K)).astype(np.float32)
    weights /= weights.sum(axis=1, keepdims=True)
    out = {impl: dispatch(jnp.asarray(x), jnp.asarray(experts), E, align=ALIGN, **MODE[impl]) for impl in IMPLS}
    return x, experts, weights, out


@pytest.mark.parametrize("impl", IMPLS)
def test_dispatch_places_every_pair(routed, impl):
    x, experts, _, out = routed
    x_PD, layout = out[impl]
    P = -(-(T * K + E * (ALIGN - 1)) // ALIGN) * ALIGN
    assert x_PD.shape == (P, D) and buffer_rows(T * K, E, ALIGN) == P
    rows = _layout_np(experts, E, ALIGN)
    np.testing.assert_array_equal(np.asarray(layout.row_TK), rows)
    np.testing.assert_array_equal(np.asarray(layout.counts_E), np.bincount(experts.ravel(), minlength=E))
    x_PD, m, src = np.asarray(x_PD), np.asarray(layout.expert_P), np.asarray(layout.src_P)
    real = np.zeros(P, bool)
    real[rows.ravel()] = True
    assert real.sum() == T * K  # distinct rows: nothing overwritten, nothing dropped
    for t in range(T):
        for k in range(K):
            np.testing.assert_array_equal(x_PD[rows[t, k]], x[t])
            assert m[rows[t, k]] == experts[t, k]
            assert src[rows[t, k]] == t
    assert np.all(x_PD[~real] == 0) and np.all(m[~real] == -1) and np.all(src[~real] == -1)
    # Every ALIGN-row block holds one expert (plus padding): what the grouped GEMM needs.
    blocks = m.reshape(-1, ALIGN)
    assert all(len(set(b[b >= 0])) <= 1 for b in blocks)


@pytest.mark.parametrize("impl", IMPLS)
def test_combine_is_weighted_inverse(routed, impl):
    x, _, weights, out = routed
    x_PD, layout = out[impl]
    y = np.asarray(combine(x_PD, layout, jnp.asarray(weights), **MODE[impl]))
    np.testing.assert_allclose(y, _combine_np(x, weights), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_slot_round_trip_is_exact(impl):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
    experts = jnp.asarray(rng.integers(0, E, (T, 1)), jnp.int32)
    x_PD, layout = dispatch(x, experts, E, align=ALIGN, **MODE[impl])
    y = combine(x_PD, layout, jnp.ones((T, 1), jnp.float32), **MODE[impl])
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_to_one_expert_drops_nothing(impl):
    # The adversarial routing: every slot of every token on the last expert, default alignment 128.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, D)).astype(np.float32)
    experts = np.full((T, K), E - 1, np.int32)
    x_PD, layout = dispatch(jnp.asarray(x), jnp.asarray(experts), E, **MODE[impl])
    assert x_PD.shape[0] == buffer_rows(T * K, E, 128) == 768
    np.testing.assert_array_equal(np.asarray(layout.counts_E), [0] * (E - 1) + [T * K])
    m = np.asarray(layout.expert_P)
    np.testing.assert_array_equal(m[: T * K], E - 1)
    assert np.all(m[T * K:] == -1)
    y = combine(x_PD, layout, jnp.ones((T, K), jnp.float32), **MODE[impl])
    np.testing.assert_allclose(np.asarray(y), _combine_np(x, np.ones((T, K), np.float32)), rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_expert_ids_get_no_row(impl):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((T, D)).astype(np.float32)
    experts = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    experts[::4, 1] = -1  # e.g. a slot masked out by a capacity or group limit
    experts[1::5, 0] = E
    weights = rng.random((T, K)).astype(np.float32)
    x_PD, layout = dispatch(jnp.asarray(x), jnp.asarray(experts), E, align=ALIGN, **MODE[impl])
    kept = (experts >= 0) & (experts < E)
    rows = np.asarray(layout.row_TK)
    assert np.all(rows[~kept] == -1)
    np.testing.assert_array_equal(rows, np.where(kept, _layout_np(experts, E, ALIGN), -1))
    assert np.sum(np.asarray(layout.expert_P) >= 0) == kept.sum()
    y = combine(x_PD, layout, jnp.asarray(weights), **MODE[impl])
    np.testing.assert_allclose(np.asarray(y), _combine_np(x, weights * kept), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_of_dispatch_and_combine(routed, impl):
    # loss = sum_t c_t . combine(dispatch(x)^2)_t = sum_t sum_k w_tk <c_t, x_t^2>
    # d/dx_t = 2 x_t c_t sum_k w_tk;  d/dw_tk = <c_t, x_t^2>   (the Pallas path has custom VJPs: two gathers)
    x, experts, weights, _ = routed
    c = np.random.default_rng(4).standard_normal((T, D)).astype(np.float32)

    def loss(x_TD, w_TK):
        x_PD, layout = dispatch(x_TD, jnp.asarray(experts), E, align=ALIGN, **MODE[impl])
        return jnp.sum(jnp.asarray(c) * combine(x_PD * x_PD, layout, w_TK, **MODE[impl]))

    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(weights))
    np.testing.assert_allclose(np.asarray(dx), 2 * x * c * weights.sum(axis=1, keepdims=True), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.repeat(np.sum(c * x * x, axis=1, keepdims=True), K, axis=1),
                               rtol=1e-5, atol=1e-5)


def test_kernel_and_reference_dispatch_identical(routed):
    out = routed[3]
    np.testing.assert_array_equal(np.asarray(out["pallas"][0]), np.asarray(out["ref"][0]))


def test_dispatch_combine_reject_bad_input(routed):
    x, experts, weights, out = routed
    x_PD, layout = out["ref"]
    x, experts = jnp.asarray(x), jnp.asarray(experts)
    cases = [
        (lambda: dispatch(x[0], experts, E), "x_TD must be [T, D]"),
        (lambda: dispatch(x, experts[:5], E), "experts_TK must be [T=37, K], got shape (5, 3)"),
        (lambda: dispatch(x, experts.astype(jnp.float32), E), "experts_TK must hold integer expert ids"),
        (lambda: dispatch(x, experts, 0), "num_experts must be a positive int, got 0"),
        (lambda: dispatch(x, experts, E, align=0), "align must be a positive int, got 0"),
        (lambda: combine(x_PD[:-1], layout, jnp.asarray(weights)), "y_PD must be [P=192, D]"),
        (lambda: combine(x_PD, layout, jnp.asarray(weights)[:, :2]), "weights_TK must be (37, 3)"),
        (lambda: combine(x_PD, layout, jnp.asarray(weights), impl="jnp"), "impl must be one of"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            fn()
