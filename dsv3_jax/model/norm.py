"""RMSNorm (paper §2.1; reference §3.1, pitfall §12.5): float32 statistics, cast back, then the weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.model.params import param


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) in float32, cast to x's dtype, times weight (the transformers order)."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return checkpoint_name(normed.astype(x.dtype) * weight.astype(x.dtype), "rmsnorm")


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale (initialised to 1)."""

    def __init__(self, dim: int, eps: float, axis_name: str, dtype, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis_name,), dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)
