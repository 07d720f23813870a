"""M-grouped block-scaled FP8 GEMM over the contiguous MoE layout (reference §5.2 DeepGEMM "Grouped GEMMs").

The rows of ``x_q [P, K]`` are grouped by expert: ``m_indices_P`` holds each row's group (-1 on padding rows) and
every ``block_m``-row block (128, DeepGEMM's M alignment) belongs to one group, as
``dsv3_jax.model.experts.expert_layout`` lays them out (its ``expert_P``). Row p of the output is
``x_q[p] @ w_q[m_indices[p]]^T`` with the per-128-K promotion of ``fp8_gemm`` (scales x_s [P, nK] per 1x128 tile,
w_s [G, nN, nK] per 128x128 block of each expert's weight); padding rows give zeros. ``grouped_gemm`` is the non-FP8 variant (bf16/f32 operands, unit scales).

Dimension letters: P buffer rows, G groups (experts), N out features, K contraction, k the K block index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._select import check_block, resolve_impl
from pallas_kernels.fp8_gemm import (
    BLOCK_K,
    BLOCK_N,
    _check_dot_dtype,
    _check_operand_dtypes,
    _from_bits,
    _promoted_k_loop,
    _promoted_matmul_ref,
    _resolve_dot_dtype,
    _to_bits,
    _triton_params,
)

DEFAULT_BLOCK_M = 128  # DeepGEMM's M alignment for the contiguous layout


def _check_grouped_shapes(x_q, x_s, w_q, w_s, m_indices_P, block_m: int) -> None:
    check_block("fp8_grouped_gemm: block_m", block_m)
    if x_q.ndim != 2:
        raise ValueError(f"fp8_grouped_gemm: x_q must be [P, K], got shape {x_q.shape}")
    if w_q.ndim != 3:
        raise ValueError(f"fp8_grouped_gemm: w_q must be [G, N, K], got shape {w_q.shape}")
    (P, K), (G, N, K_w) = x_q.shape, w_q.shape
    if K_w != K:
        raise ValueError(f"fp8_grouped_gemm: w_q must be [G, N, K={K}] to match x_q {x_q.shape}, got {w_q.shape}")
    nK, nN = -(-K // BLOCK_K), -(-N // BLOCK_N)
    if tuple(x_s.shape) != (P, nK):
        raise ValueError(f"fp8_grouped_gemm: x_s must be [P, ceil(K/128)] = {(P, nK)}, got shape {x_s.shape}")
    if tuple(w_s.shape) != (G, nN, nK):
        raise ValueError(
            f"fp8_grouped_gemm: w_s must be [G, ceil(N/128), ceil(K/128)] = {(G, nN, nK)}, got shape {w_s.shape}"
        )
    if tuple(m_indices_P.shape) != (P,) or not jnp.issubdtype(m_indices_P.dtype, jnp.integer):
        raise ValueError(
            f"fp8_grouped_gemm: m_indices_P must be an integer [P={P}] array, "
            f"got {m_indices_P.dtype} shape {m_indices_P.shape}"
        )
    if P % block_m:
        raise ValueError(
            f"fp8_grouped_gemm: P={P} rows must be a multiple of block_m={block_m} "
            f"(each group's segment padded to block_m, the contiguous layout)"
        )


def _block_group(m_idx_b):
    """A row block's group: its largest row index (padding rows hold -1)."""
    return jnp.max(m_idx_b)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m"))
def fp8_grouped_gemm_ref(x_q, x_s, w_q, w_s, m_indices_P, out_dtype=jnp.bfloat16, *, block_m=DEFAULT_BLOCK_M):
    """Plain-jnp grouped FP8 GEMM: a scan over row blocks, each times its group's weight (indexed, not copied)."""
    _check_grouped_shapes(x_q, x_s, w_q, w_s, m_indices_P, block_m)
    (P, K), (G, N, _) = x_q.shape, w_q.shape
    n_blocks = P // block_m
    m_bR = m_indices_P.astype(jnp.int32).reshape(n_blocks, block_m)

    def body(_, xs):
        x_RK, xs_Rk, m_R = xs
        g = _block_group(m_R)
        g_safe = jnp.clip(g, 0, G - 1)
        y_RN = _promoted_matmul_ref(x_RK, xs_Rk, w_q[g_safe], w_s[g_safe])
        live = (g >= 0) & (g < G)
        return None, jnp.where((m_R == g)[:, None] & live, y_RN, 0.0)

    _, y_bRN = jax.lax.scan(body, None, (x_q.reshape(n_blocks, block_m, K),
                                         x_s.reshape(n_blocks, block_m, -1), m_bR))
    return y_bRN.reshape(P, N).astype(out_dtype)


def _grouped_kernel(mi_ref, x_ref, xs_ref, w_ref, ws_ref, o_ref, *, n_k: int, n_groups: int, operand_dtype,
                    dot_dtype):
    # mi_ref [bm] int32; x_ref [bm, Kp]; xs_ref [nK, bm]; w_ref [G, Np, Kp] and ws_ref [G, nN, nK] whole (the
    # group is data-dependent, so the weight tile is addressed inside the kernel); o_ref [bm, 128].
    block_m, block_n = o_ref.shape
    j = pl.program_id(1)
    m_idx = mi_ref[...]
    g = _block_group(m_idx)
    live = (g >= 0) & (g < n_groups)
    n0 = pl.multiple_of(j * BLOCK_N, BLOCK_N)

    @pl.when(live)
    def _():
        acc = _promoted_k_loop(
            lambda k0: _from_bits(x_ref[:, pl.ds(k0, BLOCK_K)], operand_dtype),
            lambda k0: _from_bits(w_ref[g, pl.ds(n0, BLOCK_N), pl.ds(k0, BLOCK_K)], operand_dtype),
            lambda kb: xs_ref[kb, :],
            lambda kb: ws_ref[g, j, kb],
            n_k, block_m, block_n, dot_dtype)
        o_ref[...] = jnp.where((m_idx == g)[:, None], acc, 0.0).astype(o_ref.dtype)

    @pl.when(jnp.logical_not(live))
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "interpret", "dot_dtype"))
def _grouped_pallas(x_q, x_s, w_q, w_s, m_indices_P, out_dtype, block_m: int, interpret: bool, dot_dtype):
    (P, K), (G, N, _) = x_q.shape, w_q.shape
    nN, nK = w_s.shape[1:]
    Kp, Np = nK * BLOCK_K, nN * BLOCK_N
    operand_dtype = x_q.dtype
    x_q = jnp.pad(_to_bits(x_q), ((0, 0), (0, Kp - K)))
    w_q = jnp.pad(_to_bits(w_q), ((0, 0), (0, Np - N), (0, Kp - K)))
    out = pl.pallas_call(
        functools.partial(_grouped_kernel, n_k=nK, n_groups=G, operand_dtype=operand_dtype, dot_dtype=dot_dtype),
        out_shape=jax.ShapeDtypeStruct((P, Np), out_dtype),
        grid=(P // block_m, nN),
        in_specs=[
            pl.BlockSpec((block_m,), lambda i, j: (i,)),
            pl.BlockSpec((block_m, Kp), lambda i, j: (i, 0)),
            pl.BlockSpec((nK, block_m), lambda i, j: (0, i)),
            pl.BlockSpec((G, Np, Kp), lambda i, j: (0, 0, 0)),
            pl.BlockSpec((G, nN, nK), lambda i, j: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((block_m, BLOCK_N), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
        name="fp8_grouped_gemm",
    )(m_indices_P.astype(jnp.int32), x_q, x_s.astype(jnp.float32).T, w_q, w_s.astype(jnp.float32))
    return out[:, :N]


def fp8_grouped_gemm(x_q, x_s, w_q, w_s, m_indices_P, out_dtype=jnp.bfloat16, *, impl=None, interpret=None,
                     block_m: int = DEFAULT_BLOCK_M, dot_dtype=None):
    """Contiguous-layout grouped FP8 GEMM: row p -> x_q[p] @ w_q[m_indices[p]]^T, zeros where m_indices is -1.

    Every ``block_m``-row block must hold one group (plus -1 padding rows); Pallas kernel on GPU, the jnp
    reference elsewhere (``impl``/``interpret``/``dot_dtype`` as in ``fp8_gemm``).
    """
    impl, interpret = resolve_impl(impl, interpret)
    _check_grouped_shapes(x_q, x_s, w_q, w_s, m_indices_P, block_m)
    _check_operand_dtypes("fp8_grouped_gemm", x_q, w_q)
    _check_dot_dtype("fp8_grouped_gemm", x_q.dtype, dot_dtype)
    if impl == "ref":
        return fp8_grouped_gemm_ref(x_q, x_s, w_q, w_s, m_indices_P, out_dtype=out_dtype, block_m=block_m)
    if block_m < 16:
        raise ValueError(f"fp8_grouped_gemm: the Pallas kernel needs block_m >= 16, got {block_m}")
    return _grouped_pallas(x_q, x_s, w_q, w_s, m_indices_P, out_dtype=jnp.dtype(out_dtype), block_m=block_m,
                           interpret=interpret, dot_dtype=_resolve_dot_dtype(x_q.dtype, dot_dtype, interpret))


def grouped_gemm(x_PK, w_GNK, m_indices_P, out_dtype=None, *, impl=None, interpret=None,
                 block_m: int = DEFAULT_BLOCK_M):
    """Non-FP8 contiguous-layout grouped GEMM (bf16/f32 operands, FP32 accumulation): the FP8 kernel, unit scales."""
    if x_PK.ndim != 2 or w_GNK.ndim != 3:
        raise ValueError(f"grouped_gemm: x must be [P, K] and w [G, N, K], got {x_PK.shape} and {w_GNK.shape}")
    (P, K), (G, N, _) = x_PK.shape, w_GNK.shape
    nK, nN = -(-K // BLOCK_K), -(-N // BLOCK_N)
    out_dtype = x_PK.dtype if out_dtype is None else out_dtype
    return fp8_grouped_gemm(x_PK, jnp.ones((P, nK), jnp.float32), w_GNK, jnp.ones((G, nN, nK), jnp.float32),
                            m_indices_P, out_dtype, impl=impl, interpret=interpret, block_m=block_m)
