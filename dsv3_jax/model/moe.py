"""DeepSeekMoE (paper §2.1.2, eqs. 12-16; reference §4): router and dropless routed experts.

Dimension letters: T tokens (flattened B*T), D model, E routed experts, K experts per token, G groups,
F expert width, P rows of the expert-sorted buffer.

Routing: sigmoid (V3) or softmax (V2) affinities s; the bias b only chooses experts (s + b), the gate values use
the unbiased s. Group-limited routing keeps the topk_group groups with the best group score (sum of the top-2
biased scores with a bias, max without) and masks the other groups with -inf. The chosen affinities are
renormalised when norm_topk_prob and scaled by routed_scaling_factor.

Dropless: every (token, expert) pair is placed in an expert-sorted buffer and run through a grouped matmul; no
capacity factor, no token is ever dropped. Under a mesh with ep > 1 (jax.set_mesh) the routed experts run
expert-parallel: sharding/expert_parallel.py, the same values.

FP8 (paper §3.3.3): `routed_experts(..., fp8=True)` quantizes x once per token before the dispatch, runs the
expert GEMMs in FP8 over 128-row tiles (dsv3_jax.fp8.fp8_expert_swiglu) and combines in the compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import EXPERT_TILE, fp8_expert_swiglu
from dsv3_jax.losses import sequence_balance_terms
from dsv3_jax.model.ffn import MLP
from dsv3_jax.model.params import ExpertBias, param


class Routing(NamedTuple):
    weights_TK: jax.Array  # float32 gate values g (renormalised, scaled)
    experts_TK: jax.Array  # int32 chosen expert ids
    scores_TE: jax.Array  # float32 unbiased affinities s


def route(x_TD: jax.Array, router_DE: jax.Array, bias_E: jax.Array | None, cfg: ModelConfig) -> Routing:
    """Top-K expert choice per token (float32 throughout)."""
    logits = x_TD.astype(jnp.float32) @ router_DE.astype(jnp.float32)
    if cfg.scoring_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
    choice = scores if bias_E is None else scores + bias_E.astype(jnp.float32)
    if cfg.n_group > 1:
        t, e = choice.shape
        grouped_TGX = choice.reshape(t, cfg.n_group, e // cfg.n_group)
        if bias_E is None:
            group_score_TG = jnp.max(grouped_TGX, axis=-1)
        else:
            group_score_TG = jnp.sum(jax.lax.top_k(grouped_TGX, 2)[0], axis=-1)
        _, keep_idx = jax.lax.top_k(group_score_TG, cfg.topk_group)
        keep_TG = jnp.sum(jax.nn.one_hot(keep_idx, cfg.n_group, dtype=jnp.int32), axis=-2) > 0
        choice = jnp.where(keep_TG[:, :, None], grouped_TGX, -jnp.inf).reshape(t, e)
    _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores)


class DispatchLayout(NamedTuple):
    dest_TK: jax.Array  # row of each (token, slot) pair in the expert-sorted buffer
    group_sizes_E: jax.Array  # rows per expert in the buffer (padded to a multiple of `tile`)
    counts_E: jax.Array  # real tokens per expert
    rows: int  # static buffer length P


def dispatch_layout(experts_TK: jax.Array, num_experts: int, tile: int = 1) -> DispatchLayout:
    """Expert-contiguous placement of all T*K pairs, each expert's segment padded to a multiple of `tile`.

    The buffer length is the static worst case T*K + E*(tile-1), so no pair is ever dropped.
    """
    flat = experts_TK.reshape(-1)
    n = flat.shape[0]
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    padded = (counts + tile - 1) // tile * tile
    start = jnp.cumsum(counts) - counts
    padded_start = jnp.cumsum(padded) - padded
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    dest_sorted = padded_start[sorted_e] + jnp.arange(n, dtype=jnp.int32) - start[sorted_e]
    dest = jnp.zeros((n,), jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))
    rows = n if tile == 1 else -(-(n + num_experts * (tile - 1)) // tile) * tile
    return DispatchLayout(dest.reshape(experts_TK.shape), padded, counts, rows)


def grouped_matmul(x_PD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, tile: int) -> jax.Array:
    """Row block g of x (group_sizes_E[g] rows, in order) times w[g]; rows past the groups give zeros.

    tile == 0: jax.lax.ragged_dot (accelerators). tile >= 1 (segments padded to whole tiles): each tile belongs to
    one expert; `_tiled_matmul` runs one (tile x D) @ (D x F) product per tile, much faster than ragged_dot on the
    CPU (where it is a masked product of every row with every expert).
    """
    if tile == 0:
        return jax.lax.ragged_dot(x_PD, w_EDF, group_sizes_E)
    n_tiles = x_PD.shape[0] // tile
    ends = jnp.cumsum(group_sizes_E)
    # searchsorted(ends, starts, side="right") as a count: jnp.searchsorted fails inside shard_map (jax 0.10).
    tile_expert = jnp.sum(ends[None, :] <= (jnp.arange(n_tiles) * tile)[:, None], axis=1)
    in_groups = jnp.arange(x_PD.shape[0]) < ends[-1]  # the tail past the last group multiplies nothing
    x_PD = jnp.where(in_groups[:, None], x_PD, 0)
    return _tiled_matmul(x_PD, w_EDF, jnp.minimum(tile_expert, w_EDF.shape[0] - 1).astype(jnp.int32))


def _tile_products(x_PD, w_EDF, tile_expert_N, transpose_w: bool):
    """Scan over tiles: tile n times w[tile_expert[n]] (or its transpose); the weight is indexed, never copied."""
    n = tile_expert_N.shape[0]
    x_NTD = x_PD.reshape(n, x_PD.shape[0] // n, x_PD.shape[1])

    def body(_, xs):
        x_TD, e = xs
        w = jax.lax.dynamic_index_in_dim(w_EDF, e, keepdims=False)
        return None, (x_TD @ w.T if transpose_w else x_TD @ w)

    return jax.lax.scan(body, None, (x_NTD, tile_expert_N))[1].reshape(x_PD.shape[0], -1)


@jax.custom_vjp
def _tiled_matmul(x_PD, w_EDF, tile_expert_N):
    return _tile_products(x_PD, w_EDF, tile_expert_N, transpose_w=False)


def _tiled_matmul_fwd(x_PD, w_EDF, tile_expert_N):
    return _tiled_matmul(x_PD, w_EDF, tile_expert_N), (x_PD, w_EDF, tile_expert_N)


def _tiled_matmul_bwd(res, g_PF):
    # One scan over the tiles: dx_tile = g_tile . w_e^T, and dW_e += x_tile^T . g_tile updated in place in the
    # carry (autodiff of the forward scan would add a full [E, D, F] cotangent at every tile instead).
    x_PD, w_EDF, tile_expert_N = res
    n = tile_expert_N.shape[0]
    x_NTD = x_PD.reshape(n, -1, x_PD.shape[1])
    g_NTF = g_PF.reshape(n, -1, g_PF.shape[1])

    def body(dw_EDF, xs):
        x_TD, g_TF, e = xs
        w_DF = jax.lax.dynamic_index_in_dim(w_EDF, e, keepdims=False)
        acc = jax.lax.dynamic_index_in_dim(dw_EDF, e, keepdims=False) + (x_TD.T @ g_TF).astype(jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(dw_EDF, acc, e, 0), g_TF @ w_DF.T

    dw, dx_NTD = jax.lax.scan(body, jnp.zeros(w_EDF.shape, jnp.float32), (x_NTD, g_NTF, tile_expert_N))
    return (dx_NTD.reshape(x_PD.shape).astype(x_PD.dtype), dw.astype(w_EDF.dtype),
            np.zeros(tile_expert_N.shape, jax.dtypes.float0))


_tiled_matmul.defvjp(_tiled_matmul_fwd, _tiled_matmul_bwd)


def default_tile(pairs: int | None = None, num_experts: int | None = None) -> int:
    """Grouped-matmul tile: ragged_dot (0) on accelerators. On the CPU, padded tiles of 64 rows, except for few
    (token, expert) pairs (decoding): there every pair is its own tile, so only the chosen experts' weights are
    read, not the E x 63 padding rows of 64-row tiles."""
    if jax.default_backend() != "cpu":
        return 0
    if pairs is not None and num_experts is not None and pairs <= num_experts:
        return 1
    return 64


def routed_experts(x_TD: jax.Array, routing: Routing, w_gate_EDF, w_up_EDF, w_down_EFD,
                   tile: int | None = None, fp8: bool = False) -> jax.Array:
    """sum_k g_k * SwiGLU_{e_k}(x) for every token, dropless (eq. 13's routed term); `fp8`: FP8 expert GEMMs."""
    if fp8:
        if tile not in (None, EXPERT_TILE):
            raise ValueError(f"routed_experts: the FP8 path runs tiles of {EXPERT_TILE} rows, got tile={tile}")
        return _routed_experts_fp8(x_TD, routing, w_gate_EDF, w_up_EDF, w_down_EFD)
    t, k = routing.experts_TK.shape
    tile = default_tile(t * k, w_gate_EDF.shape[0]) if tile is None else tile
    dt = x_TD.dtype
    layout = dispatch_layout(routing.experts_TK, w_gate_EDF.shape[0], max(tile, 1))
    # Row r of the buffer holds token src[r]; padding rows point at an appended zero row.
    src = jnp.full((layout.rows,), t, jnp.int32).at[layout.dest_TK.reshape(-1)].set(
        jnp.repeat(jnp.arange(t, dtype=jnp.int32), k))
    x_PD = jnp.concatenate([x_TD, jnp.zeros((1, x_TD.shape[1]), dt)])[src]
    gs = layout.group_sizes_E
    h = checkpoint_name(jax.nn.silu(grouped_matmul(x_PD, w_gate_EDF.astype(dt), gs, tile))
                        * grouped_matmul(x_PD, w_up_EDF.astype(dt), gs, tile), "swiglu")
    y_PD = grouped_matmul(h, w_down_EFD.astype(dt), gs, tile)
    y_TKD = y_PD[layout.dest_TK]
    out = jnp.einsum("tk,tkd->td", routing.weights_TK, y_TKD.astype(jnp.float32))
    return out.astype(dt)


def _routed_experts_fp8(x_TD, routing: Routing, w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
    """routed_experts with FP8 dispatch and expert GEMMs; each expert's segment padded to whole 128-row tiles."""
    t, k = routing.experts_TK.shape
    e = w_gate_EDF.shape[0]
    layout = dispatch_layout(routing.experts_TK, e, EXPERT_TILE)
    src = jnp.full((layout.rows,), t, jnp.int32).at[layout.dest_TK.reshape(-1)].set(
        jnp.repeat(jnp.arange(t, dtype=jnp.int32), k))
    n_tiles = layout.rows // EXPERT_TILE
    ends = jnp.cumsum(layout.group_sizes_E)
    # tiles past the last group hold only padding rows (src == t, zeros); any expert index serves them
    tile_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(n_tiles) * EXPERT_TILE, side="right"), e - 1)
    y_PD = fp8_expert_swiglu(x_TD, src, tile_expert.astype(jnp.int32), w_gate_EDF, w_up_EDF, w_down_EFD)
    out = jnp.einsum("tk,tkd->td", routing.weights_TK, y_PD[layout.dest_TK].astype(jnp.float32))
    return out.astype(x_TD.dtype)


class MoEAux(NamedTuple):
    counts_E: jax.Array  # tokens routed to each expert (int32), for the bias update and MaxVio
    balance: jax.Array  # sum_i f_i P_i averaged over sequences (eqs. 17-20 without alpha)


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

    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, MoEAux]:
        b, t, d = x_BTD.shape
        x_TD = x_BTD.reshape(b * t, d)
        bias = None if self.expert_bias is None else self.expert_bias[...]
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and dict(zip(mesh.axis_names, mesh.axis_sizes)).get("ep", 1) > 1:
            # Expert parallelism over the mesh set by jax.set_mesh: all-to-all dispatch inside shard_map.
            if self.fp8:
                raise ValueError("precision fp8 is not implemented under expert parallelism (a mesh with ep > 1): "
                                 "the expert-parallel MoE runs its grouped GEMMs in the compute dtype; use "
                                 "--precision bf16 with ep > 1, or fp8 with dp/pp only")
            from sharding.expert_parallel import moe_expert_parallel
            from sharding.rules import constrain

            x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
            y, counts, balance = moe_expert_parallel(x_BTD, self.router[...], bias, self.w_gate[...],
                                                     self.w_up[...], self.w_down[...], self.cfg, mesh)
            if self.shared is not None:
                y = y + self.shared(x_BTD)
            return y, MoEAux(counts, balance)
        routing = route(x_TD, self.router[...], bias, self.cfg)
        y = routed_experts(x_TD, routing, self.w_gate[...], self.w_up[...], self.w_down[...],
                           fp8=self.fp8).reshape(b, t, d)
        if self.shared is not None:
            y = y + self.shared(x_BTD)
        k = self.cfg.num_experts_per_tok
        balance = sequence_balance_terms(routing.scores_TE.reshape(b, t, -1), routing.experts_TK.reshape(b, t, k))
        counts = jnp.bincount(routing.experts_TK.reshape(-1), length=self.cfg.n_routed_experts).astype(jnp.int32)
        return y, MoEAux(counts, jnp.mean(balance))
