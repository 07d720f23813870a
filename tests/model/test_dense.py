"""dsv3_jax.model.dense: the projections equal a NumPy restatement in float32 and in bfloat16 (forward, input and
weight gradients), and in bfloat16 on the CPU all three products run on XLA's bfloat16 path (no operand upcast to
float32, the slow path the module exists to avoid)."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.model.dense import dense, matmul, mT


def _case(dtype, n_in):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5) if n_in == 2 else (2, 3, 20)).astype(np.float32)
    w = (rng.standard_normal((4, 5, 6) if n_in == 2 else (20, 2, 3)) * 0.3).astype(np.float32)
    if dtype == jnp.bfloat16:  # the inputs as the model sees them: activations rounded to bfloat16
        x = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    return x, w


@pytest.mark.parametrize("n_in", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_and_its_gradients_match_numpy(dtype, n_in):
    x, w = _case(dtype, n_in)
    r = np.random.default_rng(1).standard_normal(x.shape[:x.ndim - n_in] + w.shape[n_in:]).astype(np.float32)
    wq = w.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == jnp.bfloat16 else w  # w as it is multiplied
    k = int(np.prod(w.shape[:n_in]))
    x2, w2, r2 = x.reshape(-1, k), wq.reshape(k, -1), r.reshape(-1, r.size // (x.size // k))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)

    y = dense(jnp.asarray(x, dtype), jnp.asarray(w), n_in)
    assert y.dtype == dtype and y.shape == r.shape
    np.testing.assert_allclose(np.asarray(y, np.float32), (x2 @ w2).reshape(r.shape), **tol)
    assert dense(jnp.asarray(x, dtype), jnp.asarray(w), n_in, out_dtype=jnp.float32).dtype == jnp.float32

    gx, gw = jax.grad(lambda a, b: jnp.sum(dense(a, b, n_in).astype(jnp.float32) * r), argnums=(0, 1))(
        jnp.asarray(x, dtype), jnp.asarray(w))
    assert gx.dtype == dtype and gw.dtype == jnp.float32  # the weight gradient in the master weights' dtype
    np.testing.assert_allclose(np.asarray(gx, np.float32), (r2 @ w2.T).reshape(x.shape), **tol)
    np.testing.assert_allclose(np.asarray(gw), (x2.T @ r2).reshape(w.shape), **tol)


def test_dense_rejects_mismatched_axes():
    with pytest.raises(ValueError, match="cannot contract the last 1 axes"):
        dense(jnp.ones((2, 3)), jnp.ones((4, 5)))


def test_mT_and_matmul():
    a = jnp.asarray(np.arange(24.0).reshape(2, 3, 4), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(mT(a)), np.swapaxes(np.asarray(a), -1, -2))
    b = jnp.asarray(np.ones((2, 4, 5)), jnp.bfloat16)
    out = matmul(a, b, jnp.float32)
    assert out.dtype == jnp.float32 and matmul(a, b).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out), np.asarray(a, np.float32) @ np.ones((2, 4, 5)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's bfloat16 dot path")
def test_bfloat16_products_run_without_float32_upcasts_on_the_cpu():
    """Forward, input gradient and weight gradient of a bfloat16 projection: XLA CPU multiplies bfloat16 operands
    directly only in the row-major [M,K].[K,N] form with a float32 result; otherwise it converts the operands to
    float32 first (a 4-6x slower product). Every dot of the compiled program must take bfloat16 operands."""
    x = jnp.ones((256, 128), jnp.bfloat16)
    w = jnp.ones((128, 64), jnp.float32)
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(dense(a, b).astype(jnp.float32) ** 2), argnums=(0, 1)))
    hlo = grad.lower(x, w).compile().as_text()
    operands = []  # the dtypes of each dot's operands, read off the computation it is fused into
    for comp in re.split(r"\n(?=%|ENTRY)", hlo):
        for dot in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", comp):
            operands.append(tuple(re.search(rf"%{re.escape(o)} = (\w+)\[", comp).group(1) for o in dot))
    assert operands == [("bf16", "bf16")] * 3, operands
