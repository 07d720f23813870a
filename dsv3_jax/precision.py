"""Precision policy (DESIGN principle 4): parameter and compute dtypes and the FP8 switch, passed down explicitly,
never global. FP8 training follows paper §3.3 (reference §5.3)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, slots=True)
class Precision:
    """Which dtype parameters are stored in, which dtype the matmuls run in, and whether the Linear GEMMs run in FP8.

    Whatever the policy, RMSNorm statistics, router scores, softmax and the losses are computed in float32
    (paper §3.3: gating, normalisation and attention operators keep higher precision). With ``fp8`` the GEMMs of
    the MLA projections, the dense and shared-expert MLPs, the routed experts and the MTP projection run as
    block-scaled E4M3 GEMMs (dsv3_jax.fp8); embedding, output head, router, norms and the attention core do not.
    """

    param_dtype: jnp.dtype = jnp.float32
    compute_dtype: jnp.dtype = jnp.float32
    fp8: bool = False

    @classmethod
    def named(cls, name: str) -> "Precision":
        """'fp32' (all float32), 'bf16' (float32 master weights, bfloat16 compute) or 'fp8' (as bf16, with the
        Linear GEMMs in FP8)."""
        if name == "fp32":
            return cls(jnp.float32, jnp.float32)
        if name == "bf16":
            return cls(jnp.float32, jnp.bfloat16)
        if name == "fp8":
            return cls(jnp.float32, jnp.bfloat16, fp8=True)
        raise ValueError(f"unknown precision {name!r}; expected one of {PRECISION_NAMES}")

    @classmethod
    def uniform(cls, dtype) -> "Precision":
        """Parameters and compute both in `dtype` (what from_pretrained(dtype=...) gives)."""
        return cls(jnp.dtype(dtype), jnp.dtype(dtype))


PRECISION_NAMES = ("fp32", "bf16", "fp8")
FP32 = Precision()
