"""The model's projections: x [..., in...] . w [in..., out...] in x's dtype (the compute dtype).

In float32 this is the plain `dot_general` (what `x @ w` and the einsums give). In bfloat16 on the CPU it is one
2-D product [M, K] . [K, N] per pass with float32 accumulation, written so that XLA's CPU backend runs all three
(forward, input gradient, weight gradient) on its bfloat16 fast path (the YNNPACK fusion, AMX on Sapphire
Rapids: 0.8-1.5 TFLOP/s on 2 cores against 0.26 for float32). That path takes only the row-major product
[M, K] . [K, N] with bfloat16 operands and a float32 result: a bfloat16 result, or an operand that XLA reads
transposed (the x^T . g and g . w^T of an autodiff backward), falls back to float32 arithmetic at 0.26 TFLOP/s.
So the backward is written out (`jax.custom_vjp`) with the transposed operands materialised in row-major form
(`mT`: a [M, K, 1] -> [K, M, 1] transpose, which XLA's algebraic simplifier does not fold into the dot). `mT` and
`matmul` serve the same way in the attention core and the expert GEMMs.

Values: the forward rounds the float32 accumulator to bfloat16 once (autodiff of `x @ w.astype(bf16)` rounds the
same product, accumulated in bfloat16-rounded partial sums on some backends); the weight gradient is accumulated
and returned in the weight's dtype (float32 master weights), the input gradient in x's dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dsv3_jax.residuals import as_bits, from_bits


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype=None) -> jax.Array:
    """x [..., in...] contracted with w [in..., out...] over the last `n_in` axes of x and the first `n_in` of w,
    in x's dtype (w is cast to it); the result in `out_dtype` (default x's dtype: float32 for the logits)."""
    if _bf16_cpu(x):
        out = jnp.dtype(out_dtype or x.dtype)
        return contract_2d("dense", lambda a, b: _bf16_matmul(a, b, out), x, w, n_in)
    _check_contraction("dense", x, w, n_in)
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, w.astype(x.dtype), dims, preferred_element_type=out_dtype)


def contract_2d(name: str, linear, x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """`linear` ([M, K], [K, N]) -> [M, N] applied to x [..., in...] and w [in..., out...] flattened to 2-D (the
    last `n_in` axes of x and the first `n_in` of w contracted), the result as [..., out...]; a ValueError naming
    `name` when those axes differ."""
    _check_contraction(name, x, w, n_in)
    k = math.prod(w.shape[:n_in])
    y = linear(x.reshape(-1, k), w.reshape(k, -1))
    return y.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:])


def _check_contraction(name: str, x: jax.Array, w: jax.Array, n_in: int) -> None:
    if not 1 <= n_in < w.ndim or x.shape[x.ndim - n_in:] != w.shape[:n_in]:
        raise ValueError(f"{name}: cannot contract the last {n_in} axes of x {x.shape} with w {w.shape}")


def _bf16_cpu(a: jax.Array) -> bool:
    return a.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"


def mT(a: jax.Array) -> jax.Array:
    """a with its last two axes swapped, for use as a matmul operand: in bfloat16 on the CPU materialised
    row-major (a plain swap would be folded into the consuming dot as a transposed operand, which takes XLA CPU's
    float32 path), otherwise the plain swap."""
    if not _bf16_cpu(a):
        return jnp.swapaxes(a, -1, -2)
    *b, m, k = a.shape
    return jnp.swapaxes(a.reshape(*b, m, k, 1), -3, -2).reshape(*b, k, m)


def matmul(a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """a @ b accumulated in float32, in `out_dtype` (default a's dtype): the form XLA CPU's bfloat16 path takes
    (with row-major operands, `mT`); in float32 the plain a @ b."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(out_dtype or a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_matmul(x_MK: jax.Array, w_KN: jax.Array, out_dtype) -> jax.Array:
    return matmul(x_MK, w_KN.astype(jnp.bfloat16), out_dtype)


def _bf16_matmul_fwd(x_MK, w_KN, out_dtype):
    return _bf16_matmul(x_MK, w_KN, out_dtype), as_bits((x_MK, w_KN))  # as bits: see dsv3_jax/residuals.py


def _bf16_matmul_bwd(out_dtype, res, g_MN):
    x_MK, w_KN = from_bits(*res)
    g_MN = g_MN.astype(jnp.bfloat16)
    dx_MK = matmul(g_MN, mT(w_KN.astype(jnp.bfloat16)))
    dw_KN = matmul(mT(x_MK), g_MN, w_KN.dtype)
    return dx_MK, dw_KN


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)
