"""The one table from logical axes to mesh axes (DESIGN principle 2), and the shardings built from it: parameters,
ZeRO-1 / FSDP optimizer state (paper §3.1: ZeRO-1 data parallelism), batches and activation constraints.

Model code names only logical axes: parameters carry them as `out_sharding` metadata (model/params.py `param`),
activations name them in `constrain`. Here they become PartitionSpecs over the mesh axes of sharding/mesh.py.
A mesh axis is used once per array; an axis that does not divide its dimension is left out (replication).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("dp", "ep"),  # attention runs data-parallel over the expert-parallel ranks too (paper §3.1)
    "seq": None,
    "embed": None,
    "vocab": "tp",
    "heads": "tp",
    "kv_heads": None,  # GQA's few key/value heads (possibly fewer than tp): replicated, each rank reads its group
    "mlp": "tp",
    "shared_mlp": "tp",
    "experts": "ep",
    "expert_mlp": None,
    # The stage axis of pipeline parallelism is built by the pipeline executor (stacks split into stages),
    # not a split of each stacked 'layers' axis, whose dense and MoE stacks differ in length.
    "layers": None,
    # The stored stage axis of the pipeline layout (sharding/stage_layout.py: the MoE stack as [ranks, stages per
    # rank, slots, ...] under --pipeline): each pp rank holds its own stages.
    "stages": "pp",
    "q_lora": None,
    "kv_lora": None,
    "qk_head": None,
    "kv_head": None,
    "v_head": None,
    "mtp_concat": None,
}

ZERO_MODES = ("zero1", "fsdp")
DATA_AXES = ("dp", "ep")  # mesh axes a replicated parameter's optimizer state is split over


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def logical_to_spec(logical: tuple[str | None, ...], shape: tuple[int, ...] | None = None, mesh=None,
                    rules: Mapping[str, Any] = RULES) -> P:
    """PartitionSpec for an array whose dimensions carry `logical` names; with shape and mesh, mesh axes of
    size 1, missing from the mesh, or not dividing their dimension are dropped."""
    sizes = None if mesh is None else _mesh_sizes(mesh)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule in sharding.rules.RULES (known: "
                             f"{', '.join(sorted(rules))})")
        target = rules[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        keep = []
        for a in axes:
            if a in used or (sizes is not None and sizes.get(a, 1) == 1):
                continue
            keep.append(a)
        if shape is not None and sizes is not None:
            while keep and shape[i] % math.prod(sizes[a] for a in keep):
                keep.pop()
        used.update(keep)
        out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    return P(*out)


def _zero_spec(shape: tuple[int, ...], spec: P, mesh) -> P:
    """`spec` with the data axes the array is replicated over added on one free dimension they divide (the
    largest such dimension): ZeRO's partitioning of state that is otherwise copied on every data-parallel rank."""
    sizes = _mesh_sizes(mesh)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for e in entries if e is not None for a in ((e,) if isinstance(e, str) else e)}
    free = [a for a in DATA_AXES if sizes.get(a, 1) > 1 and a not in used]
    for axes in (tuple(free), tuple(free[:1])):
        if not axes:
            continue
        n = math.prod(sizes[a] for a in axes)
        dims = [i for i, e in enumerate(entries) if e is None and shape[i] % n == 0]
        if dims:
            i = max(dims, key=lambda d: shape[d])
            entries[i] = axes[0] if len(axes) == 1 else axes
            return P(*entries)
    return P(*entries)


def _names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(n for n in out if n != "value")


def _logical_table(variables) -> dict[tuple[str, ...], tuple]:
    """{path names: logical axes} of an nnx.State of Variables with `out_sharding` metadata."""
    specs = nnx.get_partition_spec(variables)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {_names(path): tuple(spec) for path, spec in flat}


def train_state_shardings(state, mesh, mode: str = "zero1"):
    """NamedShardings for a TrainState {"params", "bias", "opt", "loss_ema", "step"} (arrays or shapes).

    Parameters and expert biases follow RULES; optimizer leaves shaped like a parameter get the parameter's spec
    plus ZeRO partitioning over the data axes; with mode 'fsdp' the parameters are partitioned the same way
    (gathered by GSPMD where used). Everything else is replicated.
    """
    if mode not in ZERO_MODES:
        raise ValueError(f"unknown sharding mode {mode!r}; expected one of {ZERO_MODES}")
    table = {("params",) + k: v for k, v in _logical_table(state["params"]).items()}
    table |= {("bias",) + k: v for k, v in _logical_table(state["bias"]).items()}
    by_suffix = {k[1:]: v for k, v in table.items() if k[0] == "params"}

    def leaf_sharding(path, leaf):
        names, shape = _names(path), tuple(leaf.shape)
        if names in table:
            spec = logical_to_spec(table[names], shape, mesh)
            if mode == "fsdp" and names[0] == "params":
                spec = _zero_spec(shape, spec, mesh)
            return NamedSharding(mesh, spec)
        if names and names[0] == "opt":
            for start in range(1, len(names)):
                logical = by_suffix.get(names[start:])
                if logical is not None and len(logical) == len(shape):
                    return NamedSharding(mesh, _zero_spec(shape, logical_to_spec(logical, shape, mesh), mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, state)


def batch_spec(ndim: int, batch_dim: int = 0) -> P:
    """PartitionSpec of an array whose dimension `batch_dim` is the batch (split over dp x ep)."""
    return P(*[RULES["batch"] if i == batch_dim else None for i in range(ndim)])


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation by logical axis names, under the mesh set by jax.set_mesh; a no-op
    without one (single device, inference)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))


def embedding_lookup(table_VD, tokens_BT):
    """table[tokens] [..., B, T, D] under the mesh set by jax.set_mesh (plain jnp.take without one), each data-parallel
    rank looking up its own sequences (a shard_map over the mesh axes of 'batch'), so that the table's gradient is
    each rank's scatter-add of its own tokens, summed over the ranks. Left to the partitioner, the lookup's
    scatter-add gathered the whole batch's gradient [B, T, D] to every device (15 GB per device in float32 at
    DeepSeek-V3's 128 sequences x 4096 tokens per pipeline micro-batch)."""
    mesh = jax.sharding.get_abstract_mesh()
    lead = (None,) * (tokens_BT.ndim - 2)
    spec = P() if mesh.empty else logical_to_spec(lead + ("batch", None), tokens_BT.shape, mesh)
    axes = [a for names in spec if names for a in ((names,) if isinstance(names, str) else names)]
    if not axes:
        return jnp.take(table_VD, tokens_BT, axis=0)
    return jax.shard_map(lambda t, i: jnp.take(t, i, axis=0), mesh=mesh, axis_names=set(axes),
                         in_specs=(P(), spec), out_specs=spec)(table_VD, tokens_BT)
