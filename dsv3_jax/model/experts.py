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
each segment by its expert's weight, `combine` sums each token's gated rows. No pair is dropped: on the CPU a
capacity C puts each expert's first C pairs in rows of their own, multiplied in one batched product, and only the
rest in the segments (`default_capacity`); every pair still has a row.
`routed_experts` composes them; its FP8 form (`fp8=True`) and the expert-parallel path
(sharding/expert_parallel.py, which runs it on the rows each rank receives) differ only in the GEMM. Dispatch and
combine run the Pallas kernels (pallas_kernels/dispatch.py) on GPU and their jnp references elsewhere.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import EXPERT_TILE, fp8_expert_swiglu
from dsv3_jax.model.dense import matmul, mT
from dsv3_jax.residuals import as_bits, from_bits
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
    """Where each (token, slot) pair sits in the expert-sorted buffer, and what each buffer row holds.

    With a capacity C > 0 (the CPU's batched expert GEMM), rows [0, E*C) hold every expert's first C pairs,
    expert e's at e*C + rank (unfilled rows are padding), and the segments from row E*C hold the rest, the
    overflow; padded_E then counts overflow rows. With C = 0 the segments hold every pair."""

    row_TK: jax.Array  # int32 buffer row of pair (t, k); -1 for an expert id outside [0, E) (no row)
    src_P: jax.Array  # int32 token of row p; -1 on padding rows
    expert_P: jax.Array  # int32 expert of row p; -1 on padding rows (DeepGEMM's m_indices)
    counts_E: jax.Array  # int32 pairs routed to each expert
    padded_E: jax.Array  # int32 rows of each expert's segment (past the capacity): a multiple of `align`

    @property
    def rows(self) -> int:
        """The static buffer length P."""
        return self.src_P.shape[0]


def buffer_rows(num_pairs: int, num_experts: int, align: int, capacity: int = 0) -> int:
    """Static buffer length: the capacity rows, then the segments' worst case, rounded up to ``align``. Without a
    capacity that is every pair plus every segment's padding. With one (a multiple of ``align``), each of the m
    experts that overflow fills its C rows first, so the segments hold at most n - m*C pairs + m*(align - 1)
    padding rows: most at m = 1."""
    if capacity:
        worst = max(num_pairs - capacity + align - 1, 0)
    else:
        worst = num_pairs + num_experts * (align - 1)
    return num_experts * capacity + -(-worst // align) * align


def expert_layout(experts_TK: jax.Array, num_experts: int, align: int, capacity: int = 0) -> ExpertLayout:
    """Expert-contiguous placement of all T*K pairs (token order within an expert): with ``capacity`` C, each
    expert's first C pairs in its C rows from e*C, the rest in segments from row E*C; each segment padded to a
    multiple of ``align``. Ids outside [0, num_experts) get no row. The buffer is the static worst case."""
    t, k = experts_TK.shape
    n = t * k
    rows = buffer_rows(n, num_experts, align, capacity)
    e_N = experts_TK.reshape(n).astype(jnp.int32)
    key_N = jnp.where((e_N >= 0) & (e_N < num_experts), e_N, num_experts)  # outside ids sort last, get no row
    counts_E = jnp.bincount(key_N, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    padded_E = (jnp.maximum(counts_E - capacity, 0) + align - 1) // align * align
    start_E = num_experts * capacity + jnp.cumsum(padded_E) - padded_E  # first row of each segment
    first_E = jnp.cumsum(counts_E) - counts_E  # sorted position of each expert's first pair
    order_N = jnp.argsort(key_N, stable=True)
    key_sorted = key_N[order_N]
    e_clip = jnp.minimum(key_sorted, num_experts - 1)
    rank = jnp.arange(n, dtype=jnp.int32) - first_E[e_clip]  # the pair's place among its expert's pairs
    row_sorted = jnp.where(rank < capacity, e_clip * capacity + rank, start_E[e_clip] + rank - capacity)
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


def dispatch(x_TD: jax.Array, experts_TK: jax.Array, num_experts: int, align: int = EXPERT_TILE, capacity: int = 0,
             *, impl=None, interpret=None) -> tuple[jax.Array, ExpertLayout]:
    """The expert-sorted buffer x_PD of all T*K pairs (padding rows zero) and its layout (`expert_layout`); Pallas
    gather on GPU, jnp elsewhere (``impl="pallas"|"ref"``, ``interpret`` force one)."""
    impl, interpret = resolve_impl(impl, interpret)
    _check_dispatch_args(x_TD, experts_TK, num_experts, align)
    layout = expert_layout(experts_TK, num_experts, align, capacity)
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


def grouped_matmul(x_PD: jax.Array, w_EDF: jax.Array, padded_E: jax.Array, tile: int, capacity: int = 0) -> jax.Array:
    """The expert GEMM over an `expert_layout` buffer: row block g of the segments (padded_E[g] rows, in order)
    times w[g], and with a capacity C, rows [g*C, (g+1)*C) times w[g] as well; rows past the segments give zeros.

    tile == 0 (C = 0): jax.lax.ragged_dot (accelerators; on the CPU a masked product of every row with every
    expert). tile >= 1 (the CPU; segments are whole tiles): the capacity rows in one batched product
    [E, C, D] x [E, D, F], which runs near the dense rate, and the segments tile by tile, one (tile x D) x (D x F)
    product per used tile (a third of the dense rate: each tile copies its expert's weight out of the stack).
    """
    if tile == 0:
        if capacity:
            raise ValueError("grouped_matmul: ragged_dot (tile 0) takes no capacity")
        return jax.lax.ragged_dot(x_PD, w_EDF, padded_E)
    if capacity % tile:
        raise ValueError(f"grouped_matmul: capacity {capacity} must be a multiple of the tile {tile}")
    n_tiles = (x_PD.shape[0] - w_EDF.shape[0] * capacity) // tile
    owner_N = _tile_experts(padded_E, n_tiles, tile)
    used = jnp.sum(padded_E, dtype=jnp.int32) // tile  # the segments' tiles; the loop runs over these only
    return _capacity_tiled_matmul(x_PD, w_EDF, owner_N, used, tile, capacity)


def _split(x_PD, experts: int, capacity: int):
    """The capacity rows as [E, C, D] and the segment rows [P - E*C, D]."""
    cap = experts * capacity
    return x_PD[:cap].reshape(experts, capacity, x_PD.shape[1]), x_PD[cap:]


def _take(a, start, size: int | None = None):
    """Rows [start, start + size) of `a` (a[start] when size is None) at a traced start. Narrow floats are sliced
    as their bits: XLA's CPU backend converts a whole BF16 array to FP32 to slice it (dsv3_jax/residuals.py), and
    in a loop that conversion, of the whole expert stack, is repeated every iteration."""
    bits, dtype = as_bits(a)
    if size is None:
        return from_bits(jax.lax.dynamic_index_in_dim(bits, start, keepdims=False), dtype)
    return from_bits(jax.lax.dynamic_slice_in_dim(bits, start, size), dtype)


def _put(bits, value, start: jax.Array, index: bool = False):
    """`bits` (a loop carry kept as `as_bits`) with `value` written at row `start` (as index `start` with
    `index`)."""
    v = as_bits(value)[0]
    if index:
        return jax.lax.dynamic_update_index_in_dim(bits, v, start, 0)
    return jax.lax.dynamic_update_slice_in_dim(bits, v, start, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _capacity_tiled_matmul(x_PD, w_EDF, owner_N, used, tile, capacity):
    e = w_EDF.shape[0]
    x_ECD, x_SD = _split(x_PD, e, capacity)

    def body(n, y_SF):
        return _put(y_SF, matmul(_take(x_SD, n * tile, tile), _take(w_EDF, owner_N[n])), n * tile)

    y_SF, dtype = as_bits(jnp.zeros((x_SD.shape[0], w_EDF.shape[2]), x_PD.dtype))
    y_SF = from_bits(jax.lax.fori_loop(0, used, body, y_SF), dtype)
    if not capacity:
        return y_SF
    return jnp.concatenate([matmul(x_ECD, w_EDF).reshape(e * capacity, -1), y_SF])


def _capacity_tiled_matmul_fwd(x_PD, w_EDF, owner_N, used, tile, capacity):
    out = _capacity_tiled_matmul(x_PD, w_EDF, owner_N, used, tile, capacity)
    return out, as_bits((x_PD, w_EDF, owner_N, used))  # as bits: see dsv3_jax/residuals.py


def _capacity_tiled_matmul_bwd(tile, capacity, res, g_PF):
    # The batched part's dx and dW as batched products; then one loop over the used tiles: dx_tile = g_tile . w_e^T,
    # and dW_e += x_tile^T . g_tile updated in place in the carry (autodiff would add an [E, D, F] cotangent per tile).
    # Transposed operands through mT (row-major in bfloat16 on the CPU: dsv3_jax.model.dense).
    x_PD, w_EDF, owner_N, used = from_bits(*res)
    e, f32 = w_EDF.shape[0], jnp.float32
    x_ECD, x_SD = _split(x_PD, e, capacity)
    g_ECF, g_SF = _split(g_PF, e, capacity)
    dw_EDF = matmul(mT(x_ECD), g_ECF, f32)  # zeros at capacity 0

    def body(n, carry):
        dx_SD, dw_EDF = carry
        x_TD, g_TF = _take(x_SD, n * tile, tile), _take(g_SF, n * tile, tile)
        acc = _take(dw_EDF, owner_N[n]) + matmul(mT(x_TD), g_TF, f32)
        dx_SD = _put(dx_SD, matmul(g_TF, mT(_take(w_EDF, owner_N[n])), x_SD.dtype), n * tile)
        return dx_SD, _put(dw_EDF, acc, owner_N[n], index=True)

    dx_SD, dtype = as_bits(jnp.zeros(x_SD.shape, x_PD.dtype))
    dx_SD, dw_EDF = jax.lax.fori_loop(0, used, body, (dx_SD, dw_EDF))
    dx_SD = from_bits(dx_SD, dtype)
    if capacity:
        dx_SD = jnp.concatenate([matmul(g_ECF, mT(w_EDF), dx_SD.dtype).reshape(e * capacity, -1), dx_SD])
    float0 = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    return dx_SD, dw_EDF.astype(w_EDF.dtype), float0(owner_N), float0(used)


_capacity_tiled_matmul.defvjp(_capacity_tiled_matmul_fwd, _capacity_tiled_matmul_bwd)


def default_tile(pairs: int | None = None, num_experts: int | None = None) -> int:
    """Grouped-matmul tile: ragged_dot (0) on accelerators. On the CPU, padded tiles of 64 rows, except for few
    (token, expert) pairs (decoding): there every pair is its own tile, so only the chosen experts' weights are
    read, not the E x 63 padding rows of 64-row tiles."""
    if jax.default_backend() != "cpu":
        return 0
    if pairs is not None and num_experts is not None and pairs <= num_experts:
        return 1
    return 64


CAPACITY_FACTOR = 1.25


def default_capacity(pairs: int, num_experts: int, tile: int) -> int:
    """Rows per expert of the CPU grouped matmul's batched product: CAPACITY_FACTOR x the mean load, rounded up to
    the tile (the rest of a segment overflows to the tiled loop, nothing is dropped); 0 (tiles only) for tile 1
    (few pairs: only the chosen experts' weights are read) and when the mean load is under one tile, where the
    batched product would mostly multiply padding."""
    if tile <= 1 or pairs < num_experts * tile:
        return 0
    return -(-int(np.ceil(CAPACITY_FACTOR * pairs / num_experts)) // tile) * tile


def _swiglu_experts(x_PD, padded_E, w_gate_EDF, w_up_EDF, w_down_EFD, tile: int, capacity: int = 0) -> jax.Array:
    """Row p of the buffer through its segment's expert: SwiGLU with three grouped matmuls in x's dtype."""
    dt = x_PD.dtype

    def gemm(x, w):
        return grouped_matmul(x, w.astype(dt), padded_E, tile, capacity)

    h = checkpoint_name(jax.nn.silu(gemm(x_PD, w_gate_EDF)) * gemm(x_PD, w_up_EDF), "swiglu")
    return gemm(h, w_down_EFD)


@jax.named_scope("expert_gemms")
def routed_experts_split(x_TD: jax.Array, routing: Routing, w_gate_E, w_up_E, w_down_E) -> tuple[jax.Array, jax.Array]:
    """routed_experts with the expert weights as E separate arrays each (w_gate_E[e]: [D, F], w_down_E[e]: [F, D];
    the decoder's form, inference/decoder.py), reading only the chosen experts' weights, where a slice of a
    stacked [E, ...] weight would be copied first (on the CPU that copy costs more than the product).

    Few pairs (at most E/4: batch-1 decoding): each (token, slot) pair runs its expert's SwiGLU in a `lax.switch`.
    More pairs (batched decoding, prefill): tiles of CAPACITY_FACTOR x the mean load (at least one row), each
    expert's segment padded to whole tiles, each used tile through its expert's SwiGLU in a `lax.switch`, so a
    chosen expert's weights are read once per tile of its rows. (Re-stacking the weights for the stacked path
    copied every expert of every layer, most of a prefill's time; running each chosen expert under a `lax.cond`
    over all T rows was 10-25% slower a decode step at batch 2-16 on `small`.)"""
    t, k = routing.experts_TK.shape
    e = len(w_gate_E)
    dt = x_TD.dtype

    def swiglu(i, x):
        g, u, d = w_gate_E[i].astype(dt), w_up_E[i].astype(dt), w_down_E[i].astype(dt)
        return (jax.nn.silu(x @ g) * (x @ u)) @ d

    branches = [lambda x, i=i: swiglu(i, x) for i in range(e)]  # for lax.switch over the expert id
    if 4 * t * k > e:
        tile = int(np.ceil(CAPACITY_FACTOR * t * k / e))
        x_PD, layout = dispatch(x_TD, routing.experts_TK, e, tile)
        owner_N = _tile_experts(layout.padded_E, layout.rows // tile, tile)

        def tile_product(n, y_PD):
            y_TD = jax.lax.switch(owner_N[n], branches, jax.lax.dynamic_slice_in_dim(x_PD, n * tile, tile))
            return jax.lax.dynamic_update_slice_in_dim(y_PD, y_TD, n * tile, 0)

        y_PD = jax.lax.fori_loop(0, jnp.sum(layout.padded_E) // tile, tile_product, jnp.zeros_like(x_PD))
        with jax.named_scope("combine"):
            return combine(y_PD, layout, routing.weights_TK), layout.counts_E
    valid_TK = (routing.experts_TK >= 0) & (routing.experts_TK < e)  # outside ids contribute nothing
    experts_TK = jnp.where(valid_TK, routing.experts_TK, e)
    weights_TK = jnp.where(valid_TK, routing.weights_TK, 0.0)
    counts_E = jnp.bincount(experts_TK.reshape(-1), length=e + 1)[:e].astype(jnp.int32)

    def pair(_, xs):
        x_D, e_id = xs
        return None, jax.lax.switch(jnp.minimum(e_id, e - 1), branches, x_D)

    _, y_ND = jax.lax.scan(pair, None, (jnp.repeat(x_TD, k, axis=0), experts_TK.reshape(-1)))
    y_TD = jnp.einsum("tk,tkd->td", weights_TK, y_ND.reshape(t, k, -1).astype(jnp.float32))
    return y_TD.astype(dt), counts_E


def routed_experts(x_TD: jax.Array, routing: Routing, w_gate_EDF, w_up_EDF, w_down_EFD, tile: int | None = None,
                   fp8: bool = False, capacity: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum_k g_k * SwiGLU_{e_k}(x) per token, dropless (eq. 13's routed term); pairs per expert [E]); expert ids
    outside [0, E) contribute nothing. `fp8`: FP8 expert GEMMs over 128-row tiles (dsv3_jax.fp8). `tile` and
    `capacity`: the grouped matmul's (`default_tile`, `default_capacity` when None)."""
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
        capacity = default_capacity(t * k, e, tile) if capacity is None else capacity
        with jax.named_scope("dispatch"):
            x_PD, layout = dispatch(x_TD, routing.experts_TK, e, max(tile, 1), capacity)
        with jax.named_scope("expert_gemms"):
            y_PD = _swiglu_experts(x_PD, layout.padded_E, w_gate_EDF, w_up_EDF, w_down_EFD, tile, capacity)
    with jax.named_scope("combine"):
        return combine(y_PD, layout, routing.weights_TK), layout.counts_E
