"""The Pallas kernels lower for a CUDA GPU (Pallas -> Triton IR) on this CPU-only machine: the Triton backend's
constraints (power-of-two loads and stores, no scalar prefetch, supported casts) are checked at this stage.
Triton's own compilation to PTX (checked once offline, docs/design.md) and running on a GPU are not covered here.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.dispatch import _combine_rows_pallas, _gather_rows_pallas
from pallas_kernels.fp8_gemm import _fp8_gemm_pallas
from pallas_kernels.grouped_gemm import _grouped_pallas

F8, F32, BF16, I32 = jnp.float8_e4m3fn, jnp.float32, jnp.bfloat16, jnp.int32
S = jax.ShapeDtypeStruct

CASES = {
    "fp8_gemm": (_fp8_gemm_pallas, (S((40, 300), F8), S((40, 3), F32), S((200, 300), F8), S((2, 3), F32)),
                 dict(out_dtype=jnp.dtype(BF16), block_m=64, w_granularity="block", dot_dtype=jnp.dtype(F8))),
    "fp8_gemm_bf16_dot": (_fp8_gemm_pallas, (S((40, 300), F8), S((40, 3), F32), S((200, 300), F8), S((2, 3), F32)),
                          dict(out_dtype=jnp.dtype(BF16), block_m=64, w_granularity="block",
                               dot_dtype=jnp.dtype(BF16))),
    "fp8_gemm_row_scales": (_fp8_gemm_pallas, (S((40, 300), F8), S((40, 3), F32), S((200, 300), F8),
                                               S((200, 3), F32)),
                            dict(out_dtype=jnp.dtype(F32), block_m=16, w_granularity="row", dot_dtype=jnp.dtype(F8))),
    "fp8_gemm_dsv3_shape": (_fp8_gemm_pallas, (S((4096, 7168), F8), S((4096, 56), F32), S((2112, 7168), F8),
                                               S((17, 56), F32)),
                            dict(out_dtype=jnp.dtype(BF16), block_m=64, w_granularity="block",
                                 dot_dtype=jnp.dtype(BF16))),
    "fp8_grouped_gemm": (_grouped_pallas, (S((256, 300), F8), S((256, 3), F32), S((3, 200, 300), F8),
                                           S((3, 2, 3), F32), S((256,), I32)),
                         dict(out_dtype=jnp.dtype(BF16), block_m=128, dot_dtype=jnp.dtype(F8))),
    "grouped_gemm_bf16": (_grouped_pallas, (S((256, 64), BF16), S((256, 1), F32), S((3, 32, 64), BF16),
                                            S((3, 1, 1), F32), S((256,), I32)),
                          dict(out_dtype=jnp.dtype(F32), block_m=128, dot_dtype=jnp.dtype(BF16))),
    "dispatch_gather": (_gather_rows_pallas, (S((37, 7168), BF16), S((192,), I32), None), {}),
    "combine_bwd_scaled_gather": (_gather_rows_pallas, (S((37, 96), BF16), S((192,), I32), S((192,), F32)), {}),
    "combine": (_combine_rows_pallas, (S((192, 96), BF16), S((37, 3), I32), S((37, 3), F32)), {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_lowers_to_triton(name):
    fn, args, kwargs = CASES[name]
    text = fn.trace(*args, interpret=False, **kwargs).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text  # a Triton custom call, not an interpreted loop or Mosaic GPU


MOSAIC_CASES = {  # (x [M, K], w [N, K], w_s shape, granularity, config)
    "block_odd_shapes": ((40, 300), (200, 300), (2, 3), "block", dict()),
    "row_scales": ((40, 300), (200, 300), (200, 3), "row", dict(tile_n=64)),
    "two_k_slices_per_step": ((200, 300), (200, 300), (2, 3), "block", dict(k_per_step=2, tile_m=128, tile_n=64)),
    "dsv3_shape": ((4096, 7168), (2112, 7168), (17, 56), "block", dict(max_concurrent_steps=4)),
}


@pytest.mark.parametrize("name", list(MOSAIC_CASES))
def test_fp8_gemm_lowers_to_mosaic_gpu(name):
    """The Hopper FP8 kernel (Mosaic GPU: e4m3 wgmma) lowers for CUDA here; run and timed on a GPU by
    benchmarks/fp8_gemm.py."""
    from pallas_kernels.fp8_gemm import _fp8_gemm_mosaic
    from pallas_kernels.fp8_gemm_mosaic import MosaicConfig

    x, w, ws, granularity, config = MOSAIC_CASES[name]
    args = (S(x, F8), S((x[0], -(-x[1] // 128)), F32), S(w, F8), S(ws, F32))
    lowered = _fp8_gemm_mosaic.trace(*args, out_dtype=jnp.dtype(BF16), w_granularity=granularity,
                                     config=MosaicConfig(**config)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
