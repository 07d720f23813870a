"""Pallas kernels for DeepSeek-V3 (block-scaled FP8 GEMM, MoE dispatch/combine row gathers, grouped FP8 GEMM), each
with a plain-jnp reference of the same signature; the callers pick the kernel on GPU and the reference elsewhere
(the MoE layout and the dispatch/combine entry points: dsv3_jax.model.experts)."""

from pallas_kernels.dispatch import combine_rows, combine_rows_ref, dispatch_rows, dispatch_rows_ref
from pallas_kernels._select import resolve_impl
from pallas_kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from pallas_kernels.grouped_gemm import fp8_grouped_gemm, fp8_grouped_gemm_ref, grouped_gemm

__all__ = [
    "combine_rows",
    "combine_rows_ref",
    "dispatch_rows",
    "dispatch_rows_ref",
    "fp8_gemm",
    "fp8_gemm_ref",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_ref",
    "grouped_gemm",
    "resolve_impl",
]
