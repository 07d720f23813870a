"""DeepSeekMoE layer (paper §2.1.2, eqs. 12-16; reference §4): shared experts plus routed experts, with the router
and its bias state. The routed-expert math (routing, layout, dispatch, grouped GEMM, combine, FP8) lives in
model/experts.py; whether it runs on one device or expert-parallel over a mesh is decided by
sharding/expert_parallel.py (the mesh set by jax.set_mesh), the same values either way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.losses import batch_balance_terms, sequence_balance_terms
from dsv3_jax.model.experts import route, routed_experts, routed_experts_split
from dsv3_jax.model.ffn import MLP
from dsv3_jax.model.params import ExpertBias, param


class MoEAux(NamedTuple):
    counts_E: jax.Array  # tokens routed to each expert (int32), for the bias update and MaxVio
    balance: jax.Array  # sum_i f_i P_i averaged over sequences (eqs. 17-20 without alpha)
    balance_batch: jax.Array  # sum_i f_i P_i with f and P over all tokens of the batch (§4.5.3, without alpha)


class MoE(nnx.Module):
    """Shared experts + routed experts with the router and its bias state."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, fp8: bool = False):
        self.cfg = cfg
        self.fp8 = fp8
        d, e, f, std = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.initializer_range
        self.router = param(rngs, (d, e), ("embed", "experts"), dtype, std=std)
        self.expert_bias = ExpertBias(jnp.zeros((e,), jnp.float32), out_sharding=("experts",),
                                      eager_sharding=False) if cfg.expert_bias else None
        self.w_gate = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), dtype, std=std)
        self.w_up = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), dtype, std=std)
        self.w_down = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), dtype, std=std)
        self.shared = (MLP(d, cfg.n_shared_experts * f, dtype, rngs, std, axis="shared_mlp", fp8=fp8)
                       if cfg.n_shared_experts else None)

    def split_experts(self) -> None:
        """Hold the routed experts' weights as E separate arrays each (decoding; experts.routed_experts_split)."""
        for name in ("w_gate", "w_up", "w_down"):
            var = getattr(self, name)
            setattr(self, name, nnx.Param(tuple(jnp.unstack(var[...])), **var.get_metadata()))

    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, MoEAux]:
        # Imported here: the sharding package imports dsv3_jax (whose __init__ imports the model).
        from sharding.expert_parallel import experts_split, moe_expert_parallel

        b, t, d = x_BTD.shape
        bias = None if self.expert_bias is None else self.expert_bias[...]
        split_form = isinstance(self.w_gate.get_value(), tuple)  # per-expert arrays: the decoder's form
        if experts_split() and not split_form:
            y, counts, balance, balance_batch = moe_expert_parallel(
                x_BTD, self.router[...], bias, self.w_gate[...], self.w_up[...], self.w_down[...], self.cfg,
                fp8=self.fp8)
        else:
            x_TD = x_BTD.reshape(b * t, d)
            with jax.named_scope("router"):
                routing = route(x_TD, self.router[...], bias, self.cfg)
            if split_form:
                y, counts = routed_experts_split(x_TD, routing, self.w_gate.get_value(), self.w_up.get_value(),
                                                 self.w_down.get_value())
            else:
                y, counts = routed_experts(x_TD, routing, self.w_gate[...], self.w_up[...], self.w_down[...],
                                           fp8=self.fp8)
            y = y.reshape(b, t, d)
            k = self.cfg.num_experts_per_tok
            with jax.named_scope("router"):
                balance = jnp.mean(sequence_balance_terms(routing.scores_TE.reshape(b, t, -1),
                                                          routing.experts_TK.reshape(b, t, k)))
                balance_batch = batch_balance_terms(routing.scores_TE, routing.experts_TK)
        if self.shared is not None:
            with jax.named_scope("shared_experts"):
                y = y + self.shared(x_BTD)
        return y, MoEAux(counts, balance, balance_batch)
