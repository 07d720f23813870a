"""Token dispatch and combine for MoE in the contiguous layout (reference §5.2 DeepGEMM contiguous layout, §5.3).

``dispatch`` places the T*K (token, slot) pairs of a top-K routing in expert-contiguous order, each expert's segment
padded to a multiple of ``align`` (128 for the grouped GEMM), in a buffer of static worst-case length
``round_up(T*K + E*(align-1), align)`` so no pair is ever dropped. ``combine`` is its weighted inverse:
``y_TD[t] = sum_k weights[t, k] * y_PD[row[t, k]]``. The index computation (a stable argsort and cumsums) is
plain jnp; the row gathers are Pallas kernels on GPU (one program per block of rows, rows fetched one at a time by
a data-dependent index loaded from an int32 input, as the Triton backend has no scalar prefetch) and plain jnp
gathers elsewhere.

Dimension letters: T tokens, K routing slots (top-k), E experts, P buffer rows, D model width.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._select import next_pow2, resolve_impl, round_up
from pallas_kernels.fp8_gemm import _from_bits, _to_bits

ROW_BLOCK = 32  # buffer rows (dispatch) or tokens (combine) per program
MAX_BLOCK_D = 512  # columns per program; the D axis is a second grid axis


class ContiguousLayout(NamedTuple):
    """Where each (token, slot) pair sits in the expert-contiguous buffer, and what each buffer row holds."""

    row_TK: jax.Array  # int32 buffer row of pair (t, k); -1 for slots routed to an expert id outside [0, E)
    pair_P: jax.Array  # int32 t*K + k of the pair in row p; -1 on padding rows
    m_indices_P: jax.Array  # int32 expert of row p; -1 on padding rows (DeepGEMM's m_indices)
    group_sizes_E: jax.Array  # int32 real rows per expert; segment e spans round_up(group_sizes_E[e], align) rows


def buffer_rows(num_pairs: int, num_experts: int, align: int) -> int:
    """Static buffer length: every pair plus the worst-case padding of every segment, rounded up to ``align``."""
    return round_up(num_pairs + num_experts * (align - 1), align)


def _check_dispatch_args(x_TD, experts_TK, num_experts, align) -> None:
    if x_TD.ndim != 2:
        raise ValueError(f"dispatch: x_TD must be [T, D], got shape {x_TD.shape}")
    if experts_TK.ndim != 2 or experts_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"dispatch: experts_TK must be [T={x_TD.shape[0]}, K], got shape {experts_TK.shape}")
    if not jnp.issubdtype(experts_TK.dtype, jnp.integer):
        raise ValueError(f"dispatch: experts_TK must hold integer expert ids, got dtype {experts_TK.dtype}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"dispatch: num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(align, int) or isinstance(align, bool) or align < 1:
        raise ValueError(f"dispatch: align must be a positive int, got {align!r}")


@functools.partial(jax.jit, static_argnames=("num_experts", "align"))
def contiguous_layout(experts_TK, num_experts: int, align: int = 128) -> ContiguousLayout:
    """The contiguous layout of a routing (jnp index computation; ids outside [0, E) are left out)."""
    T, K = experts_TK.shape
    n = T * K
    P = buffer_rows(n, num_experts, align)
    e_N = experts_TK.reshape(n).astype(jnp.int32)
    valid_N = (e_N >= 0) & (e_N < num_experts)
    key_N = jnp.where(valid_N, e_N, num_experts)  # invalid ids sort after every expert and get no row
    counts_E = jnp.bincount(key_N, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    seg_len_E = (counts_E + align - 1) // align * align
    seg_start_E = jnp.cumsum(seg_len_E) - seg_len_E
    first_rank_E = jnp.cumsum(counts_E) - counts_E  # sorted position of each expert's first pair
    order_N = jnp.argsort(key_N, stable=True)  # pairs of one expert keep token order
    key_sorted = key_N[order_N]
    e_clip = jnp.minimum(key_sorted, num_experts - 1)
    row_sorted = seg_start_E[e_clip] + jnp.arange(n, dtype=jnp.int32) - first_rank_E[e_clip]
    row_sorted = jnp.where(key_sorted < num_experts, row_sorted, -1)
    row_N = jnp.zeros((n,), jnp.int32).at[order_N].set(row_sorted.astype(jnp.int32))
    scatter_N = jnp.where(row_N >= 0, row_N, P)  # out of bounds: dropped by mode="drop"
    pair_P = jnp.full((P,), -1, jnp.int32).at[scatter_N].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    m_indices_P = jnp.full((P,), -1, jnp.int32).at[scatter_N].set(e_N, mode="drop")
    return ContiguousLayout(row_N.reshape(T, K), pair_P, m_indices_P, counts_E)


# --------------------------------------------------------------------------------------------- references


@functools.partial(jax.jit, static_argnames=("num_slots",))
def _dispatch_rows_ref(x_TD, pair_P, num_slots: int):
    """jnp gather: row p = x[pair_P[p] // K], zero where pair_P is -1."""
    src_P = jnp.maximum(pair_P, 0) // num_slots
    return jnp.where((pair_P >= 0)[:, None], x_TD[src_P], jnp.zeros((), x_TD.dtype))


@jax.jit
def _combine_rows_ref(y_PD, row_TK, weights_TK):
    """jnp gather-and-weight: y[t] = sum_k w[t, k] * y_PD[row[t, k]] in FP32, rows of -1 contribute nothing."""
    y_TKD = y_PD[jnp.maximum(row_TK, 0)].astype(jnp.float32)
    w_TK = jnp.where(row_TK >= 0, weights_TK.astype(jnp.float32), 0.0)
    y_TD = jnp.zeros(y_TKD.shape[::2], jnp.float32)
    for k in range(row_TK.shape[1]):  # slot order, as the kernel accumulates
        y_TD = y_TD + w_TK[:, k, None] * y_TKD[:, k]
    return y_TD.astype(y_PD.dtype)


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


def _source_tokens(pair_P, num_slots: int):
    return jnp.where(pair_P >= 0, pair_P // num_slots, -1)


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


# --------------------------------------------------------------------------------------------- VJPs
# The kernels' gradients are the same two gathers: dispatch's transpose is an unweighted combine, combine's
# transpose (in y) is a dispatch scaled per row by the pair's weight; the weight gradient <g[t], y[row]> is jnp.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dispatch_pallas(x_TD, layout: ContiguousLayout, num_slots: int, interpret: bool):
    return _gather_rows_pallas(x_TD, _source_tokens(layout.pair_P, num_slots), None, interpret=interpret)


def _dispatch_pallas_fwd(x_TD, layout, num_slots, interpret):
    return _dispatch_pallas(x_TD, layout, num_slots, interpret), layout


def _dispatch_pallas_bwd(num_slots, interpret, layout, g_PD):
    ones_TK = jnp.ones(layout.row_TK.shape, jnp.float32)
    return _combine_rows_pallas(g_PD, layout.row_TK, ones_TK, interpret=interpret), None


_dispatch_pallas.defvjp(_dispatch_pallas_fwd, _dispatch_pallas_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _combine_pallas(y_PD, layout: ContiguousLayout, weights_TK, interpret: bool):
    return _combine_rows_pallas(y_PD, layout.row_TK, weights_TK, interpret=interpret)


def _combine_pallas_fwd(y_PD, layout, weights_TK, interpret):
    return _combine_pallas(y_PD, layout, weights_TK, interpret), (y_PD, layout, weights_TK)


def _combine_pallas_bwd(interpret, res, g_TD):
    y_PD, layout, weights_TK = res
    pair_P, row_TK = layout.pair_P, layout.row_TK
    w_P = jnp.where(pair_P >= 0, weights_TK.reshape(-1)[jnp.maximum(pair_P, 0)].astype(jnp.float32), 0.0)
    dy_PD = _gather_rows_pallas(g_TD, _source_tokens(pair_P, row_TK.shape[1]), w_P, interpret=interpret)
    y_TKD = y_PD[jnp.maximum(row_TK, 0)].astype(jnp.float32)
    dw_TK = jnp.where(row_TK >= 0, jnp.einsum("tkd,td->tk", y_TKD, g_TD.astype(jnp.float32)), 0.0)
    return dy_PD.astype(y_PD.dtype), None, dw_TK.astype(weights_TK.dtype)


_combine_pallas.defvjp(_combine_pallas_fwd, _combine_pallas_bwd)


# --------------------------------------------------------------------------------------------- entry points


def dispatch(x_TD, experts_TK, num_experts: int, align: int = 128, *, impl=None, interpret=None):
    """Expert-contiguous buffer x_PD of all T*K (token, slot) pairs (segments padded to ``align``) and its layout.

    Real rows equal their source token, padding rows are zero with ``m_indices`` -1; expert ids outside
    [0, num_experts) get no row. Pallas gather on GPU, jnp elsewhere (``impl``/``interpret`` force one).
    """
    impl, interpret = resolve_impl(impl, interpret)
    _check_dispatch_args(x_TD, experts_TK, num_experts, align)
    layout = contiguous_layout(experts_TK, num_experts=num_experts, align=align)
    K = experts_TK.shape[1]
    if impl == "ref":
        return _dispatch_rows_ref(x_TD, layout.pair_P, K), layout
    return _dispatch_pallas(x_TD, layout, K, interpret), layout


def combine(y_PD, layout: ContiguousLayout, weights_TK, *, impl=None, interpret=None):
    """y_TD[t] = sum_k weights_TK[t, k] * y_PD[row of (t, k)], accumulated in FP32, returned in y_PD's dtype."""
    impl, interpret = resolve_impl(impl, interpret)
    if y_PD.ndim != 2 or y_PD.shape[0] != layout.pair_P.shape[0]:
        raise ValueError(f"combine: y_PD must be [P={layout.pair_P.shape[0]}, D], got shape {y_PD.shape}")
    if tuple(weights_TK.shape) != tuple(layout.row_TK.shape):
        raise ValueError(f"combine: weights_TK must be {tuple(layout.row_TK.shape)}, got shape {weights_TK.shape}")
    if impl == "ref":
        return _combine_rows_ref(y_PD, layout.row_TK, weights_TK)
    return _combine_pallas(y_PD, layout, weights_TK, interpret)


def dispatch_ref(x_TD, experts_TK, num_experts: int, align: int = 128):
    """Plain-jnp ``dispatch`` (same layout, rows gathered by jnp indexing)."""
    return dispatch(x_TD, experts_TK, num_experts, align, impl="ref")


def combine_ref(y_PD, layout: ContiguousLayout, weights_TK):
    """Plain-jnp ``combine`` (FP32 accumulation in slot order, like the kernel)."""
    return combine(y_PD, layout, weights_TK, impl="ref")
