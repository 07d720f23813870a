"""Block-scaled FP8 GEMM reference, C = A @ B^T (DeepSeek-V3 paper §3.3.2; reference §5.1 fp8_gemm, §5.2 DeepGEMM).

A is quantized per 1x128 tile (x_s [M, nK]) and B per 128x128 block (w_s [nN, nK]). Each 128-wide K slice is
multiplied in FP32 and promoted into the FP32 accumulator with its scales applied there:
``acc += (a_blk @ b_blk^T) * a_s[:, kb][:, None] * b_s[n // 128, kb][None, :]``; the output is cast once at the end.

Dimension letters: M rows of A, N rows of B (out features), K contraction, k the K block index (nK blocks), b the
offset within a K block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK_K = 128  # the scale granularity along K; DeepGEMM asserts BLOCK_K == 128
BLOCK_N = 128


def _check_shapes(x_q, x_s, w_q, w_s) -> None:
    if x_q.ndim != 2:
        raise ValueError(f"fp8_gemm: x_q must be [M, K], got shape {x_q.shape}")
    if w_q.ndim != 2:
        raise ValueError(f"fp8_gemm: w_q must be [N, K], got shape {w_q.shape}")
    (M, K), (N, K_w) = x_q.shape, w_q.shape
    if K_w != K:
        raise ValueError(f"fp8_gemm: w_q must be [N, K={K}] to match x_q {x_q.shape}, got shape {w_q.shape}")
    nK, nN = -(-K // BLOCK_K), -(-N // BLOCK_N)
    if tuple(x_s.shape) != (M, nK):
        raise ValueError(f"fp8_gemm: x_s must be [M, ceil(K/128)] = {(M, nK)}, got shape {x_s.shape}")
    if tuple(w_s.shape) != (nN, nK):
        raise ValueError(
            f"fp8_gemm: w_s must be [ceil(N/128), ceil(K/128)] = {(nN, nK)}, got shape {w_s.shape}"
        )


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_gemm_ref(x_q, x_s, w_q, w_s, out_dtype=jnp.bfloat16):
    """Plain-jnp block-scaled FP8 GEMM: [M, K] e4m3 x [N, K] e4m3 -> [M, N] out_dtype, FP32 accumulation."""
    _check_shapes(x_q, x_s, w_q, w_s)
    (M, K), N = x_q.shape, w_q.shape[0]
    nK = x_s.shape[1]
    pad_K = nK * BLOCK_K - K
    # Zero padding of the partial last K block contributes exactly 0 to every partial product.
    x_MkB = jnp.pad(x_q.astype(jnp.float32), ((0, 0), (0, pad_K))).reshape(M, nK, BLOCK_K)
    w_NkB = jnp.pad(w_q.astype(jnp.float32), ((0, 0), (0, pad_K))).reshape(N, nK, BLOCK_K)
    # One FP32 partial product per (row, col, K block): the values the kernel promotes every 128 elements.
    # Memory is M*N*nK floats; this is a test reference, not a production path.
    part_MNk = jnp.einsum("mkb,nkb->mnk", x_MkB, w_NkB, precision=jax.lax.Precision.HIGHEST)
    w_s_Nk = jnp.repeat(w_s.astype(jnp.float32), BLOCK_N, axis=0)[:N]
    acc_MN = jnp.sum(part_MNk * x_s.astype(jnp.float32)[:, None, :] * w_s_Nk[None, :, :], axis=-1)
    return acc_MN.astype(out_dtype)
