"""Expert parallelism (paper §2.1.2, §3.2.2): routed experts split over the `ep` mesh axis, tokens dispatched to
the expert owners and combined back by all-to-all inside `jax.shard_map`, dropless.

Each (dp, ep) rank routes its own T tokens (attention is data-parallel over dp x ep). Expert e lives on ep rank
e // E_loc (E_loc = E / ep, contiguous). A rank sends rank r one row per (token, slot) pair whose expert lives
on r, into a static buffer of C = T * min(K, E_loc) rows per destination: a token's K experts are distinct, so at
most min(K, E_loc) of them share a rank, and the buffer holds the worst case — no capacity factor, no token
dropped. Padding rows carry the sentinel expert id E_loc, which gets no row of the expert layout. The receiver
runs the received rows through its E_loc experts with model/experts.py's `routed_experts` (one slot per row, gate
1: the single-device path with the local experts), a second all-to-all returns the outputs, and each token sums
its K gated outputs.

This module also decides when the model runs expert-parallel (`experts_split`): the MoE layer asks it, so the
model code names no mesh axis.

Node-limited routing (paper §2.1.2): the model's group-limited routing keeps topk_group of n_group expert groups
per token; with the mesh aligned (sharding.mesh.validate_mesh) each group lives on whole ranks, so a token's
rows reach at most topk_group expert-parallel groups (`ep_groups_of_experts`).

Dimension letters: B batch, T tokens, D model, E experts, K experts per token, R ep ranks, C rows per rank pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.losses import balance_from_stats, expert_score_means, sequence_balance_terms
from dsv3_jax.model.experts import Routing, route, routed_experts
from sharding.mesh import ep_group_size
from sharding.rules import constrain


def ep_groups_of_experts(cfg: ModelConfig, ep: int) -> np.ndarray:
    """int [E]: the expert-parallel group ("node") of each expert: ep rank // ranks per routing group."""
    e_loc = cfg.n_routed_experts // ep
    return np.arange(cfg.n_routed_experts) // e_loc // ep_group_size(cfg, ep)


def experts_split(mesh=None) -> bool:
    """Whether `mesh` (default: the one set by jax.set_mesh) splits the routed experts: an 'ep' axis of size > 1."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return not mesh.empty and dict(zip(mesh.axis_names, mesh.axis_sizes)).get("ep", 1) > 1


def moe_expert_parallel(x_BTD, router_DE, bias_E, w_gate_EDF, w_up_EDF, w_down_EFD, cfg: ModelConfig,
                        mesh=None, tile: int | None = None, fp8: bool = False):
    """Routed-expert output [B, T, D], global expert counts [E], the balance term (mean over all sequences) and
    the batch-wise balance term (f from the global counts, P the mean over all ranks' tokens)
    with the experts split over mesh axis 'ep' and the batch over ('dp', 'ep'); same values as the
    single-device MoE path. `mesh` defaults to the one set by jax.set_mesh."""
    if fp8:
        raise ValueError("precision fp8 is not implemented under expert parallelism (a mesh with ep > 1): "
                         "the expert-parallel MoE runs its grouped GEMMs in the compute dtype; use "
                         "--precision bf16 with ep > 1, or fp8 with dp/pp only")
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
    e_loc = e // ep
    has_bias = bias_E is not None

    def local(x_BTD, router_DE, bias_E, w_gate_EDF, w_up_EDF, w_down_EFD):
        b, t, d = x_BTD.shape
        x_TD = x_BTD.reshape(b * t, d)
        routing = route(x_TD, router_DE, bias_E if has_bias else None, cfg)
        n = b * t
        cap = n * min(k, e_loc)
        dest_N = (routing.experts_TK // e_loc).reshape(-1)  # N = T*K pairs, token-major
        onehot_NR = jax.nn.one_hot(dest_N, ep, dtype=jnp.int32)
        slot_N = jnp.take_along_axis(jnp.cumsum(onehot_NR, axis=0) - onehot_NR, dest_N[:, None], axis=1)[:, 0]
        token_N = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
        send_RCD = jnp.zeros((ep, cap, d), x_TD.dtype).at[dest_N, slot_N].set(x_TD[token_N])
        send_RC = jnp.full((ep, cap), e_loc, jnp.int32).at[dest_N, slot_N].set(
            (routing.experts_TK % e_loc).reshape(-1))
        recv_RCD = jax.lax.all_to_all(send_RCD, "ep", 0, 0)
        recv_RC = jax.lax.all_to_all(send_RC, "ep", 0, 0)
        local = Routing(jnp.ones((ep * cap, 1), jnp.float32), recv_RC.reshape(ep * cap, 1), None)
        y_PD, _ = routed_experts(recv_RCD.reshape(ep * cap, d), local, w_gate_EDF, w_up_EDF, w_down_EFD, tile)
        back_RCD = jax.lax.all_to_all(y_PD.reshape(ep, cap, d), "ep", 0, 0)
        y_TKD = back_RCD[dest_N, slot_N].reshape(n, k, d)
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
