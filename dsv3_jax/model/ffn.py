"""SwiGLU feed-forward (reference §3.1): the dense FFN of the first k layers and the shared experts; with `fp8`
its three GEMMs are FP8 linears (paper §3.3)."""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.fp8 import fp8_linear
from dsv3_jax.model.dense import dense
from dsv3_jax.model.params import param, values


def swiglu(x_BTD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array,
           fp8: bool = False) -> jax.Array:
    """down(silu(x.gate) * (x.up)); `fp8` runs the three GEMMs as FP8 linears."""
    if fp8:
        h = checkpoint_name(jax.nn.silu(fp8_linear(x_BTD, w_gate_DF)) * fp8_linear(x_BTD, w_up_DF), "swiglu")
        return fp8_linear(h, w_down_FD)
    h = checkpoint_name(jax.nn.silu(dense(x_BTD, w_gate_DF)) * dense(x_BTD, w_up_DF), "swiglu")
    return dense(h, w_down_FD)


class MLP(nnx.Module):
    """A SwiGLU MLP of hidden width `width` (dense FFN: intermediate_size; shared experts: n_shared * moe width)."""

    def __init__(self, dim: int, width: int, dtype, rngs: nnx.Rngs, std: float, axis: str = "mlp",
                 fp8: bool = False):
        self.fp8 = fp8
        self.w_gate = param(rngs, (dim, width), ("embed", axis), dtype, std=std)
        self.w_up = param(rngs, (dim, width), ("embed", axis), dtype, std=std)
        self.w_down = param(rngs, (width, dim), (axis, "embed"), dtype, std=std)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        p = values(self)
        return swiglu(x_BTD, p["w_gate"], p["w_up"], p["w_down"], self.fp8)
