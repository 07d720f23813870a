"""Expert parallelism (paper §2.1.2, §3.2.2): routed experts split over the `ep` mesh axis, tokens dispatched to
the expert owners and combined back by all-to-all inside `jax.shard_map`, dropless with bounded buffers.

Each (dp, ep) rank routes its own T tokens (attention is data-parallel over dp x ep). Expert e lives on ep rank
e // E_loc (E_loc = E / ep, contiguous). A rank sends rank r one row per (token, slot) pair whose expert lives
on r. The send buffer holds C rows per destination (`ep_capacity`): C = ceil(slack * T * K / ep) rounded up to
a multiple of 8, never more than the worst case T * min(K, E_loc) (a token's K experts are distinct, so at most
min(K, E_loc) of them share a rank). slack (default `EP_SLACK` = 2) is the load a destination may reach, in
multiples of the balanced load T * K / ep, before its pairs need a second round. Dropless under any routing:
round j sends each destination the pairs ranked [j*C, (j+1)*C) among those bound for it (token-major order), and
the number of rounds, ceil(max load / C) with the maximum over the ep group's ranks and destinations (`pmax`), is
decided at run time by a `lax.while_loop` (one round when no destination is loaded beyond slack x balanced).
Padding rows carry the sentinel expert id E_loc, which gets no row of the expert layout. The receiver runs the
received rows through its E_loc experts with model/experts.py's `routed_experts` (one slot per row, gate 1: the
single-device path with the local experts; `fp8=True` its FP8 GEMMs over 128-row tiles, the paper's recipe), a
second all-to-all returns the outputs, and each token sums its K gated outputs.

The exchange (dispatch, expert GEMMs, return) is a `jax.custom_vjp` (`_exchange`): a while_loop has no reverse
derivative, and a static-length scan would keep every round's residuals (the worst case again). Its residuals
are its inputs only (the rank's tokens, expert ids and local expert weights); the backward runs the same rounds:
it re-sends the token rows and sends the output gradient rows, takes the expert function's vjp on the received
rows (recomputing its forward, like activation checkpointing of the routed experts), accumulates the local
weight gradients and returns the input-row gradients by the reverse all-to-all. The gate weights are applied
outside the exchange, so the router's gradient is plain autodiff.

`jax.lax.ragged_all_to_all` would ship exactly the used rows, but XLA:CPU does not implement it (jax 0.10:
"HLO opcode ragged-all-to-all is not supported by XLA:CPU"), so the padded multi-round all-to-all is the one path.

This module also decides when the model runs expert-parallel (`experts_split`): the MoE layer asks it, so the
model code names no mesh axis.

Node-limited routing (paper §2.1.2): the model's group-limited routing keeps topk_group of n_group expert groups
per token; with the mesh aligned (sharding.mesh.validate_mesh) each group lives on whole ranks, so a token's
rows reach at most topk_group expert-parallel groups (`ep_groups_of_experts`). The bounded dispatch does not
change the routing.

Dimension letters: B batch, T tokens, D model, E experts, K experts per token, R ep ranks, C rows per rank pair,
N = T*K (token, slot) pairs.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.losses import balance_from_stats, expert_score_means, sequence_balance_terms
from dsv3_jax.model.experts import Routing, route, routed_experts
from sharding.mesh import ep_group_size
from sharding.rules import constrain

EP_SLACK = 2.0  # per-destination rows of one round, in multiples of the balanced load T * K / ep
CAPACITY_ALIGN = 8  # the per-destination capacity is rounded up to a multiple of this many rows


def ep_groups_of_experts(cfg: ModelConfig, ep: int) -> np.ndarray:
    """int [E]: the expert-parallel group ("node") of each expert: ep rank // ranks per routing group."""
    e_loc = cfg.n_routed_experts // ep
    return np.arange(cfg.n_routed_experts) // e_loc // ep_group_size(cfg, ep)


def experts_split(mesh=None) -> bool:
    """Whether `mesh` (default: the one set by jax.set_mesh) splits the routed experts: an 'ep' axis of size > 1."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return not mesh.empty and dict(zip(mesh.axis_names, mesh.axis_sizes)).get("ep", 1) > 1


def _check_ep_args(cfg: ModelConfig, tokens: int, ep: int, slack) -> None:
    if not isinstance(tokens, (int, np.integer)) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"expert parallelism: tokens per rank must be a positive int, got {tokens!r}")
    if not isinstance(ep, (int, np.integer)) or isinstance(ep, bool) or ep < 1:
        raise ValueError(f"expert parallelism: ep must be a positive int, got {ep!r}")
    if cfg.n_routed_experts % ep:
        raise ValueError(f"expert parallelism: {cfg.n_routed_experts} routed experts do not divide over ep={ep} "
                         "ranks")
    if (not isinstance(slack, (int, float, np.floating, np.integer)) or isinstance(slack, bool)
            or not math.isfinite(slack) or slack <= 0):
        raise ValueError(f"expert parallelism: slack must be a positive finite number, got {slack!r}")


def ep_worst_case_capacity(cfg: ModelConfig, tokens: int, ep: int) -> int:
    """Rows per destination that hold any routing in one round: T * min(K, E / ep)."""
    _check_ep_args(cfg, tokens, ep, EP_SLACK)
    return tokens * min(cfg.num_experts_per_tok, cfg.n_routed_experts // ep)


def ep_capacity(cfg: ModelConfig, tokens: int, ep: int, slack: float = EP_SLACK) -> int:
    """Rows per destination rank of one dispatch round for `tokens` tokens per rank: ceil(slack * T * K / ep)
    rounded up to a multiple of CAPACITY_ALIGN, at most the worst case T * min(K, E / ep)."""
    _check_ep_args(cfg, tokens, ep, slack)
    want = math.ceil(slack * tokens * cfg.num_experts_per_tok / ep)
    want = -(-want // CAPACITY_ALIGN) * CAPACITY_ALIGN
    return min(want, ep_worst_case_capacity(cfg, tokens, ep))


def ep_buffer_rows(cfg: ModelConfig, tokens: int, ep: int, slack: float = EP_SLACK) -> int:
    """Rows of one rank's dispatch send buffer (and of its receive buffer) of one MoE layer: ep * ep_capacity."""
    return ep * ep_capacity(cfg, tokens, ep, slack)


class _Plan(NamedTuple):
    """Static facts of one exchange (hashable: a custom_vjp non-differentiable argument)."""

    ep: int
    e_loc: int
    cap: int
    tile: int | None
    fp8: bool


def _pairs(experts_TK, plan: _Plan):
    """Per pair (token-major): destination rank, rank among the pairs for that destination, token, local expert
    id; and the round count: ceil(max load / C) over the ep group's ranks and destinations."""
    t, k = experts_TK.shape
    dest_N = (experts_TK // plan.e_loc).reshape(-1)
    onehot_NR = jax.nn.one_hot(dest_N, plan.ep, dtype=jnp.int32)
    slot_N = jnp.take_along_axis(jnp.cumsum(onehot_NR, axis=0) - onehot_NR, dest_N[:, None], axis=1)[:, 0]
    load = jnp.max(jnp.sum(onehot_NR, axis=0))
    rounds = jax.lax.pmax((load + plan.cap - 1) // plan.cap, "ep")
    token_N = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    return dest_N, slot_N, token_N, (experts_TK % plan.e_loc).reshape(-1), rounds


def _round_slots(slot_N, j, cap: int):
    """Row of each pair in round j's per-destination block, cap (out of bounds) for pairs of other rounds; and
    whether the pair goes in round j."""
    pos_N = slot_N - j * cap
    here_N = (pos_N >= 0) & (pos_N < cap)
    return jnp.where(here_N, pos_N, cap), here_N


def _send(rows_ND, dest_N, pos_N, plan: _Plan, fill=0):
    """Scatter the pairs' rows into the [ep, C, ...] send buffer (pairs of other rounds dropped) and all-to-all."""
    buf = jnp.full((plan.ep, plan.cap) + rows_ND.shape[1:], fill, rows_ND.dtype)
    return jax.lax.all_to_all(buf.at[dest_N, pos_N].set(rows_ND, mode="drop"), "ep", 0, 0)


def _receive(back_RCD, dest_N, pos_N, here_N):
    """Each pair's row of the returned [ep, C, D] buffer (zero for pairs of other rounds)."""
    rows = back_RCD[dest_N, jnp.minimum(pos_N, back_RCD.shape[1] - 1)]
    return jnp.where(here_N[:, None], rows, 0)


def _local_experts(plan: _Plan, x_PD, ids_P, w_gate_EDF, w_up_EDF, w_down_EFD):
    """The received rows through this rank's experts (gate 1, one slot per row; sentinel ids give zero rows)."""
    local = Routing(jnp.ones((ids_P.shape[0], 1), jnp.float32), ids_P[:, None], None)
    # capacity 0: the received buffer is sized for the worst case (`ep_capacity`, mostly empty rows), so a batched
    # product sized from it would multiply mostly padding; its tiled loop runs over the used tiles only
    return routed_experts(x_PD, local, w_gate_EDF, w_up_EDF, w_down_EFD, plan.tile, fp8=plan.fp8, capacity=0)[0]


def _dispatch_round(x_TD, pairs, j, plan: _Plan):
    """Round j's received token rows [ep*C, D] and local expert ids [ep*C], and its send positions."""
    dest_N, slot_N, token_N, local_N, _ = pairs
    pos_N, here_N = _round_slots(slot_N, j, plan.cap)
    recv_RCD = _send(x_TD[token_N], dest_N, pos_N, plan)
    recv_RC = _send(local_N, dest_N, pos_N, plan, fill=plan.e_loc)
    return recv_RCD.reshape(plan.ep * plan.cap, -1), recv_RC.reshape(-1), pos_N, here_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _exchange(plan: _Plan, x_TD, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD):
    """y_ND: pair (t, k)'s expert output SwiGLU_{e_tk}(x_t) [T*K, D] in x's dtype, computed on the expert's rank."""
    pairs = _pairs(experts_TK, plan)
    dest_N, rounds = pairs[0], pairs[4]

    def one_round(carry):
        j, y_ND = carry
        x_PD, ids_P, pos_N, here_N = _dispatch_round(x_TD, pairs, j, plan)
        y_PD = _local_experts(plan, x_PD, ids_P, w_gate_EDF, w_up_EDF, w_down_EFD)
        back_RCD = jax.lax.all_to_all(y_PD.reshape(plan.ep, plan.cap, -1), "ep", 0, 0)
        return j + 1, y_ND + _receive(back_RCD, dest_N, pos_N, here_N).astype(y_ND.dtype)

    y0 = jnp.zeros((dest_N.shape[0], x_TD.shape[1]), x_TD.dtype)
    return jax.lax.while_loop(lambda c: c[0] < rounds, one_round, (jnp.int32(0), y0))[1]


def _exchange_fwd(plan, x_TD, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD):
    return (_exchange(plan, x_TD, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD),
            (x_TD, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD))


def _exchange_bwd(plan, res, g_ND):
    x_TD, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD = res
    pairs = _pairs(experts_TK, plan)
    dest_N, token_N, rounds = pairs[0], pairs[2], pairs[4]
    ws = (w_gate_EDF, w_up_EDF, w_down_EFD)

    def one_round(carry):
        j, dx_TD, dws = carry
        x_PD, ids_P, pos_N, here_N = _dispatch_round(x_TD, pairs, j, plan)
        g_PD = _send(g_ND, dest_N, pos_N, plan).reshape(x_PD.shape[0], -1)
        _, vjp = jax.vjp(functools.partial(_local_experts, plan), x_PD, ids_P, *ws)
        dx_PD, _, *dw = vjp(g_PD.astype(x_PD.dtype))
        back_RCD = jax.lax.all_to_all(dx_PD.reshape(plan.ep, plan.cap, -1), "ep", 0, 0)
        dx_TD = dx_TD.at[token_N].add(_receive(back_RCD, dest_N, pos_N, here_N).astype(jnp.float32))
        return j + 1, dx_TD, tuple(a + b.astype(jnp.float32) for a, b in zip(dws, dw))

    zeros = (jnp.zeros(x_TD.shape, jnp.float32), tuple(jnp.zeros(w.shape, jnp.float32) for w in ws))
    _, dx_TD, dws = jax.lax.while_loop(lambda c: c[0] < rounds, one_round, (jnp.int32(0), *zeros))
    return (dx_TD.astype(x_TD.dtype), None) + tuple(d.astype(w.dtype) for d, w in zip(dws, ws))


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def moe_expert_parallel(x_BTD, router_DE, bias_E, w_gate_EDF, w_up_EDF, w_down_EFD, cfg: ModelConfig,
                        mesh=None, tile: int | None = None, fp8: bool = False, slack: float = EP_SLACK):
    """Routed-expert output [B, T, D], global expert counts [E], the balance term (mean over all sequences) and
    the batch-wise balance term (f from the global counts, P the mean over all ranks' tokens)
    with the experts split over mesh axis 'ep' and the batch over ('dp', 'ep'); same values as the
    single-device MoE path. `mesh` defaults to the one set by jax.set_mesh; `slack` sizes the per-round dispatch
    buffers (`ep_capacity`); `fp8` runs the expert GEMMs in FP8 (128-row tiles)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    ep = sizes.get("ep", 1)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    if e % ep:
        raise ValueError(f"expert parallelism: {e} routed experts do not divide over ep={ep} ranks")
    manual = {a for a in ("dp", "ep") if a in sizes}
    token_axes = tuple(a for a in ("dp", "ep") if a in sizes)
    ranks = int(np.prod([sizes[a] for a in token_axes]))
    if x_BTD.shape[0] % ranks:
        raise ValueError(f"expert parallelism: batch {x_BTD.shape[0]} does not split over "
                         f"{' x '.join(token_axes)} = {ranks} ranks")
    plan = _Plan(ep, e // ep, ep_capacity(cfg, x_BTD.shape[0] // ranks * x_BTD.shape[1], ep, slack), tile, fp8)
    has_bias = bias_E is not None

    def local(x_BTD, router_DE, bias_E, w_gate_EDF, w_up_EDF, w_down_EFD):
        b, t, d = x_BTD.shape
        x_TD = x_BTD.reshape(b * t, d)
        routing = route(x_TD, router_DE, bias_E if has_bias else None, cfg)
        y_TKD = _exchange(plan, x_TD, routing.experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD).reshape(b * t, k, d)
        out_TD = jnp.einsum("tk,tkd->td", routing.weights_TK, y_TKD.astype(jnp.float32)).astype(x_TD.dtype)
        counts_E = jax.lax.psum(jnp.bincount(routing.experts_TK.reshape(-1), length=e).astype(jnp.int32),
                                token_axes)
        balance = sequence_balance_terms(routing.scores_TE.reshape(b, t, -1), routing.experts_TK.reshape(b, t, k))
        balance = jax.lax.pmean(jnp.mean(balance), token_axes)
        # every rank holds the same number of tokens, so the global P is the mean of the ranks' P
        balance_batch = balance_from_stats(counts_E, jax.lax.pmean(expert_score_means(routing.scores_TE),
                                                                   token_axes))
        return out_TD.reshape(b, t, d), counts_E, balance, balance_batch

    w_spec = P("ep", None, None) if "ep" in sizes else P()
    fn = jax.shard_map(local, mesh=mesh, axis_names=manual,
                       in_specs=(P(token_axes), P(), P(), w_spec, w_spec, w_spec),
                       out_specs=(P(token_axes), P(), P(), P()),
                       # the grouped matmul's custom backward scans with an unannotated carry
                       check_vma=False)
    bias_arg = bias_E if has_bias else jnp.zeros((e,), jnp.float32)
    return fn(constrain(x_BTD, ("batch", "seq", "embed")), router_DE, bias_arg, w_gate_EDF, w_up_EDF, w_down_EFD)
