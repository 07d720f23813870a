"""Parameter creation with logical-axis metadata (DESIGN principle 2) and the expert-bias state variable."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


class ExpertBias(nnx.Variable):
    """The aux-loss-free routing bias b_i (paper §2.1.2): state, not a parameter.

    It is a separate Variable type so `nnx.split(model, nnx.Param, ExpertBias, ...)` keeps it away from
    gradients, the optimizer and weight decay; `dsv3_jax.balance.update_expert_bias` moves it.
    """


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init: str = "normal",
          std: float = 0.006) -> nnx.Param:
    """An nnx.Param of `shape` whose metadata names its logical axes (mapped to a mesh by sharding/rules.py)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes), eager_sharding=False)


def values(module: nnx.Module) -> dict[str, jax.Array]:
    """The module's own (non-nested) variables as a plain dict of arrays, for the pure block functions."""
    return {name: v[...] for name, v in vars(module).items() if isinstance(v, nnx.Variable)}


def stacked(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module | None:
    """`n` copies of make(rngs) with parameters stacked on a leading 'layers' axis (scanned in the forward)."""
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def _make(r):
        return make(r)

    return _make(rngs)


def scan_layers(layers: nnx.Module | None, body: Callable, carry, *xs):
    """lax.scan `body(layer, carry, *x_slices) -> (carry, out)` over a stacked module; outputs stacked."""
    if layers is None:
        return carry, None
    graphdef, state = nnx.split(layers)

    def step(c, sliced):
        layer_state, rest = sliced
        return body(nnx.merge(graphdef, layer_state), c, *rest)

    return jax.lax.scan(step, carry, (state, xs))
