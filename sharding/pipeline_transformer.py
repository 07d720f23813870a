"""The DeepSeek-V3 transformer as a `PipelineModel` for the pipeline executor (sharding/pipeline_exec.py; paper
§3.2.1): embedding and the dense layers on the first stage, the MoE layers cut into stages by a StageLayout
(sharding/stage_layout.py; uneven stages have padding slots, skipped), the head, the MTP modules and the losses on
the last; the train state's pipeline layout (the MoE stack stored [ranks, stages per rank, slots, ...], sharded over
'pp') and the split of a parameter tree into stage and edge parameters and the merge of their gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.losses import cross_entropy, mtp_loss, target_weights
from dsv3_jax.model.params import ExpertBias, checkpointed, scan_layers
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.model.transformer import causal_mask, segment_mask, segment_positions
from dsv3_jax.train.step import Batch, as_batch
from sharding.pipeline import Schedule
from sharding.pipeline_exec import PipelineModel, pipeline_value_and_grad, stage_homes
from sharding.stage_layout import (StageLayout, balanced_layout, check_layout, from_pipeline, parse_stage_layers,
                                   tree_from_pipeline, tree_to_pipeline, valid_pipeline)


def _is_moe_path(path) -> bool:
    return getattr(path[0], "key", None) == "moe_layers"


def pipeline_layout(cfg, schedule: Schedule, stage_layers: str | None = None,
                    seq_len: int = 4096) -> tuple[StageLayout, np.ndarray]:
    """(StageLayout, homes [ranks, stages per rank]) for `schedule`: `stage_layers` ('N0,N1,...' layers per stage,
    the first counting the dense layers) or the cost-balanced default; ValueError for what cannot be laid out."""
    if stage_layers is not None:
        layout = parse_stage_layers(stage_layers, cfg, schedule.num_stages)
    else:
        layout = balanced_layout(cfg, schedule.num_stages, seq_len)
    return layout, stage_homes(schedule)


def transformer_pipeline(graphdef, params, bias, num_stages: int, balance_alpha: float = 1e-4,
                         remat: str = "none") -> PipelineModel:
    """PipelineModel of train/step.py's loss (CE + lambda MTP + alpha Bal) for split_model's (graphdef, params,
    bias) (model tree or pipeline layout), cut into `num_stages` stages.

    A stage runs its slots of MoE layers (stage params {"params", "bias", "valid"}: a slot whose valid entry is 0 is
    padding, skipped by a lax.cond: no compute, zero counts and balance term); the first stage's edge runs the
    embedding and the dense layers, the last stage's edge the final norm, head and the MTP modules. Inputs per
    micro-batch are (train.step.Batch [B, T+1], mtp_weight float32): with loss masks and segment ids, every stage
    builds the same segment attention mask and restarted positions as Transformer.forward, and the head the same
    masked losses as the training step.
    """
    del num_stages  # any number of stages: the layout decides
    model = nnx.merge(graphdef, params, bias)
    cfg = model.config
    if cfg.num_moe_layers == 0:
        raise ValueError("the pipeline cuts the MoE stack into stages, and the model has no MoE layer")
    moe_graphdef = nnx.split(model.moe_layers, nnx.Param, ExpertBias)[0]
    return _transformer_pipeline(graphdef, moe_graphdef, cfg, balance_alpha, remat)


@functools.lru_cache(maxsize=16)
def _transformer_pipeline(graphdef, moe_graphdef, cfg, balance_alpha: float, remat: str) -> PipelineModel:

    def rope(batch: Batch):
        """cos, sin and the attention mask of the micro-batch's inputs (Transformer.forward's)."""
        b, t = batch.tokens.shape[0], batch.tokens.shape[1] - 1
        if batch.segment_ids is None:
            cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), cfg)
            return cos, sin, causal_mask(t)
        seg = batch.segment_ids[:, :-1]
        cos, sin = rope_cos_sin(segment_positions(seg), cfg)
        return cos, sin, segment_mask(seg)

    def body(layer, h, cos, sin, mask):
        return layer(h, cos, sin, mask)[:2]

    def edge_model(edge):
        return nnx.merge(graphdef, edge["params"], jax.lax.stop_gradient(edge["bias"]))

    def embed(edge, inp):
        batch, _ = inp
        tm = edge_model(edge)
        tokens = batch.tokens[:, :-1]
        cos, sin, mask = rope(batch)
        h, _ = scan_layers(tm.dense_layers, lambda layer, h: body(layer, h, cos, sin, mask), tm.embed_tokens(tokens),
                           remat=remat)
        return h

    def stage(sp, h, inp):
        cos, sin, mask = rope(inp[0])
        bias = jax.lax.stop_gradient(sp["bias"])

        def layer_fn(h, p_l, b_l):
            return body(nnx.merge(moe_graphdef, p_l, b_l), h, cos, sin, mask)

        if remat != "none":
            layer_fn = checkpointed(layer_fn, remat)
        one = lambda t: jax.tree.map(lambda a: a[0], t)  # noqa: E731
        aux_shape = jax.eval_shape(layer_fn, h, one(sp["params"]), one(bias))[1]

        def slot(h, xs):  # a padding slot (valid 0) is skipped: no compute, zero counts and balance term
            p_l, b_l, ok = xs
            return jax.lax.cond(ok > 0, lambda: layer_fn(h, p_l, b_l),
                                lambda: (h, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)))

        h, aux = jax.lax.scan(slot, h, (sp["params"], bias, jax.lax.stop_gradient(sp["valid"])))
        bal = balance_alpha * jnp.sum(aux.balance)
        return h, bal, {"counts": aux.counts_E, "bal": bal}

    def head(edge, h, inp):
        batch, mtp_weight = inp
        window, seg = batch.tokens, batch.segment_ids
        tm = edge_model(edge)
        tokens = window[:, :-1]
        hidden = tm.norm(h)
        ce = cross_entropy(tm.output_head(hidden), window[:, 1:], target_weights(window.shape, 1, batch.loss_mask, seg))
        zero = jnp.zeros((), jnp.float32)
        aux = {"counts": jnp.zeros((0,), jnp.int32), "ce": ce, "mtp": zero, "bal": zero}  # the loss's parts
        if tm.mtp is not None:
            cos, sin, mask = rope(batch)
            mtp_logits, mtp_counts, mtp_balance, _ = tm.mtp_forward(hidden, tokens, cos, sin, mask, remat,
                                                                     None if seg is None else seg[:, :-1])
            aux["mtp"] = mtp_loss(mtp_logits, window, loss_mask_BS=batch.loss_mask, segment_ids_BS=seg)
            aux["bal"] = balance_alpha * mtp_balance
            aux["counts"] = aux["counts"] if mtp_counts is None else mtp_counts
        return ce + mtp_weight * aux["mtp"] + aux["bal"], aux

    return PipelineModel(embed, stage, head)


def split_pipeline(params, bias, layout: StageLayout, homes):
    """(stage_params, edge_params) of a pipeline-layout (params, bias) (moe_layers leaves [ranks, homes, slots,
    ...]) for the executor's stored layout: stage {"params", "bias", "valid" [ranks, homes, slots]}."""
    stage = {"params": params["moe_layers"], "bias": bias["moe_layers"] if "moe_layers" in bias else {},
             "valid": jnp.asarray(valid_pipeline(layout, homes))}

    def empty(path, a):
        return jnp.zeros((0,) + a.shape[3:], a.dtype) if _is_moe_path(path) else a

    edge = {"params": jax.tree_util.tree_map_with_path(empty, params),
            "bias": jax.tree_util.tree_map_with_path(empty, bias)}
    return stage, edge


def merge_pipeline_grads(stage_grads, edge_grads):
    """Gradients shaped like the pipeline-layout params from the executor's (stored stage, edge) gradients."""
    moe = iter(jax.tree.leaves(stage_grads["params"]))
    return jax.tree_util.tree_map_with_path(lambda path, g: next(moe) if _is_moe_path(path) else g,
                                            edge_grads["params"])


def pipeline_state(params, bias, optimizer, layout: StageLayout, homes):
    """The train state (train.step.init_state's) with the MoE stack in the pipeline layout, from model-tree
    params and bias: runs under jax.eval_shape for abstract arrays (shardings: sharding.rules.
    train_state_shardings of the result, which puts the stored stage axis on 'pp' and ZeRO-1 on the moments)."""
    from dsv3_jax.train.step import init_state

    return init_state(tree_to_pipeline(params, layout, homes), tree_to_pipeline(bias, layout, homes), optimizer)


def pipeline_state_shardings(params, bias, optimizer, layout: StageLayout, homes, mesh, zero: str = "zero1"):
    """(abstract pipeline-layout train state, its NamedShardings): pipeline_state of `params`, `bias` (arrays or
    ShapeDtypeStructs; nothing is allocated) as jax.ShapeDtypeStructs carrying their shardings (the stored stage
    axis on 'pp', experts on 'ep', ZeRO-1 moments over the data axes), ready for `jit(...).lower(...)` of the train
    step (train.step.make_train_step(..., schedule, layout=layout)."lower")."""
    from sharding.rules import train_state_shardings

    abstract = jax.eval_shape(lambda p, b: pipeline_state(p, b, optimizer, layout, homes), params, bias)
    shardings = train_state_shardings(abstract, mesh, zero)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        shardings), shardings


def pipeline_layout_terms(graphdef, params, bias, windows_MBS, schedule: Schedule, mesh, layout: StageLayout, *,
                          mtp_weight=0.3, balance_alpha: float = 1e-4, remat: str = "none", axis: str = "pp",
                          pad_to: tuple[int, int, int] | None = None):
    """(loss, grads, (ce, mtp, bal), counts [ranks, homes, slots, E], mtp_counts [D, E]) for pipeline-layout
    params and bias (tree_to_pipeline's; moe_layers sharded over `axis`): grads in the same layout, stage
    gradients and counts never leaving their ranks (padding slots: zero gradient, zero counts)."""
    homes = stage_homes(schedule)
    stage, edge = split_pipeline(params, bias, layout, homes)
    check_layout(layout, nnx.merge(graphdef, edge["params"], edge["bias"]).config, schedule.num_stages)
    model = transformer_pipeline(graphdef, edge["params"], edge["bias"], schedule.num_stages, balance_alpha, remat)
    batch = as_batch(windows_MBS)
    m = batch.tokens.shape[0]
    weights = jnp.full((m,), mtp_weight, jnp.float32)
    loss, (gs, ge), (stage_aux, head_aux) = pipeline_value_and_grad(
        model, schedule, mesh, stage, edge, (batch, weights), axis=axis, pad_to=pad_to, stored=True)
    parts = (head_aux["ce"] / m, head_aux["mtp"] / m, (jnp.sum(stage_aux["bal"]) + head_aux["bal"]) / m)
    return loss, merge_pipeline_grads(gs, ge), parts, stage_aux["counts"], head_aux["counts"]


def _edges_only(tree):
    def empty(path, a):
        return jnp.zeros((0,) + a.shape[1:], a.dtype) if _is_moe_path(path) else a
    return jax.tree_util.tree_map_with_path(empty, tree)
def pipeline_train_loss_and_grads(graphdef, params, bias, windows_MBS, schedule: Schedule, mesh, *,
                                  mtp_weight: float = 0.3, balance_alpha: float = 1e-4, remat: str = "none",
                                  axis: str = "pp", pad_to: tuple[int, int, int] | None = None):
    """(loss, grads like params, expert_counts [L_moe, E], mtp_expert_counts [D, E]) of train/step.py's loss
    averaged over the M micro-batches of windows_MBS [M, B, T+1] (int tokens, or a train.step.Batch whose fields
    are [M, B, T+1]), computed by `schedule` over mesh axis `axis`
    (the pipelined form of step.py's micro-batch scan; counts summed over micro-batches, for the bias update)."""
    loss, grads, _, counts, mtp_counts = pipeline_train_terms(
        graphdef, params, bias, windows_MBS, schedule, mesh, mtp_weight=mtp_weight, balance_alpha=balance_alpha,
        remat=remat, axis=axis, pad_to=pad_to)
    return loss, grads, counts, mtp_counts


def pipeline_train_terms(graphdef, params, bias, windows_MBS, schedule: Schedule, mesh, *, mtp_weight=0.3,
                         balance_alpha: float = 1e-4, remat: str = "none", axis: str = "pp",
                         pad_to: tuple[int, int, int] | None = None, layout: StageLayout | None = None):
    """pipeline_train_loss_and_grads's (loss, grads, counts, mtp_counts) with the loss's parts (ce, mtp, bal)
    (micro-batch means; loss = ce + mtp_weight * mtp + bal) after the grads, for the training step's metrics.
    Model-tree params (converted to the pipeline layout `layout`, default the balanced one, and back).

    Under a mesh with dp or ep > 1 the executor is manual over `axis` only: each stage's computation still
    splits the micro-batch over (dp, ep) (GSPMD) and runs the expert-parallel MoE (its shard_map nests inside).
    """
    if layout is None:
        layout = balanced_layout(nnx.merge(graphdef, _edges_only(params), _edges_only(bias)).config,
                                 schedule.num_stages)
    homes = stage_homes(schedule)
    loss, grads, parts, counts, mtp_counts = pipeline_layout_terms(
        graphdef, tree_to_pipeline(params, layout, homes), tree_to_pipeline(bias, layout, homes), windows_MBS,
        schedule, mesh, layout, mtp_weight=mtp_weight, balance_alpha=balance_alpha, remat=remat, axis=axis,
        pad_to=pad_to)
    return (loss, tree_from_pipeline(grads, layout, homes), parts, from_pipeline(counts, layout, homes),
            mtp_counts)
