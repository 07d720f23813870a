"""Precision policy (DESIGN principle 4): parameter and compute dtypes, passed down explicitly, never global."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, slots=True)
class Precision:
    """Which dtype parameters are stored in and which dtype the matmuls run in.

    Whatever the policy, RMSNorm statistics, router scores, softmax and the losses are computed in float32
    (paper §3.3: gating, normalisation and attention operators keep higher precision).
    """

    param_dtype: jnp.dtype = jnp.float32
    compute_dtype: jnp.dtype = jnp.float32

    @classmethod
    def named(cls, name: str) -> "Precision":
        """'fp32' (all float32) or 'bf16' (float32 master weights, bfloat16 compute)."""
        if name == "fp32":
            return cls(jnp.float32, jnp.float32)
        if name == "bf16":
            return cls(jnp.float32, jnp.bfloat16)
        raise ValueError(f"unknown precision {name!r}; expected 'fp32' or 'bf16'")

    @classmethod
    def uniform(cls, dtype) -> "Precision":
        """Parameters and compute both in `dtype` (what from_pretrained(dtype=...) gives)."""
        return cls(jnp.dtype(dtype), jnp.dtype(dtype))


FP32 = Precision()
