"""The DeepSeek-V3 transformer as a `PipelineModel` for the pipeline executor (sharding/pipeline_exec.py; paper
§3.2.1): embedding and the dense layers on the first stage, the MoE layers split evenly over the stages, the head,
the MTP modules and the losses on the last; plus the split of the parameter tree into stage and edge parameters and
the merge of their gradients back into the model's tree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.losses import cross_entropy, mtp_loss, target_weights
from dsv3_jax.model.params import ExpertBias, scan_layers
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.model.transformer import causal_mask, segment_mask, segment_positions
from dsv3_jax.train.step import Batch, as_batch
from sharding.pipeline import Schedule
from sharding.pipeline_exec import PipelineModel, pipeline_value_and_grad


def _is_moe_path(path) -> bool:
    return getattr(path[0], "key", None) == "moe_layers"


def check_stage_split(cfg, num_stages: int) -> None:
    """ValueError unless the model's MoE layers split into `num_stages` equal pipeline stages."""
    if cfg.num_moe_layers == 0 or cfg.num_moe_layers % num_stages:
        raise ValueError(f"the {cfg.num_moe_layers} MoE layers do not split into {num_stages} equal pipeline stages "
                         f"(the {cfg.num_dense_layers} dense layers run with the embedding on the first stage)")


def transformer_pipeline(graphdef, params, bias, num_stages: int, balance_alpha: float = 1e-4,
                         remat: str = "none") -> PipelineModel:
    """PipelineModel of train/step.py's loss (CE + lambda MTP + alpha Bal) for split_model's (graphdef, params,
    bias), cut into `num_stages` stages.

    Stage s runs MoE layers [s L/S, (s+1) L/S); the first stage's edge runs the embedding and the dense layers,
    the last stage's edge the final norm, head and the MTP modules. Parameters enter as produced by
    `split_transformer`; inputs per micro-batch are (train.step.Batch [B, T+1], mtp_weight float32): with loss
    masks and segment ids, every stage builds the same segment attention mask and restarted positions as
    Transformer.forward, and the head the same masked losses as the training step.
    """
    model = nnx.merge(graphdef, params, bias)
    cfg = model.config
    check_stage_split(cfg, num_stages)
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
        layers = nnx.merge(moe_graphdef, sp["params"], jax.lax.stop_gradient(sp["bias"]))
        cos, sin, mask = rope(inp[0])
        h, aux = scan_layers(layers, lambda layer, h: body(layer, h, cos, sin, mask), h, remat=remat)
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


def split_transformer(params, bias, num_stages: int):
    """(stage_params [S, L_moe/S, ...], edge_params) from split_model's params and bias: the MoE stack cut into
    stages, everything else (MoE leaves emptied to 0 layers) as the edges."""
    def cut(a):
        return a.reshape((num_stages, a.shape[0] // num_stages) + a.shape[1:])

    stage = {"params": jax.tree.map(cut, params["moe_layers"]), "bias": jax.tree.map(cut, bias["moe_layers"])
             if "moe_layers" in bias else {}}
    empty = lambda path, a: a[:0] if _is_moe_path(path) else a  # noqa: E731
    edge = {"params": jax.tree_util.tree_map_with_path(empty, params),
            "bias": jax.tree_util.tree_map_with_path(empty, bias)}
    return stage, edge


def merge_transformer_grads(stage_grads, edge_grads):
    """Gradients shaped like split_model's params from the pipeline's (stage, edge) gradients."""
    moe = iter(jax.tree.leaves(stage_grads["params"]))

    def put(path, g):
        if _is_moe_path(path):
            s = next(moe)
            return s.reshape((-1,) + s.shape[2:])
        return g

    return jax.tree_util.tree_map_with_path(put, edge_grads["params"])


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
                         pad_to: tuple[int, int, int] | None = None):
    """pipeline_train_loss_and_grads's (loss, grads, counts, mtp_counts) with the loss's parts (ce, mtp, bal)
    (micro-batch means; loss = ce + mtp_weight * mtp + bal) after the grads, for the training step's metrics.

    Under a mesh with dp or ep > 1 the executor is manual over `axis` only: each stage's computation still
    splits the micro-batch over (dp, ep) (GSPMD) and runs the expert-parallel MoE (its shard_map nests inside).
    """
    model = transformer_pipeline(graphdef, params, bias, schedule.num_stages, balance_alpha, remat)
    stage, edge = split_transformer(params, bias, schedule.num_stages)
    batch = as_batch(windows_MBS)
    m = batch.tokens.shape[0]
    weights = jnp.full((m,), mtp_weight, jnp.float32)
    loss, (gs, ge), (stage_aux, head_aux) = pipeline_value_and_grad(
        model, schedule, mesh, stage, edge, (batch, weights), axis=axis, pad_to=pad_to)
    counts = stage_aux["counts"]
    parts = (head_aux["ce"] / m, head_aux["mtp"] / m, (jnp.sum(stage_aux["bal"]) + head_aux["bal"]) / m)
    return (loss, merge_transformer_grads(gs, ge), parts, counts.reshape((-1,) + counts.shape[2:]),
            head_aux["counts"])
