"""Which MoE layers each pipeline stage holds (paper §3.2.1: DeepSeek-V3 trains with 16 pipeline stages for its 61
layers, so the stages cannot all be equal), and the conversions between the model's stacked MoE layers and the
pipeline layout the train state keeps under --pipeline.

The embedding and the dense layers always run on the first stage's edge, the final norm, head and MTP modules on
the last stage's edge; the MoE stack is cut into contiguous runs, `moe_counts[s]` layers for stage s (0 allowed).
Each stage gets `slots` = max(moe_counts) layer slots; a stage with fewer layers has padding slots (zeros, marked
invalid by `valid_mask`), which the stage function skips (no compute, no expert counts, no balance term) and the
conversions back to the model tree drop.

Pipeline layout of one stacked MoE leaf [L, ...]: [ranks, homes, slots, ...], entry [r, h] holding stage
`homes[r][h]` (each stage stored once, on its home rank; sharding/pipeline_exec.stage_homes), sharded over 'pp'.
"""

from __future__ import annotations

import dataclasses
import heapq

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class StageCosts:
    """Rough forward cost per token (FLOPs) of the pieces a stage can hold, for balancing the stages."""

    dense: float  # one dense transformer layer (MLA + dense SwiGLU)
    moe: float  # one MoE layer (MLA + shared expert + K routed experts; the all-to-all is not counted)
    embed: float  # the embedding lookup (no matmul: ~0)
    head: float  # final norm + output head + every MTP module (its block, eh_proj and another head pass)


def stage_costs(cfg: ModelConfig, seq_len: int = 4096) -> StageCosts:
    """StageCosts of `cfg` as 2 x (activated matmul parameters) + the attention products at `seq_len` (causal:
    (seq_len + 1) / 2 keys on average), the count train/flops.py uses for MFU, split by piece."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.attention == "mla":
        q = d * h * cfg.qk_head_dim if not cfg.q_lora_rank else d * cfg.q_lora_rank + cfg.q_lora_rank * h * \
            cfg.qk_head_dim
        kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim +
                                                                                      cfg.v_head_dim)
        attn_params, qk_v = q + kv + h * cfg.v_head_dim * d, cfg.qk_head_dim + cfg.v_head_dim
    else:
        kvh = cfg.num_key_value_heads or h
        attn_params, qk_v = d * cfg.attn_head_dim * (2 * h + 2 * kvh), 2 * cfg.attn_head_dim
    attn = 2.0 * attn_params + 2.0 * h * qk_v * (seq_len + 1) / 2
    dense = attn + 2.0 * 3 * d * cfg.intermediate_size
    moe = attn + 2.0 * 3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts) \
        + 2.0 * d * cfg.n_routed_experts  # router
    head_pass = 2.0 * d * cfg.vocab_size
    head = head_pass + cfg.num_mtp_layers * (moe + 2.0 * 2 * d * d + head_pass)
    return StageCosts(dense=dense, moe=moe, embed=0.0, head=head)


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """MoE layers per pipeline stage (stage s runs MoE layers [starts[s], starts[s] + moe_counts[s])), plus the
    number of dense layers run with the embedding on the first stage's edge."""

    moe_counts: tuple[int, ...]
    num_dense: int = 0

    def __post_init__(self):
        if not self.moe_counts or any(not isinstance(n, int) or n < 0 for n in self.moe_counts):
            raise ValueError(f"StageLayout.moe_counts must be non-negative integers, one per stage, got "
                             f"{self.moe_counts!r}")
        if sum(self.moe_counts) == 0:
            raise ValueError("StageLayout: the pipeline cuts the MoE stack into stages, and it has no MoE layer")

    @property
    def num_stages(self) -> int:
        return len(self.moe_counts)

    @property
    def num_moe(self) -> int:
        return sum(self.moe_counts)

    @property
    def slots(self) -> int:
        """Layer slots per stage (the largest stage's MoE layer count)."""
        return max(self.moe_counts)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.cumsum((0,) + self.moe_counts[:-1]))

    def valid_mask(self) -> np.ndarray:
        """bool [stages, slots]: True where the slot holds a layer, False for padding."""
        return np.arange(self.slots)[None, :] < np.array(self.moe_counts)[:, None]

    def layer_index(self) -> np.ndarray:
        """int32 [stages, slots]: the MoE layer in each slot (padding slots: the stack's length L, one past the
        end, so a gather with mode='fill' reads zeros there)."""
        idx = np.array(self.starts)[:, None] + np.arange(self.slots)[None, :]
        return np.where(self.valid_mask(), idx, self.num_moe).astype(np.int32)

    def stage_layers(self) -> tuple[int, ...]:
        """Transformer layers per stage, the first stage's dense layers included (the --stage-layers form)."""
        return (self.moe_counts[0] + self.num_dense,) + self.moe_counts[1:]

    def describe(self) -> str:
        return ",".join(str(n) for n in self.stage_layers())


def balanced_layout(cfg: ModelConfig, num_stages: int, seq_len: int = 4096,
                    costs: StageCosts | None = None) -> StageLayout:
    """The StageLayout minimising the most expensive stage under `costs` (default stage_costs(cfg, seq_len)): the
    MoE layers go one at a time to the stage that is cheapest after taking it (ties: the earlier stage), which for
    equal-cost layers gives the smallest possible maximum; the edges' fixed costs sit on the first and last stage."""
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    if cfg.num_moe_layers == 0:
        raise ValueError(f"the model has no MoE layer ({cfg.num_dense_layers} dense layers): the pipeline cuts the "
                         "MoE stack into stages")
    c = stage_costs(cfg, seq_len) if costs is None else costs
    base = [0.0] * num_stages
    base[0] += c.embed + cfg.num_dense_layers * c.dense
    base[-1] += c.head
    heap = [(base[s] + c.moe, s) for s in range(num_stages)]
    heapq.heapify(heap)
    counts = [0] * num_stages
    for _ in range(cfg.num_moe_layers):
        cost, s = heapq.heappop(heap)
        counts[s] += 1
        heapq.heappush(heap, (cost + c.moe, s))
    return StageLayout(tuple(counts), cfg.num_dense_layers)


def parse_stage_layers(spec: str, cfg: ModelConfig, num_stages: int) -> StageLayout:
    """StageLayout of a user's `--stage-layers` 'N0,N1,...': transformer layers per stage, the first stage's count
    including the model's dense layers (which run there with the embedding); ValueError naming the problem."""
    try:
        counts = [int(x) for x in spec.split(",")]
    except (AttributeError, ValueError):
        raise ValueError(f"--stage-layers {spec!r}: expected comma-separated layer counts per stage, e.g. "
                         "'4,4,3'") from None
    if len(counts) != num_stages:
        raise ValueError(f"--stage-layers {spec!r} gives {len(counts)} stages; the schedule has {num_stages}")
    if any(n < 0 for n in counts):
        raise ValueError(f"--stage-layers {spec!r}: layer counts must be >= 0")
    if sum(counts) != cfg.num_hidden_layers:
        raise ValueError(f"--stage-layers {spec!r} sums to {sum(counts)} layers; the model has "
                         f"{cfg.num_hidden_layers}")
    if counts[0] < cfg.num_dense_layers:
        raise ValueError(f"--stage-layers {spec!r}: the first stage holds the model's {cfg.num_dense_layers} dense "
                         f"layers, so its count must be at least {cfg.num_dense_layers}")
    return StageLayout(tuple([counts[0] - cfg.num_dense_layers] + counts[1:]), cfg.num_dense_layers)


def check_layout(layout: StageLayout, cfg: ModelConfig, num_stages: int) -> None:
    """ValueError unless `layout` cuts `cfg`'s MoE stack into `num_stages` stages."""
    if layout.num_stages != num_stages or layout.num_moe != cfg.num_moe_layers or \
            layout.num_dense != cfg.num_dense_layers:
        raise ValueError(f"stage layout {layout.moe_counts} (MoE layers per stage, {layout.num_dense} dense) does not "
                         f"fit {num_stages} stages of a model with {cfg.num_dense_layers} dense and "
                         f"{cfg.num_moe_layers} MoE layers")


# ---- conversions: stacked MoE leaves [L, ...] <-> pipeline layout [ranks, homes, slots, ...] -------------------

def _slot_index(layout: StageLayout, homes) -> np.ndarray:
    return layout.layer_index()[np.asarray(homes)]  # [ranks, homes, slots]


def to_pipeline(stack, layout: StageLayout, homes):
    """[L, ...] -> [ranks, homes, slots, ...]: stage homes[r][h]'s layers, zeros in padding slots."""
    idx = _slot_index(layout, homes)
    if stack.shape[0] != layout.num_moe:
        raise ValueError(f"stack of {stack.shape[0]} layers for a layout of {layout.num_moe} MoE layers")
    xp = np if isinstance(stack, np.ndarray) else jnp
    padded = xp.concatenate([stack, xp.zeros((1,) + stack.shape[1:], stack.dtype)])
    return padded[idx]


def from_pipeline(arr, layout: StageLayout, homes):
    """[ranks, homes, slots, ...] -> [L, ...]: the stacked layers in model order, padding dropped."""
    idx = _slot_index(layout, homes).reshape(-1)
    pos = np.empty(layout.num_moe, np.int64)
    pos[idx[idx < layout.num_moe]] = np.nonzero(idx < layout.num_moe)[0]
    if len(set(idx[idx < layout.num_moe].tolist())) != layout.num_moe:
        raise ValueError("homes must place every stage exactly once")
    return arr.reshape((-1,) + arr.shape[3:])[pos]


def valid_pipeline(layout: StageLayout, homes) -> np.ndarray:
    """float32 [ranks, homes, slots]: 1 where the slot holds a layer, 0 for padding."""
    return layout.valid_mask()[np.asarray(homes)].astype(np.float32)


def _is_moe(path) -> bool:
    return bool(path) and getattr(path[0], "key", None) == "moe_layers"


def _is_var(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def _map_moe(tree, fn, axes_fn):
    """`tree` (an nnx.State of Variables or of arrays) with every moe_layers leaf replaced by fn(leaf) (and a
    Variable's logical axes by axes_fn(axes))."""

    def put(path, x):
        if not _is_moe(path):
            return x
        if _is_var(x):
            meta = x.get_metadata()
            upd = {"out_sharding": axes_fn(tuple(meta["out_sharding"]))} if meta.get("out_sharding") else {}
            return x.replace(fn(x.get_value()), **upd)
        return fn(x)

    return jax.tree_util.tree_map_with_path(put, tree, is_leaf=_is_var)


def tree_to_pipeline(tree, layout: StageLayout, homes):
    """A model-tree nnx.State (params, bias, or grads) with its moe_layers leaves in the pipeline layout (logical
    axes ('stages', None, 'layers', ...): sharded over 'pp' by sharding/rules.py)."""
    return _map_moe(tree, lambda a: to_pipeline(a, layout, homes), lambda ax: ("stages", None) + ax)


def tree_from_pipeline(tree, layout: StageLayout, homes):
    """Inverse of tree_to_pipeline: moe_layers leaves back to [L, ...] in model order, padding dropped."""
    return _map_moe(tree, lambda a: from_pipeline(a, layout, homes),
                    lambda ax: ax[2:] if ax[:2] == ("stages", None) else ax)
