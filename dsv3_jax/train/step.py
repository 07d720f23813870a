"""One training step (paper §2.1.2, §2.2, §3.3, §4.2).

loss = CE + lambda * L_MTP + alpha * L_Bal, gradients accumulated in float32 over micro-batches (lax.scan), AdamW
(bf16 moments) applied once, then the auxiliary-loss-free bias update from the expert counts of the whole batch.
A non-finite loss or gradient, or a loss spike past `spike_factor` x its running mean, skips the update (params,
optimizer state and expert bias stay as they were) and reports it.

A step takes plain token windows or a `Batch` with per-token loss masks and segment ids (packed post-training
samples): the CE is then the loss-mask-weighted mean over the micro-batch's targets that lie in their input's
segment, and the MTP loss is masked the same way (losses.target_weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax.balance import max_violation, update_expert_bias
from dsv3_jax.losses import cross_entropy, distill_kl, mtp_loss, target_weights
from dsv3_jax.model.params import ExpertBias
from dsv3_jax.model.transformer import Transformer
from sharding.rules import batch_spec, constrain

TrainState = dict[str, Any]  # {"params", "bias", "opt", "loss_ema", "step"}: a pytree orbax saves as is


class Batch(NamedTuple):
    """Token windows with optional per-token loss weights and segment ids, all [..., S] (S = T + 1)."""

    tokens: jax.Array  # int32 [..., S]: inputs tokens[..., :-1], targets tokens[..., 1:]
    loss_mask: jax.Array | None = None  # [..., S] float32 or bool: weight of the prediction OF token j (j >= 1;
    #                                     column 0 unused); None = all ones
    segment_ids: jax.Array | None = None  # int32 [..., S]: equal id = same packed sample; attention only within a
    #                                       segment, positions restart at 0 at each segment start; id 0 = padding
    #                                       (never a loss target)


def as_batch(windows) -> Batch:
    """A Batch from a Batch or a plain int token-window array; ValueError when the fields' shapes differ."""
    batch = windows if isinstance(windows, Batch) else Batch(windows)
    shape = tuple(batch.tokens.shape)
    for name in ("loss_mask", "segment_ids"):
        a = getattr(batch, name)
        if a is not None and tuple(a.shape) != shape:
            raise ValueError(f"Batch.{name} has shape {tuple(a.shape)}, expected the tokens' shape {shape}")
    return batch


BALANCE_SCOPES = ("sequence", "batch")


def batch_loss_terms(model: Transformer, batch: Batch, mtp_weight, balance_alpha: float, remat: str = "none",
                     balance_scope: str = "sequence", unroll: bool = False):
    """(loss, (ce, mtp, bal), out) of one micro-batch Batch [M, S]: loss = ce + mtp_weight * mtp + bal, bal =
    alpha x the sequence-wise (eqs. 17-20) or batch-wise (§4.5.3, over the micro-batch's tokens) balance term."""
    tokens, seg = batch.tokens, batch.segment_ids
    out = model.forward(tokens[:, :-1], segment_ids_BT=None if seg is None else seg[:, :-1], remat=remat,
                        unroll=unroll)
    with jax.named_scope("loss"):
        ce = cross_entropy(out.logits, tokens[:, 1:], target_weights(tokens.shape, 1, batch.loss_mask, seg))
        mtp = (jnp.zeros((), jnp.float32) if out.mtp_logits is None
               else mtp_loss(out.mtp_logits, tokens, loss_mask_BS=batch.loss_mask, segment_ids_BS=seg))
    if balance_scope == "sequence":
        bal = balance_alpha * (out.balance + out.mtp_balance)
    elif balance_scope == "batch":
        bal = balance_alpha * (out.balance_batch + out.mtp_balance_batch)
    else:
        raise ValueError(f"balance scope must be one of {BALANCE_SCOPES}, got {balance_scope!r}")
    return ce + mtp_weight * mtp + bal, (ce, mtp, bal), out


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step computes besides the model: loss weights, recomputation and the spike guard."""

    balance_alpha: float = 1e-4  # paper §4.2: sequence-wise balance factor (0: no balance loss)
    balance_scope: str = "sequence"  # "sequence" (eqs. 17-20) or "batch" (§4.5.3: f, P over the micro-batch)
    remat: str = "none"  # "none" | "paper" | "full" (see model.params.remat_policy)
    unroll_layers: bool = False  # unroll the layer scans (params.scan_layers): faster on the CPU, longer compile
    spike_factor: float = 3.0  # a loss above spike_factor x running mean is a spike (0 disables)
    spike_warmup: int = 20  # steps before spikes are judged (the loss falls fast at first)
    ema_decay: float = 0.95  # running mean of the loss for the spike test


class StepMetrics(NamedTuple):
    loss: jax.Array
    ce: jax.Array
    mtp_loss: jax.Array
    balance_loss: jax.Array
    grad_norm: jax.Array
    max_vio: jax.Array  # MaxVio averaged over the main MoE layers (paper §4.5.2)
    skipped: jax.Array  # bool: the update was skipped
    nonfinite: jax.Array  # bool: because the loss or gradient was not finite
    distill_kl: jax.Array  # KL(teacher || student) on the trained tokens (0 without a DistillSpec)


class DistillSpec(NamedTuple):
    """Logit distillation (posttrain.sft --teacher): loss = (1 - weight) CE + weight tau^2 KL(teacher || student)
    on the CE's weighted targets, the teacher's logits from a frozen forward in the same step."""

    teacher_graphdef: Any
    weight: float
    temperature: float = 1.0


def split_model(model: Transformer):
    """(graphdef, params, bias): trainable nnx.Param state and the ExpertBias state, kept apart."""
    graphdef, params, bias, rest = nnx.split(model, nnx.Param, ExpertBias, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model has variables that are neither parameters nor expert bias: {rest}")
    return graphdef, params, bias


def init_state(params, bias, optimizer: optax.GradientTransformation) -> TrainState:
    return {"params": params, "bias": bias, "opt": optimizer.init(params),
            "loss_ema": jnp.zeros((), jnp.float32), "step": jnp.zeros((), jnp.int32)}


def _bias_update(bias, counts, mtp_counts, gamma):
    """Move each stacked ExpertBias by the sign rule with the counts of its own layers (a new pytree; the
    input is left untouched, so a skipped step can keep it)."""

    def update(path, b):
        c = counts if getattr(path[0], "key", None) == "moe_layers" else mtp_counts
        return update_expert_bias(b, c, gamma)

    return jax.tree_util.tree_map_with_path(update, bias)


def _pipeline_grad_fn(graphdef, sc: StepConfig, schedule, mesh, layout) -> Callable:
    """grad_fn's ((loss, aux), grads) for one micro-batch Batch [M, S], computed by the pipeline executor from
    pipeline-layout params and bias (sharding.pipeline_transformer.pipeline_state); grads and expert counts
    ([ranks, stages per rank, slots, E], zero in padding slots) in that layout."""
    from sharding.pipeline_transformer import pipeline_layout_terms

    n = schedule.microbatches

    def grad_fn(params, bias, batch_MS: Batch, mtp_weight):
        batch_NBS = jax.tree.map(lambda a: constrain(a.reshape((n, a.shape[0] // n) + a.shape[1:]),
                                                     (None, "batch", None)), batch_MS)
        loss, grads, (ce, mtp, bal), counts, mtp_counts = pipeline_layout_terms(
            graphdef, params, bias, batch_NBS, schedule, mesh, layout, mtp_weight=mtp_weight,
            balance_alpha=sc.balance_alpha, remat=sc.remat)
        return (loss, (ce, mtp, bal, counts, mtp_counts, jnp.zeros((), jnp.float32))), grads

    return grad_fn


def make_train_step(graphdef, optimizer: optax.GradientTransformation, sc: StepConfig, mesh=None,
                    state_shardings=None, schedule=None, distill: DistillSpec | None = None,
                    donate: bool = True, layout=None) -> Callable:
    """jit-compiled `step(state, windows_KMS, mtp_weight, gamma) -> (state, StepMetrics)`.

    windows_KMS: K micro-batches of M packed windows of S = T + 1 tokens (inputs and next-token targets), an int
    array [K, M, S] or a `Batch` whose fields are [K, M, S] (None fields: no mask; one compile per shape and set of
    fields present). The loss, CE and MTP terms of the K micro-batches are averaged (each micro-batch's masked CE
    is normalised by its own target count).
    The schedule values and the spike-guard settings enter as traced scalars, so changing them never recompiles.
    With a `mesh` (sharding/mesh.py) the step runs over it: the state in `state_shardings`
    (sharding.rules.train_state_shardings), the windows split over M on ('dp', 'ep'), GSPMD for data
    parallelism and the MoE's shard_map all-to-all for expert parallelism; expert counts are global sums.
    With a pipeline `schedule` (sharding.pipeline.make_schedule over the mesh's 'pp' ranks) each of the K
    micro-batches is split into schedule.microbatches pipeline micro-batches of M / microbatches windows, and its
    loss, gradients and expert counts come from the pipeline executor (same values); the update is the same.
    The state is then in the pipeline layout of `layout` (a sharding.stage_layout.StageLayout; the state from
    sharding.pipeline_transformer.pipeline_state): the MoE stack [ranks, stages per rank, slots, ...] sharded over
    'pp', its gradients and optimizer moments too; padding slots get zero gradients (they stay zero) and no counts.
    With `distill` the step takes `teacher=(params, bias)` of distill.teacher_graphdef (same vocabulary).
    With `donate` (the default) the state passed in is donated to the step, so XLA updates it in place and the
    old state's arrays are deleted: keep only the returned state (pass donate=False to step one state twice).
    """

    def loss_fn(params, bias, batch_MS: Batch, mtp_weight, teacher=None):
        batch_MS = jax.tree.map(lambda a: constrain(a, ("batch", None)), batch_MS)
        model = nnx.merge(graphdef, params, bias)
        loss, (ce, mtp, bal), out = batch_loss_terms(model, batch_MS, mtp_weight, sc.balance_alpha, sc.remat,
                                                     sc.balance_scope, sc.unroll_layers)
        kl = jnp.zeros((), jnp.float32)
        if distill is not None:
            loss, kl = _distill_terms(distill, teacher, batch_MS, out.logits, loss, ce)
        zeros = jnp.zeros((0,), jnp.int32)
        counts = zeros if out.expert_counts is None else out.expert_counts
        mtp_counts = zeros if out.mtp_expert_counts is None else out.mtp_expert_counts
        return loss, (ce, mtp, bal, counts, mtp_counts, kl)

    if sc.balance_scope not in BALANCE_SCOPES:
        raise ValueError(f"StepConfig.balance_scope must be one of {BALANCE_SCOPES}, got {sc.balance_scope!r}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if schedule is not None:
        if sc.balance_scope != "sequence":
            raise ValueError("make_train_step: the pipeline executor computes the sequence-wise balance term only "
                             "(--balance-scope batch is not implemented with --pipeline)")
        if distill is not None:
            raise ValueError("make_train_step: logit distillation does not run through the pipeline executor")
        if sc.unroll_layers:
            raise ValueError("make_train_step: unroll_layers applies to the layer scans of the one-program step; the "
                             "pipeline executor runs its stages' layers itself (drop --unroll-layers with --pipeline)")
        if mesh is None:
            raise ValueError("make_train_step: a pipeline schedule needs a mesh with a 'pp' axis")
        if layout is None:
            raise ValueError("make_train_step: a pipeline schedule needs the state's stage layout (layout=)")
        grad_fn = _pipeline_grad_fn(graphdef, sc, schedule, mesh, layout)
        from sharding.pipeline_exec import stage_homes
        from sharding.stage_layout import valid_pipeline

        valid_layers = valid_pipeline(layout, stage_homes(schedule))  # [ranks, homes, slots]: 0 for padding

    def step(state: TrainState, batch_KMS: Batch, mtp_weight, gamma, spike_factor, spike_warmup, teacher):
        params, bias = state["params"], state["bias"]
        extra = () if teacher is None else (teacher,)

        def micro(acc, window):
            (loss, aux), grads = grad_fn(params, bias, window, mtp_weight, *extra)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return jax.tree.map(jnp.add, acc, (loss, aux, grads)), None

        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if schedule is not None:  # the accumulated stage gradients stay with their pp rank (no gather of the stack)
            zero_grads = jax.lax.with_sharding_constraint(zero_grads, state_shardings["params"])
        first = jax.tree.map(lambda a: a[0], batch_KMS)
        _, aux_shape = jax.eval_shape(grad_fn, params, bias, first, mtp_weight, *extra)[0]
        zero_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
        init = (jnp.zeros((), jnp.float32), zero_aux, zero_grads)
        (loss, (ce, mtp, bal, counts, mtp_counts, kl), grads), _ = jax.lax.scan(micro, init, batch_KMS)
        k = batch_KMS.tokens.shape[0]
        loss, ce, mtp, bal, kl = loss / k, ce / k, mtp / k, bal / k, kl / k
        grads = jax.tree.map(lambda g: g / k, grads)
        grad_norm = optax.global_norm(grads)

        nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        ema = state["loss_ema"]
        judged = (state["step"] >= spike_warmup) & (spike_factor > 0)
        spike = judged & (loss > spike_factor * ema)
        skip = nonfinite | spike

        @jax.named_scope("optimizer")
        def update():
            updates, new_opt = optimizer.update(grads, state["opt"], params)
            new_bias = bias if counts.size == 0 else _bias_update(bias, counts, mtp_counts, gamma)
            new = (optax.apply_updates(params, updates), new_bias, new_opt)
            # a skipped update keeps the old state. A select, not a lax.cond: XLA fuses it into the update's own
            # elementwise pass, where a cond's branches cost another pass over the state (+45% optimizer time).
            return jax.tree.map(lambda old, n: jnp.where(skip, old, n), (params, bias, state["opt"]), new)

        new_params, new_bias, new_opt = update()
        new_ema = jnp.where(state["step"] == 0, loss, sc.ema_decay * ema + (1 - sc.ema_decay) * loss)
        new_state = {
            "params": new_params,
            "bias": new_bias,
            "opt": new_opt,
            "loss_ema": jnp.where(skip, ema, new_ema),
            "step": state["step"] + 1,
        }
        if counts.size == 0:
            max_vio = jnp.zeros((), jnp.float32)
        elif schedule is None:
            max_vio = jnp.mean(max_violation(counts))
        else:  # the mean over the MoE layers, padding slots left out
            max_vio = jnp.sum(max_violation(counts) * valid_layers) / np.sum(valid_layers)
        return new_state, StepMetrics(loss, ce, mtp, bal, grad_norm, max_vio, skip, nonfinite, kl)

    donated = (0,) if donate else ()
    if mesh is None:
        jitted = jax.jit(step, donate_argnums=donated)
        scalar = jnp
    else:
        if state_shardings is None:
            raise ValueError("make_train_step: a mesh needs state_shardings (sharding.rules.train_state_shardings)")
        rep = NamedSharding(mesh, PartitionSpec())
        windows = NamedSharding(mesh, batch_spec(3, batch_dim=1))
        jitted = jax.jit(step, in_shardings=(state_shardings, windows, rep, rep, rep, rep, rep),
                         out_shardings=(state_shardings, rep), donate_argnums=donated)
        scalar = np  # host values: every process passes the same, no process-local device arrays

    def arguments(state, windows_KMS, mtp_weight, gamma, teacher):
        if (teacher is None) != (distill is None):
            raise ValueError("make_train_step: pass teacher=(params, bias) exactly when the step has a DistillSpec")
        return (state, as_batch(windows_KMS), scalar.float32(mtp_weight), scalar.float32(gamma),
                scalar.float32(sc.spike_factor), scalar.int32(sc.spike_warmup), teacher)

    def call(state: TrainState, windows_KMS, mtp_weight, gamma, teacher=None):
        args = arguments(state, windows_KMS, mtp_weight, gamma, teacher)
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            return jitted(*args)

    def lower(state, windows_KMS, mtp_weight=0.3, gamma=0.001, teacher=None):
        """The step lowered for these arguments (arrays or jax.ShapeDtypeStruct; nothing runs):
        `.compile().memory_analysis()` gives XLA's per-device bytes."""
        args = arguments(state, windows_KMS, mtp_weight, gamma, teacher)
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            return jitted.lower(*args)

    call.lower = lower
    call.jitted, call.arguments = jitted, arguments  # the compiled function and its argument tuple (profiling)
    return call


def _distill_terms(distill: DistillSpec, teacher, batch: Batch, logits_MTV, loss, ce):
    """(loss with (1 - w) CE + w tau^2 KL in place of CE, KL): the teacher's logits by a frozen forward."""
    tokens, seg = batch.tokens, batch.segment_ids
    t_model = nnx.merge(distill.teacher_graphdef, *teacher)
    t_logits = jax.lax.stop_gradient(
        t_model.forward(tokens[:, :-1], segment_ids_BT=None if seg is None else seg[:, :-1]).logits)
    kl = distill_kl(logits_MTV, t_logits, target_weights(tokens.shape, 1, batch.loss_mask, seg),
                    distill.temperature)
    w = distill.weight
    return loss - w * ce + w * distill.temperature ** 2 * kl, kl
