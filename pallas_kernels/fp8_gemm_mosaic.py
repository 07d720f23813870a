"""Block-scaled FP8 GEMM on Hopper through Pallas' Mosaic GPU backend: e4m3 ``wgmma`` with FP32 promotion
(DeepSeek-V3 paper §3.3.2; reference §5.2 DeepGEMM).

Pallas' Triton lowering turns an e4m3 dot into f16 ``mma.sync`` on sm_90 (see ``fp8_gemm._resolve_dot_dtype``), so
that kernel runs at the bf16 rate at best. Mosaic GPU emits the FP8 ``wgmma``. A ``plgpu.kernel`` launch of one
block per SM walks the output tiles; per tile a TMA pipeline over K brings (x, w, scale) slices into shared memory,
the tensor cores multiply each 128-wide K slice into a fresh FP32 accumulator, and the CUDA cores promote it into the
tile's running FP32 sum with both scales applied: ``acc += part * x_s[:, k][:, None] * w_s[k, n][None, :]``, the
paper's promotion at N_C = 128 (FP8 wgmma keeps only ~14 significant bits while it accumulates, §3.3.2).

The weight scale arrives as one value per output column and K block (``ws_kN``, [nK, N]): a 128x128 block's scale
repeated over its 128 columns, or the per-column scales of the weight-gradient GEMM (``w_granularity="row"``), so
both granularities share one kernel. Operands are K-major, as FP8 ``wgmma`` requires: x [M, K] and w [N, K] are
row-major, and the w tile is transposed in shared memory by the MMA descriptor, not copied.

With ``k_per_step=2`` a pipeline step issues two K slices' MMAs back to back and promotes the first while the second
runs (two FP32 partial accumulators, as DeepGEMM overlaps promotion with the next MMA).

Measured on an H200 (jax 0.11.2, benchmarks/fp8_gemm.py, M=4096): 360-600 TFLOP/s at the V3 shapes, 3.8-5.4x the
Triton kernel and 0.53-0.87x cuBLAS bf16 (docs/design.md). Only traceable where Mosaic GPU lowers (a CUDA backend,
or ``lowering_platforms=("cuda",)`` for a lowering check on any machine); there is no interpret mode.
``fp8_gemm.fp8_gemm`` selects it on Hopper.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK_K = 128  # the scale granularity along K (one promotion per 128-wide slice)
SWIZZLE = 128  # bytes: a 128-wide e4m3 row is one 128-byte swizzle span


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile and pipeline sizes of the Mosaic kernel (one warpgroup per output tile)."""

    # Defaults: the best of benchmarks/fp8_gemm.py --tune on an H200 at M=4096, K x N = 7168 x 2112 and
    # 16384 x 7168 (592 and 588 TFLOP/s; 64x128 tiles with one slice per step gave 376 and 512).
    tile_m: int = 128  # a multiple of 64 (the wgmma M)
    tile_n: int = 64  # a multiple of 8, at most 256
    k_per_step: int = 2  # K slices per pipeline step (2: promotion of one overlaps the next MMA)
    max_concurrent_steps: int = 4  # TMA pipeline depth (steps in flight)

    def __post_init__(self):
        if self.tile_m % 64 or self.tile_m <= 0:
            raise ValueError(f"MosaicConfig.tile_m must be a positive multiple of 64, got {self.tile_m}")
        if self.tile_n % 8 or not 0 < self.tile_n <= 256:
            raise ValueError(f"MosaicConfig.tile_n must be a multiple of 8 in [8, 256], got {self.tile_n}")
        if self.k_per_step not in (1, 2):
            raise ValueError(f"MosaicConfig.k_per_step must be 1 or 2, got {self.k_per_step}")
        if self.max_concurrent_steps < 1:
            raise ValueError(f"MosaicConfig.max_concurrent_steps must be >= 1, got {self.max_concurrent_steps}")


def _kernel(x_gmem, w_gmem, xs_gmem, ws_gmem, o_gmem, *, config: MosaicConfig, n_steps: int):
    # x_gmem [M, K] e4m3, w_gmem [N, K] e4m3, xs_gmem [nK, M], ws_gmem [nK, N] f32, o_gmem [M, N]. Each block of the
    # launch ("sm") walks output tiles; per tile a TMA pipeline over K feeds (x, w, scale) slices into SMEM.
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tm, tn, kps = config.tile_m, config.tile_n, config.k_per_step
    m_iters, n_iters = o_gmem.shape[0] // tm, o_gmem.shape[1] // tn
    tiled = (plgpu.TilingTransform((8, SWIZZLE)), plgpu.SwizzleTransform(SWIZZLE))  # 1-byte elements
    out_elems = SWIZZLE // jnp.dtype(o_gmem.dtype).itemsize
    out_tiled = (plgpu.TilingTransform((8, min(out_elems, tn))), plgpu.SwizzleTransform(SWIZZLE))

    def scale(xs_smem, ws_smem, j):
        """The outer product of K slice j's row and column scales, in the accumulator's layout."""
        xs = plgpu.load(xs_smem, (j, slice(None)), layout=plgpu.Layout.WGMMA.reduce(1))
        ws = plgpu.load(ws_smem, (j, slice(None)), layout=plgpu.Layout.WGMMA.reduce(0))
        return jax.lax.broadcast_in_dim(xs, (tm, tn), (0,)) * jax.lax.broadcast_in_dim(ws, (tm, tn), (1,))

    def k_slice(ref, j):
        return ref if kps == 1 else ref.at[:, pl.ds(j * BLOCK_K, BLOCK_K)]

    def step(_, x_smem, w_smem, xs_smem, ws_smem, acc):
        def mma(*part_refs):
            for j, part in enumerate(part_refs):  # async: all slices' MMAs are in flight together
                plgpu.wgmma(part, k_slice(x_smem, j), plgpu.transpose_ref(k_slice(w_smem, j), (1, 0)))
            for j, part in enumerate(part_refs):  # promote slice j once at most kps - 1 - j MMAs remain
                yield plgpu.wgmma_accumulator_load(part, wait_n=kps - 1 - j) * scale(xs_smem, ws_smem, j)

        parts = pl.run_scoped(lambda *refs: list(mma(*refs)), *[plgpu.ACC((tm, tn), jnp.float32)] * kps)
        for part in parts:
            acc = acc + part
        return acc

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tile(info):
        (lin,) = info.index
        mi, ni = jax.lax.div(lin, n_iters), jax.lax.rem(lin, n_iters)
        acc = plgpu.emit_pipeline(
            step,
            grid=(n_steps,),
            in_specs=[
                plgpu.BlockSpec((tm, BLOCK_K * kps), lambda k: (mi, k), transforms=tiled),
                plgpu.BlockSpec((tn, BLOCK_K * kps), lambda k: (ni, k), transforms=tiled),
                plgpu.BlockSpec((kps, tm), lambda k: (k, mi)),
                plgpu.BlockSpec((kps, tn), lambda k: (k, ni)),
            ],
            max_concurrent_steps=min(config.max_concurrent_steps, n_steps),
            init_carry=plgpu.layout_cast(jnp.zeros((tm, tn), jnp.float32), plgpu.Layout.WGMMA),
        )(x_gmem, w_gmem, xs_gmem, ws_gmem)

        def store(o_smem):
            o_smem[...] = acc.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * tm, tm), pl.ds(ni * tn, tn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_smem is rewritten by the next tile

        pl.run_scoped(store, plgpu.SMEM((tm, tn), o_gmem.dtype, transforms=out_tiled))


def fp8_gemm_mosaic_padded(x_q, xs_kM, w_q, ws_kN, out_dtype, config: MosaicConfig):
    """[M, N] out_dtype from zero-padded operands: x_q [M, K] e4m3, w_q [N, K] e4m3 (M, N multiples of the tiles, K
    of 128 * k_per_step), xs_kM [nK, M] and ws_kN [nK, N] f32 (MN-major scales, one per row / column and K block)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (M, K), N = x_q.shape, w_q.shape[0]
    tm, tn, kps = config.tile_m, config.tile_n, config.k_per_step
    if M % tm or N % tn or K % (BLOCK_K * kps):
        raise ValueError(f"fp8_gemm_mosaic: padded shapes M={M}, N={N}, K={K} must be multiples of "
                         f"({tm}, {tn}, {BLOCK_K * kps})")
    device = jax.devices()[0]
    sms = device.core_count if device.platform == "gpu" else 132  # 132: H100/H200 SXM (lowering elsewhere)
    kernel = plgpu.kernel(
        functools.partial(_kernel, config=config, n_steps=K // (BLOCK_K * kps)),
        out_type=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid=(sms,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )
    return kernel(x_q, w_q, xs_kM, ws_kN)
