"""Pallas kernels for DeepSeek-V3 (block-scaled FP8 GEMM) with their plain-jnp references."""

from pallas_kernels.fp8_gemm import fp8_gemm_ref

__all__ = ["fp8_gemm_ref"]
