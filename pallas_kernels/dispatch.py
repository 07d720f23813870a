"""Token dispatch and combine for MoE in the contiguous layout (reference §5.2 DeepGEMM contiguous layout, §5.3):
the Pallas row gathers and their jnp references, over the arrays of `dsv3_jax.model.experts.ExpertLayout`.

``dispatch_rows`` fills the expert-sorted buffer: row p = x[src_P[p]] (zero where src_P is -1, the padding rows).
``combine_rows`` is its weighted inverse: ``y_TD[t] = sum_k weights[t, k] * y_PD[row_TK[t, k]]`` (rows of -1
contribute nothing). The layout itself (a stable argsort and cumsums) is computed once, by the model
(`dsv3_jax.model.experts.expert_layout`), which also picks kernel or reference by backend. The kernels run one
program per block of rows, rows fetched one at a time by a data-dependent index loaded from an int32 input (the
Triton backend has no scalar prefetch).

Dimension letters: T tokens, K routing slots (top-k), P buffer rows, D model width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._select import next_pow2, round_up
from pallas_kernels.fp8_gemm import _from_bits, _to_bits

ROW_BLOCK = 32  # buffer rows (dispatch) or tokens (combine) per program
MAX_BLOCK_D = 512  # columns per program; the D axis is a second grid axis


# --------------------------------------------------------------------------------------------- references


def dispatch_rows_ref(x_TD, src_P, row_TK):
    """jnp gather: row p = x_TD[src_P[p]], zero where src_P is -1 (``row_TK``: the kernel's signature)."""
    del row_TK
    x_ext = jnp.concatenate([x_TD, jnp.zeros((1, x_TD.shape[1]), x_TD.dtype)])  # row T: the padding rows' zero
    return x_ext[jnp.where(src_P < 0, x_TD.shape[0], src_P)]


def combine_rows_ref(y_PD, src_P, row_TK, weights_TK):
    """jnp gather-and-weight: y[t] = sum_k w[t, k] * y_PD[row[t, k]] in FP32, rows of -1 contribute nothing."""
    del src_P
    w_TK = jnp.where(row_TK >= 0, weights_TK.astype(jnp.float32), 0.0)
    y_TKD = y_PD[jnp.maximum(row_TK, 0)].astype(jnp.float32)
    return jnp.einsum("tk,tkd->td", w_TK, y_TKD).astype(y_PD.dtype)


# --------------------------------------------------------------------------------------------- kernels


def _gather_kernel(src_ref, *refs, scaled: bool, dtype):
    # src_ref [br] int32 source row of each output row (-1: padding); scale_ref [br] f32 if scaled;
    # x_ref [T, bd]; o_ref [br, bd]; x and o hold the bits of ``dtype`` (``_to_bits``): an unscaled row is copied
    # as is.
    scale_ref, x_ref, o_ref = refs if scaled else (None, *refs)

    def row(r, carry):
        s = src_ref[r]
        x_row = x_ref[jnp.maximum(s, 0), :]
        if scaled:
            x_row = _from_bits(x_row, dtype).astype(jnp.float32) * scale_ref[r]
            x_row = _to_bits(x_row.astype(dtype))
        o_ref[r, :] = jnp.where(s >= 0, x_row, jnp.zeros_like(x_row))
        return carry

    jax.lax.fori_loop(0, o_ref.shape[0], row, 0)


def _combine_kernel(row_ref, w_ref, y_ref, o_ref, *, dtype):
    # row_ref/w_ref [bt, K]: buffer rows and weights of each token's slots; y_ref [P, bd] and o_ref [bt, bd]
    # hold the bits of ``dtype``.
    num_slots = row_ref.shape[1]

    def token(t, carry):
        acc = jnp.zeros((o_ref.shape[1],), jnp.float32)
        for k in range(num_slots):
            r = row_ref[t, k]
            y_row = _from_bits(y_ref[jnp.maximum(r, 0), :], dtype).astype(jnp.float32)
            acc = acc + jnp.where(r >= 0, w_ref[t, k], 0.0) * y_row
        o_ref[t, :] = _to_bits(acc.astype(dtype))
        return carry

    jax.lax.fori_loop(0, o_ref.shape[0], token, 0)


def _triton_params():
    """Triton launch parameters for the row gathers (memory-bound copies; no MMA, no pipelining to tune)."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4, num_stages=1)


def _d_blocks(D: int) -> tuple[int, int]:
    bd = min(MAX_BLOCK_D, next_pow2(D))
    return bd, round_up(D, bd)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _gather_rows_pallas(x_TD, src_P, scale_P, interpret: bool):
    """Row p of the output = x_TD[src_P[p]] (times scale_P[p] if given), zero where src_P is -1."""
    (T, D), P = x_TD.shape, src_P.shape[0]
    scaled = scale_P is not None
    br = min(ROW_BLOCK, next_pow2(P))
    bd, Dp = _d_blocks(D)
    Pp = round_up(P, br)
    operands = [jnp.pad(src_P, (0, Pp - P), constant_values=-1)]
    in_specs = [pl.BlockSpec((br,), lambda i, j: (i,))]
    if scaled:
        operands.append(jnp.pad(scale_P.astype(jnp.float32), (0, Pp - P)))
        in_specs.append(pl.BlockSpec((br,), lambda i, j: (i,)))
    x_bits = jnp.pad(_to_bits(x_TD), ((0, 0), (0, Dp - D)))
    operands.append(x_bits)
    in_specs.append(pl.BlockSpec((T, bd), lambda i, j: (0, j)))
    out = pl.pallas_call(
        functools.partial(_gather_kernel, scaled=scaled, dtype=x_TD.dtype),
        out_shape=jax.ShapeDtypeStruct((Pp, Dp), x_bits.dtype),
        grid=(Pp // br, Dp // bd),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((br, bd), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
        name="moe_gather_rows",
    )(*operands)
    return _from_bits(out[:P, :D], x_TD.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _combine_rows_pallas(y_PD, row_TK, weights_TK, interpret: bool):
    (P, D), (T, K) = y_PD.shape, row_TK.shape
    bt = min(ROW_BLOCK, next_pow2(T))
    bd, Dp = _d_blocks(D)
    Tp = round_up(T, bt)
    row_TK = jnp.pad(row_TK, ((0, Tp - T), (0, 0)), constant_values=-1)
    w_TK = jnp.pad(weights_TK.astype(jnp.float32), ((0, Tp - T), (0, 0)))
    y_bits = jnp.pad(_to_bits(y_PD), ((0, 0), (0, Dp - D)))
    out = pl.pallas_call(
        functools.partial(_combine_kernel, dtype=y_PD.dtype),
        out_shape=jax.ShapeDtypeStruct((Tp, Dp), y_bits.dtype),
        grid=(Tp // bt, Dp // bd),
        in_specs=[
            pl.BlockSpec((bt, K), lambda i, j: (i, 0)),
            pl.BlockSpec((bt, K), lambda i, j: (i, 0)),
            pl.BlockSpec((P, bd), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
        name="moe_combine",
    )(row_TK, w_TK, y_bits)
    return _from_bits(out[:T, :D], y_PD.dtype)


# --------------------------------------------------------------------------------------------- kernels + VJPs
# The kernels' gradients are the same two gathers: dispatch's transpose is an unweighted combine, combine's
# transpose (in y) is a dispatch scaled per row by the pair's weight; the weight gradient <g[t], y[row]> is jnp.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dispatch_rows(x_TD, src_P, row_TK, interpret: bool):
    """Pallas ``dispatch_rows_ref``: row p = x_TD[src_P[p]], zero where src_P is -1 (custom VJP: a combine)."""
    return _gather_rows_pallas(x_TD, src_P, None, interpret=interpret)


def _dispatch_rows_fwd(x_TD, src_P, row_TK, interpret):
    return dispatch_rows(x_TD, src_P, row_TK, interpret), row_TK


def _dispatch_rows_bwd(interpret, row_TK, g_PD):
    ones_TK = jnp.ones(row_TK.shape, jnp.float32)
    return _combine_rows_pallas(g_PD, row_TK, ones_TK, interpret=interpret), None, None


dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def combine_rows(y_PD, src_P, row_TK, weights_TK, interpret: bool):
    """Pallas ``combine_rows_ref``: y[t] = sum_k w[t, k] * y_PD[row[t, k]], FP32 accumulation in slot order."""
    return _combine_rows_pallas(y_PD, row_TK, weights_TK, interpret=interpret)


def _combine_rows_fwd(y_PD, src_P, row_TK, weights_TK, interpret):
    return combine_rows(y_PD, src_P, row_TK, weights_TK, interpret), (y_PD, src_P, row_TK, weights_TK)


def _combine_rows_bwd(interpret, res, g_TD):
    y_PD, src_P, row_TK, weights_TK = res
    # each row's pair weight, scattered to the rows (rows of -1 are dropped; padding rows keep 0)
    w_P = jnp.zeros(src_P.shape, jnp.float32).at[jnp.where(row_TK >= 0, row_TK, src_P.shape[0])].set(
        weights_TK.astype(jnp.float32), mode="drop")
    dy_PD = _gather_rows_pallas(g_TD, src_P, w_P, interpret=interpret)
    y_TKD = y_PD[jnp.maximum(row_TK, 0)].astype(jnp.float32)
    dw_TK = jnp.where(row_TK >= 0, jnp.einsum("tkd,td->tk", y_TKD, g_TD.astype(jnp.float32)), 0.0)
    return dy_PD.astype(y_PD.dtype), None, None, dw_TK.astype(weights_TK.dtype)


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)
