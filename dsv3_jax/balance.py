"""Auxiliary-loss-free load balancing (paper §2.1.2 and §4.2): the expert bias moves by a sign rule after each
step, outside the optimizer, from the expert loads of the whole global batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_expert_bias(bias: jax.Array, counts: jax.Array, gamma: float | jax.Array) -> jax.Array:
    """b_i += gamma if expert i is under the mean load, -= gamma if over, unchanged at the mean ([..., E])."""
    load = counts.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return (bias + gamma * jnp.sign(mean - load)).astype(bias.dtype)


def max_violation(counts: jax.Array) -> jax.Array:
    """MaxVio = max_i load_i / mean load - 1 per layer ([..., E] -> [...]); 0 for a perfectly even load."""
    load = counts.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1)
    return jnp.where(mean > 0, jnp.max(load, axis=-1) / jnp.maximum(mean, 1e-30) - 1.0, 0.0)
