"""Pallas kernels for DeepSeek-V3 (block-scaled FP8 GEMM, MoE dispatch/combine, grouped FP8 GEMM), each with a
plain-jnp reference of the same signature; the entry points pick the kernel on GPU and the reference elsewhere."""

from pallas_kernels.dispatch import (
    ContiguousLayout,
    buffer_rows,
    combine,
    combine_ref,
    contiguous_layout,
    dispatch,
    dispatch_ref,
)
from pallas_kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from pallas_kernels.grouped_gemm import fp8_grouped_gemm, fp8_grouped_gemm_ref, grouped_gemm

__all__ = [
    "ContiguousLayout",
    "buffer_rows",
    "combine",
    "combine_ref",
    "contiguous_layout",
    "dispatch",
    "dispatch_ref",
    "fp8_gemm",
    "fp8_gemm_ref",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_ref",
    "grouped_gemm",
]
