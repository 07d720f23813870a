"""Routed experts of DeepSeekMoE (paper §2.1.2, eqs. 12-16; §3.3.3 for FP8; reference §4, §5.2): the one home of
routing, the expert-contiguous layout, dispatch/combine and the grouped GEMM, pure functions of arrays.

Dimension letters: T tokens (flattened B*T), D model, E routed experts, K experts per token, G groups, F expert
width, P rows of the expert-sorted buffer, N tiles of the buffer.

Routing: sigmoid (V3) or softmax (V2) affinities s; the bias b only chooses experts (s + b), the gate values use
the unbiased s. Group-limited routing keeps the topk_group groups with the best group score (sum of the top-2
biased scores with a bias, max without) and masks the other groups with -inf. The chosen affinities are
renormalised when norm_topk_prob and scaled by routed_scaling_factor.

Dropless: `expert_layout` gives every (token, slot) pair a row of an expert-sorted buffer whose segments are padded
to a multiple of `align` (DeepGEMM's contiguous layout); `dispatch` gathers the rows, `grouped_matmul` multiplies
each segment by its expert's weight, `combine` sums each token's gated rows. No capacity factor, no pair dropped.
`routed_experts` composes them; its FP8 form (`fp8=True`) and the expert-parallel path
(sharding/expert_parallel.py, which runs it on the rows each rank receives) differ only in the GEMM. Dispatch and
combine run the Pallas kernels (pallas_kernels/dispatch.py) on GPU and their jnp references elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import EXPERT_TILE, fp8_expert_swiglu
from pallas_kernels import combine_rows, combine_rows_ref, dispatch_rows, dispatch_rows_ref, resolve_impl


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


class ExpertLayout(NamedTuple):
    """Where each (token, slot) pair sits in the expert-sorted buffer, and what each buffer row holds."""

    row_TK: jax.Array  # int32 buffer row of pair (t, k); -1 for an expert id outside [0, E) (no row)
    src_P: jax.Array  # int32 token of row p; -1 on padding rows
    expert_P: jax.Array  # int32 expert of row p; -1 on padding rows (DeepGEMM's m_indices)
    counts_E: jax.Array  # int32 pairs routed to each expert
    padded_E: jax.Array  # int32 rows of each expert's segment: counts_E rounded up to a multiple of `align`

    @property
    def rows(self) -> int:
        """The static buffer length P."""
        return self.src_P.shape[0]


def buffer_rows(num_pairs: int, num_experts: int, align: int) -> int:
    """Static buffer length: every pair plus the worst-case padding of every segment, rounded up to ``align``."""
    return -(-(num_pairs + num_experts * (align - 1)) // align) * align


def expert_layout(experts_TK: jax.Array, num_experts: int, align: int) -> ExpertLayout:
    """Expert-contiguous placement of all T*K pairs (token order within an expert), each expert's segment padded to
    a multiple of ``align``; ids outside [0, num_experts) get no row. The buffer is the static worst case."""
    t, k = experts_TK.shape
    n = t * k
    rows = buffer_rows(n, num_experts, align)
    e_N = experts_TK.reshape(n).astype(jnp.int32)
    key_N = jnp.where((e_N >= 0) & (e_N < num_experts), e_N, num_experts)  # outside ids sort last, get no row
    counts_E = jnp.bincount(key_N, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    padded_E = (counts_E + align - 1) // align * align
    start_E = jnp.cumsum(padded_E) - padded_E  # first row of each segment
    first_E = jnp.cumsum(counts_E) - counts_E  # sorted position of each expert's first pair
    order_N = jnp.argsort(key_N, stable=True)
    key_sorted = key_N[order_N]
    e_clip = jnp.minimum(key_sorted, num_experts - 1)
    row_sorted = start_E[e_clip] + jnp.arange(n, dtype=jnp.int32) - first_E[e_clip]
    row_sorted = jnp.where(key_sorted < num_experts, row_sorted, -1)
    row_N = jnp.zeros((n,), jnp.int32).at[order_N].set(row_sorted.astype(jnp.int32))
    scatter_N = jnp.where(row_N >= 0, row_N, rows)  # out of bounds: dropped
    src_P = jnp.full((rows,), -1, jnp.int32).at[scatter_N].set(jnp.arange(n, dtype=jnp.int32) // k, mode="drop")
    expert_P = jnp.full((rows,), -1, jnp.int32).at[scatter_N].set(e_N, mode="drop")
    return ExpertLayout(row_N.reshape(t, k), src_P, expert_P, counts_E, padded_E)


def _check_dispatch_args(x_TD, experts_TK, num_experts, align) -> None:
    if x_TD.ndim != 2:
        raise ValueError(f"dispatch: x_TD must be [T, D], got shape {x_TD.shape}")
    if experts_TK.ndim != 2 or experts_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"dispatch: experts_TK must be [T={x_TD.shape[0]}, K], got shape {experts_TK.shape}")
    if not jnp.issubdtype(experts_TK.dtype, jnp.integer):
        raise ValueError(f"dispatch: experts_TK must hold integer expert ids, got dtype {experts_TK.dtype}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"dispatch: num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(align, int) or isinstance(align, bool) or align < 1:
        raise ValueError(f"dispatch: align must be a positive int, got {align!r}")


def dispatch(x_TD: jax.Array, experts_TK: jax.Array, num_experts: int, align: int = EXPERT_TILE, *, impl=None,
             interpret=None) -> tuple[jax.Array, ExpertLayout]:
    """The expert-sorted buffer x_PD of all T*K pairs (padding rows zero) and its layout; Pallas gather on GPU, jnp
    elsewhere (``impl="pallas"|"ref"``, ``interpret`` force one)."""
    impl, interpret = resolve_impl(impl, interpret)
    _check_dispatch_args(x_TD, experts_TK, num_experts, align)
    layout = expert_layout(experts_TK, num_experts, align)
    if impl == "ref":
        return dispatch_rows_ref(x_TD, layout.src_P, layout.row_TK), layout
    return dispatch_rows(x_TD, layout.src_P, layout.row_TK, interpret), layout


def combine(y_PD: jax.Array, layout: ExpertLayout, weights_TK: jax.Array, *, impl=None, interpret=None) -> jax.Array:
    """y_TD[t] = sum_k weights_TK[t, k] * y_PD[row of (t, k)], accumulated in FP32, returned in y_PD's dtype."""
    impl, interpret = resolve_impl(impl, interpret)
    if y_PD.ndim != 2 or y_PD.shape[0] != layout.rows:
        raise ValueError(f"combine: y_PD must be [P={layout.rows}, D], got shape {y_PD.shape}")
    if tuple(weights_TK.shape) != tuple(layout.row_TK.shape):
        raise ValueError(f"combine: weights_TK must be {tuple(layout.row_TK.shape)}, got shape {weights_TK.shape}")
    if impl == "ref":
        return combine_rows_ref(y_PD, layout.src_P, layout.row_TK, weights_TK)
    return combine_rows(y_PD, layout.src_P, layout.row_TK, weights_TK, interpret)


def _tile_experts(padded_E: jax.Array, n_tiles: int, tile: int) -> jax.Array:
    """int32 [N]: the expert owning each `tile`-row tile (segments are whole tiles); tiles past the last segment
    (padding only) get the last expert."""
    ends = jnp.cumsum(padded_E)
    # searchsorted(ends, starts, side="right") as a count: jnp.searchsorted fails inside shard_map (jax 0.10).
    owner_N = jnp.sum(ends[None, :] <= (jnp.arange(n_tiles) * tile)[:, None], axis=1)
    return jnp.minimum(owner_N, padded_E.shape[0] - 1).astype(jnp.int32)


def grouped_matmul(x_PD: jax.Array, w_EDF: jax.Array, padded_E: jax.Array, tile: int) -> jax.Array:
    """Row block g of x (padded_E[g] rows, in order) times w[g]; rows past the groups give zeros.

    tile == 0: jax.lax.ragged_dot (accelerators). tile >= 1 (segments padded to whole tiles): each tile belongs to
    one expert; `_tiled_matmul` runs one (tile x D) @ (D x F) product per tile, much faster than ragged_dot on the
    CPU (where it is a masked product of every row with every expert).
    """
    if tile == 0:
        return jax.lax.ragged_dot(x_PD, w_EDF, padded_E)
    in_groups = jnp.arange(x_PD.shape[0]) < jnp.sum(padded_E)  # the tail past the last group multiplies nothing
    x_PD = jnp.where(in_groups[:, None], x_PD, 0)
    return _tiled_matmul(x_PD, w_EDF, _tile_experts(padded_E, x_PD.shape[0] // tile, tile))


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


def _swiglu_experts(x_PD, padded_E, w_gate_EDF, w_up_EDF, w_down_EFD, tile: int) -> jax.Array:
    """Row p of the buffer through its segment's expert: SwiGLU with three grouped matmuls in x's dtype."""
    dt = x_PD.dtype
    h = checkpoint_name(jax.nn.silu(grouped_matmul(x_PD, w_gate_EDF.astype(dt), padded_E, tile))
                        * grouped_matmul(x_PD, w_up_EDF.astype(dt), padded_E, tile), "swiglu")
    return grouped_matmul(h, w_down_EFD.astype(dt), padded_E, tile)


@jax.named_scope("expert_gemms")
def routed_experts_split(x_TD: jax.Array, routing: Routing, w_gate_E, w_up_E, w_down_E) -> tuple[jax.Array, jax.Array]:
    """routed_experts with the expert weights as E separate arrays each (w_gate_E[e]: [D, F], w_down_E[e]: [F, D];
    the decoder's form, inference/decoder.py): each (token, slot) pair runs its expert's SwiGLU in a `lax.switch`,
    so only the chosen experts' weights are read, where a slice of a stacked [E, ...] weight would be copied
    first (on the CPU that copy costs more than the product). For few pairs: every pair reads its expert's
    weights; many tokens (prefill) re-stack them and take routed_experts."""
    t, k = routing.experts_TK.shape
    e = len(w_gate_E)
    if t * k > e:
        return routed_experts(x_TD, routing, jnp.stack(w_gate_E), jnp.stack(w_up_E), jnp.stack(w_down_E))
    dt = x_TD.dtype

    def expert(i):
        def swiglu(x_D):
            g, u, d = w_gate_E[i].astype(dt), w_up_E[i].astype(dt), w_down_E[i].astype(dt)
            return (jax.nn.silu(x_D @ g) * (x_D @ u)) @ d
        return swiglu

    def pair(_, xs):
        x_D, e_id = xs
        return None, jax.lax.switch(jnp.clip(e_id, 0, e - 1), [expert(i) for i in range(e)], x_D)

    e_N = routing.experts_TK.reshape(t * k)
    _, y_ND = jax.lax.scan(pair, None, (jnp.repeat(x_TD, k, axis=0), e_N))
    valid_TK = (routing.experts_TK >= 0) & (routing.experts_TK < e)  # outside ids contribute nothing
    w_TK = jnp.where(valid_TK, routing.weights_TK, 0.0)
    y_TD = jnp.einsum("tk,tkd->td", w_TK, y_ND.reshape(t, k, -1).astype(jnp.float32)).astype(dt)
    counts_E = jnp.bincount(jnp.where(valid_TK, routing.experts_TK, e).reshape(-1), length=e + 1)[:e]
    return y_TD, counts_E.astype(jnp.int32)


def routed_experts(x_TD: jax.Array, routing: Routing, w_gate_EDF, w_up_EDF, w_down_EFD, tile: int | None = None,
                   fp8: bool = False) -> tuple[jax.Array, jax.Array]:
    """(sum_k g_k * SwiGLU_{e_k}(x) per token, dropless (eq. 13's routed term); pairs per expert [E]); expert ids
    outside [0, E) contribute nothing. `fp8`: FP8 expert GEMMs over 128-row tiles (dsv3_jax.fp8)."""
    t, k = routing.experts_TK.shape
    e = w_gate_EDF.shape[0]
    if fp8:
        if tile not in (None, EXPERT_TILE):
            raise ValueError(f"routed_experts: the FP8 path runs tiles of {EXPERT_TILE} rows, got tile={tile}")
        # x is quantized once per token before its own dispatch gather (fp8_expert_swiglu); row T: padding
        layout = expert_layout(routing.experts_TK, e, EXPERT_TILE)
        src_P = jnp.where(layout.src_P < 0, t, layout.src_P)
        tile_expert_N = _tile_experts(layout.padded_E, layout.rows // EXPERT_TILE, EXPERT_TILE)
        y_PD = fp8_expert_swiglu(x_TD, src_P, tile_expert_N, w_gate_EDF, w_up_EDF, w_down_EFD)
    else:
        tile = default_tile(t * k, e) if tile is None else tile
        with jax.named_scope("dispatch"):
            x_PD, layout = dispatch(x_TD, routing.experts_TK, e, max(tile, 1))
        with jax.named_scope("expert_gemms"):
            y_PD = _swiglu_experts(x_PD, layout.padded_E, w_gate_EDF, w_up_EDF, w_down_EFD, tile)
    with jax.named_scope("combine"):
        return combine(y_PD, layout, routing.weights_TK), layout.counts_E
