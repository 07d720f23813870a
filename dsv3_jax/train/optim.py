"""AdamW with bfloat16 moments (paper §3.3.3) and the pre-training schedules of §4.2 (reference §7).

Optimizer: AdamW(β1 0.9, β2 0.95, weight decay 0.1) after clipping by global norm 1.0. Master weights and
gradients stay float32; both Adam moments are *stored* in bfloat16, as in the paper. optax.scale_by_adam's
`mu_dtype` only covers the first moment, hence `adamw_bf16_moments`.

Schedules (each `step -> value`, jnp ops, usable under jit and in Python), scaled to a run of `total_steps`:
the paper's token breakpoints become fractions of the paper's step count. That count is estimated as

    ramp:  469B tokens at a mean batch of (3072 + 15360) / 2 sequences x 4096 tokens  = 12,424 steps
    rest:  (14.8T - 469B) tokens at 15360 x 4096 tokens per step                       = 227,785 steps
    total: PAPER_STEPS = 240,209 steps

so the breakpoints account for the batch ramp: after it, tokens grow linearly with steps (at the final batch
size); the ramp (linear in steps from batch/5 to batch) takes the first 5.17% of the steps and 469/14800 of the
tokens. The warmup is 2000 of the paper's steps, i.e. 2000 / 240,209 = 0.83% of the run, at least 1 step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

# -- paper §4.2 numbers --------------------------------------------------------------------------------------------
PAPER_TOKENS = 14.8e12
PAPER_SEQ_LEN = 4096
PAPER_BATCH_START = 3072  # sequences per step at the start of the batch-size ramp
PAPER_BATCH = 15360  # sequences per step after the ramp
PAPER_BATCH_RAMP_TOKENS = 469e9
PAPER_WARMUP_STEPS = 2000
PAPER_PEAK_LR = 2.2e-4
PAPER_CONSTANT_LR_TOKENS = 10.0e12  # constant peak LR until here
PAPER_COSINE_END_TOKENS = 14.3e12  # cosine decay to PAPER_DECAYED_LR over the 4.3T before here
PAPER_DECAYED_LR = 2.2e-5  # for the next 333B tokens
PAPER_DECAYED_LR_END_TOKENS = 14.633e12
PAPER_FINAL_LR = 7.3e-6  # for the last 167B tokens
PAPER_MTP_WEIGHT = 0.3  # lambda for the first 10T tokens
PAPER_MTP_WEIGHT_LATE = 0.1  # lambda for the remaining 4.8T
PAPER_MTP_SWITCH_TOKENS = 10.0e12
PAPER_BIAS_UPDATE_SPEED = 0.001  # gamma for the first 14.3T tokens, then 0
PAPER_BIAS_FREEZE_TOKENS = 14.3e12

# -- derived: the paper's step count and the breakpoints as fractions of it ---------------------------------------
_PAPER_TOKENS_PER_STEP = PAPER_BATCH * PAPER_SEQ_LEN
_PAPER_RAMP_STEPS = PAPER_BATCH_RAMP_TOKENS / ((PAPER_BATCH_START + PAPER_BATCH) / 2 * PAPER_SEQ_LEN)
_PAPER_STEPS_EXACT = _PAPER_RAMP_STEPS + (PAPER_TOKENS - PAPER_BATCH_RAMP_TOKENS) / _PAPER_TOKENS_PER_STEP
PAPER_STEPS = round(_PAPER_STEPS_EXACT)  # 240,209


def paper_step_fraction(tokens: float) -> float:
    """The fraction of the paper's run (in steps) at which `tokens` tokens have been seen (tokens >= the ramp)."""
    if tokens < PAPER_BATCH_RAMP_TOKENS:
        raise ValueError(f"tokens={tokens:g} is inside the batch-size ramp (< {PAPER_BATCH_RAMP_TOKENS:g})")
    return (_PAPER_RAMP_STEPS + (tokens - PAPER_BATCH_RAMP_TOKENS) / _PAPER_TOKENS_PER_STEP) / _PAPER_STEPS_EXACT


WARMUP_FRACTION = PAPER_WARMUP_STEPS / _PAPER_STEPS_EXACT
BATCH_RAMP_FRACTION = _PAPER_RAMP_STEPS / _PAPER_STEPS_EXACT
CONSTANT_LR_FRACTION = paper_step_fraction(PAPER_CONSTANT_LR_TOKENS)
COSINE_END_FRACTION = paper_step_fraction(PAPER_COSINE_END_TOKENS)
DECAYED_LR_END_FRACTION = paper_step_fraction(PAPER_DECAYED_LR_END_TOKENS)
MTP_SWITCH_FRACTION = paper_step_fraction(PAPER_MTP_SWITCH_TOKENS)
BIAS_FREEZE_FRACTION = paper_step_fraction(PAPER_BIAS_FREEZE_TOKENS)

Schedule = Callable[[Any], jax.Array]


def _check_total(total_steps: int) -> None:
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")


def _step(step) -> jax.Array:
    return jnp.asarray(step, jnp.float32)


def warmup_steps(total_steps: int) -> int:
    """Linear-warmup length for a run of `total_steps`: 2000 of the paper's steps, scaled, at least 1."""
    _check_total(total_steps)
    return max(1, round(WARMUP_FRACTION * total_steps))


def lr_schedule(peak_lr: float, total_steps: int) -> Schedule:
    """Paper §4.2 LR: linear warmup from 0, constant, cosine to 0.1x peak, 0.1x peak, then 7.3e-6/2.2e-4 x peak."""
    _check_total(total_steps)
    if peak_lr < 0:
        raise ValueError(f"peak_lr must be >= 0, got {peak_lr}")
    warm = warmup_steps(total_steps)
    decayed = peak_lr * PAPER_DECAYED_LR / PAPER_PEAK_LR
    final = peak_lr * PAPER_FINAL_LR / PAPER_PEAK_LR
    cos_start, cos_end = CONSTANT_LR_FRACTION * total_steps, COSINE_END_FRACTION * total_steps
    decayed_end = DECAYED_LR_END_FRACTION * total_steps

    def schedule(step):
        s = _step(step)
        p = jnp.clip((s - cos_start) / (cos_end - cos_start), 0.0, 1.0)
        cosine = decayed + 0.5 * (peak_lr - decayed) * (1.0 + jnp.cos(jnp.pi * p))
        tail = jnp.where(s < decayed_end, decayed, final)
        lr = jnp.where(s < cos_start, peak_lr, jnp.where(s < cos_end, cosine, tail))
        return jnp.minimum(s / warm, 1.0) * lr

    return schedule


def batch_size_schedule(final_batch: int, total_steps: int) -> Schedule:
    """Sequences per step: linear in steps from final_batch * 3072/15360 to final_batch over the ramp (the first
    469B/14.8T of the tokens), rounded to whole sequences and at least 1; then final_batch. Returns int32."""
    _check_total(total_steps)
    if int(final_batch) != final_batch or final_batch < 1:
        raise ValueError(f"final_batch must be a positive integer, got {final_batch!r}")
    start = final_batch * PAPER_BATCH_START / PAPER_BATCH
    ramp = BATCH_RAMP_FRACTION * total_steps

    def schedule(step):
        s = _step(step)
        b = jnp.round(start + (final_batch - start) * jnp.minimum(s / ramp, 1.0))
        return jnp.clip(b, 1, final_batch).astype(jnp.int32)

    return schedule


def mtp_weight_schedule(total_steps: int) -> Schedule:
    """MTP loss weight lambda: 0.3 for the first 10T/14.8T of the tokens, then 0.1."""
    _check_total(total_steps)
    switch = MTP_SWITCH_FRACTION * total_steps
    return lambda step: jnp.where(_step(step) < switch, PAPER_MTP_WEIGHT, PAPER_MTP_WEIGHT_LATE).astype(jnp.float32)


def bias_update_speed_schedule(total_steps: int) -> Schedule:
    """Expert-bias update speed gamma: 0.001 for the first 14.3T/14.8T of the tokens, then 0."""
    _check_total(total_steps)
    freeze = BIAS_FREEZE_FRACTION * total_steps
    return lambda step: jnp.where(_step(step) < freeze, PAPER_BIAS_UPDATE_SPEED, 0.0).astype(jnp.float32)


def cosine_lr_schedule(peak_lr: float, min_lr: float, total_steps: int, warmup: int = 0) -> Schedule:
    """SFT LR (paper §5.1: cosine from 5e-6 to 1e-6): `warmup` linear steps to peak_lr, then a cosine to min_lr
    reached at the last step (step total_steps - 1)."""
    _check_total(total_steps)
    if not 0 <= min_lr <= peak_lr:
        raise ValueError(f"need 0 <= min_lr <= peak_lr, got min_lr {min_lr}, peak_lr {peak_lr}")
    if int(warmup) != warmup or not 0 <= warmup < total_steps:
        raise ValueError(f"warmup must be an integer in [0, total_steps {total_steps}), got {warmup!r}")
    span = max(total_steps - 1 - warmup, 1)

    def schedule(step):
        s = _step(step)
        p = jnp.clip((s - warmup) / span, 0.0, 1.0)
        cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * p))
        return jnp.where(s < warmup, peak_lr * (s + 1) / (warmup + 1), cosine)

    return schedule


def constant_schedule(value: float) -> Schedule:
    """`step -> value` as float32 (the context-extension LR of paper §4.3, fixed MTP weight or bias speed)."""
    return lambda step: jnp.full(jnp.shape(step), value, jnp.float32)


# -- optimizer ------------------------------------------------------------------------------------------------------
class AdamBF16State(NamedTuple):
    count: jax.Array  # int32 steps taken
    mu: optax.Updates  # first moment, moment_dtype
    nu: optax.Updates  # second moment, moment_dtype


def _path_names(path) -> list[str]:
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        else:
            names.append(str(k))
    return names


def decay_mask(params) -> Any:
    """True where AdamW decays the weight: every weight matrix, the embedding and the output head included.

    Exempt: every RMSNorm scale (a path component ending in "norm": `attn_norm/weight`, `norm/weight`,
    `enorm`, `q_norm`, `kv_norm`, HF's `*_layernorm`, ...; stacked layers make these 2-D, so the name decides),
    anything named `bias`, and every leaf with fewer than 2 dimensions. The paper gives weight decay 0.1 with no
    exemptions; exempting norm scales and biases is the common practice (Megatron-LM, which decays the
    embedding and head like any matrix), so we follow it and decay the embedding and head. The expert bias is an
    `ExpertBias` Variable, not an nnx.Param, so it never reaches the optimizer. Returns `params`' structure.
    """

    def decays(path, leaf) -> bool:
        names = [n.lower() for n in _path_names(path) if n != "value"]
        if any(n.endswith("norm") or n == "bias" for n in names):
            return False
        return len(getattr(leaf, "shape", ())) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def _mask_leaves(mask, params, n: int) -> list[bool]:
    if mask is None:
        return [True] * n
    leaves = jax.tree.leaves(mask(params) if callable(mask) else mask)
    if len(leaves) != n:
        raise ValueError(f"weight-decay mask has {len(leaves)} leaves, the parameters have {n}")
    return [bool(m) for m in leaves]


def adamw_bf16_moments(learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                       weight_decay: float = 0.1, mask=None,
                       moment_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """AdamW whose first and second moments are stored in `moment_dtype` (paper §3.3.3); float32 math and update.

    Each step reads the stored moments, computes the new ones and their bias corrections in float32, forms the
    update from those float32 values and stores the moments rounded to `moment_dtype`. Decoupled weight decay
    `lr * weight_decay * param` applies where `mask` (a pytree of bools or a callable params -> pytree) is True;
    mask=None decays everything. The LR (a float or a schedule) is read at the step count before this step.
    """
    if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
        raise ValueError(f"b1 and b2 must be in [0, 1), got b1={b1}, b2={b2}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, moment_dtype)
        return AdamBF16State(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                             nu=jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        if params is None and weight_decay:
            raise ValueError("adamw_bf16_moments needs `params` in update() to apply weight decay")
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        c1 = 1.0 - jnp.power(jnp.float32(b1), t)
        c2 = 1.0 - jnp.power(jnp.float32(b2), t)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)

        g_leaves, treedef = jax.tree.flatten(updates)
        mu_leaves, nu_leaves = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(g_leaves)
        decay = _mask_leaves(mask, params, len(g_leaves)) if weight_decay else [False] * len(g_leaves)

        new_u, new_mu, new_nu = [], [], []
        for g, mu, nu, p, d in zip(g_leaves, mu_leaves, nu_leaves, p_leaves, decay):
            g32 = g.astype(jnp.float32)
            mu32 = b1 * mu.astype(jnp.float32) + (1.0 - b1) * g32
            nu32 = b2 * nu.astype(jnp.float32) + (1.0 - b2) * (g32 * g32)
            step = (mu32 / c1) / (jnp.sqrt(nu32 / c2) + eps)
            if d:
                step = step + weight_decay * p.astype(jnp.float32)
            new_u.append((-lr * step).astype(jnp.float32))
            new_mu.append(mu32.astype(moment_dtype))
            new_nu.append(nu32.astype(moment_dtype))
        unflat = lambda leaves: jax.tree.unflatten(treedef, leaves)
        return unflat(new_u), AdamBF16State(count=count, mu=unflat(new_mu), nu=unflat(new_nu))

    return optax.GradientTransformation(init, update)


def make_optimizer(params, peak_lr: float, total_steps: int, clip: float = 1.0, weight_decay: float = 0.1,
                   schedule: Schedule | None = None) -> optax.GradientTransformation:
    """The paper's optimizer: clip by global norm `clip`, then AdamW(0.9, 0.95) with bf16 moments on `schedule`
    (default: lr_schedule(peak_lr, total_steps))."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    lr = lr_schedule(peak_lr, total_steps) if schedule is None else schedule
    return optax.chain(
        optax.clip_by_global_norm(clip),
        adamw_bf16_moments(lr, weight_decay=weight_decay, mask=decay_mask(params)),
    )


def optimizer_state_bytes(params, moment_dtype=jnp.bfloat16) -> int:
    """Bytes of the AdamW state for `params` (arrays or ShapeDtypeStructs): two moments plus the int32 count."""
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return 2 * n * jnp.dtype(moment_dtype).itemsize + 4
