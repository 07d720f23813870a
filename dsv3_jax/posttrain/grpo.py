"""Group Relative Policy Optimization (paper §5.2.2, eqs. 26-28) with rule-based rewards: `dsv3 grpo`.

Per iteration: P prompts, G sampled completions each (the batched `generate`, temperature > 0, stopping at EOS);
rewards from the rule registry (posttrain.rewards); group-normalised advantages A_i = (r_i - mean_G r) /
(std_G r + eps); the log-probabilities of the sampled tokens under the sampling policy (old) and the frozen initial
model (reference), each from one jitted forward; then `updates_per_batch` AdamW steps on `grpo_loss` of the same
samples. The objective per token t of completion i is

    min(r_t A_i, clip(r_t, 1 - eps, 1 + eps) A_i) - beta * (exp(lr_t) - lr_t - 1),
    r_t = exp(logp_new - logp_old),  lr_t = logp_ref - logp_new       (the k3 estimate of KL(pi_theta || pi_ref))

averaged over each completion's tokens (DeepSeekMath's 1/|o_i|), then over the batch; the loss is its negative.
Log-probabilities are those of the model itself (temperature 1): the sampling temperature only widens exploration.
The expert bias stays frozen unless gamma > 0 (then the sign rule of balance.update_expert_bias with the expert
counts of the policy forward); the MTP modules are not trained unless mtp_weight > 0 (then mtp_weight x their
cross-entropy on completion tokens is added).

A work directory has the layout of `dsv3 train`'s (checkpoints/ with the flat train state and meta holding
model_config, run_args and tokenizer; metrics.jsonl; events.jsonl), so `load_model_and_tokenizer(workdir)` and
`dsv3 generate --checkpoint WORKDIR` load the trained policy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsv3_jax.balance import update_expert_bias
from dsv3_jax.inference.generate import generate
from dsv3_jax.losses import token_logprobs
from dsv3_jax.options import key_values
from dsv3_jax.posttrain.chat import chat_tokenizer, render_prompt
from dsv3_jax.posttrain.rewards import REWARDS, RewardFn, compute_rewards, parse_reward_weights
from dsv3_jax.posttrain.tasks import TASKS, load_problems, make_problems, problem_scorer, score, task_options
from dsv3_jax.precision import PRECISION_NAMES, Precision
from dsv3_jax.train.optim import adamw_bf16_moments, decay_mask
from dsv3_jax.train.step import init_state, split_model

ADVANTAGE_EPS = 1e-4  # in the advantages' denominator: a group with equal rewards gets 0, not NaN


# -- the objective (pure functions) ---------------------------------------------------------------------------------
class GRPOStats(NamedTuple):
    loss: jax.Array  # the scalar loss (negative objective)
    kl: jax.Array  # k3 KL estimate, per-sequence mean then batch mean
    clip_frac: jax.Array  # fraction of completion tokens whose clipped term is the smaller (no gradient through r)
    ratio_dev: jax.Array  # max |r - 1| over completion tokens


def grpo_terms(logp_new, logp_old, logp_ref, advantages, mask, clip_eps, kl_beta) -> GRPOStats:
    """grpo_loss with its diagnostics (see grpo_loss for the arguments)."""
    m_BT = jnp.asarray(mask) > 0
    logp_new = jnp.asarray(logp_new, jnp.float32)
    # masked positions may hold anything (padding): zeroed before exp so neither the value nor its gradient is NaN
    log_ratio_BT = jnp.where(m_BT, logp_new - jnp.asarray(logp_old, jnp.float32), 0.0)
    log_ref_BT = jnp.where(m_BT, jnp.asarray(logp_ref, jnp.float32) - logp_new, 0.0)
    ratio_BT = jnp.exp(log_ratio_BT)
    adv_B1 = jnp.asarray(advantages, jnp.float32)[:, None]
    unclipped_BT = ratio_BT * adv_B1
    clipped_BT = jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps) * adv_B1
    kl_BT = jnp.exp(log_ref_BT) - log_ref_BT - 1.0
    per_token_BT = jnp.minimum(unclipped_BT, clipped_BT) - kl_beta * kl_BT

    count_B = jnp.sum(m_BT, axis=-1).astype(jnp.float32)

    def seq_mean(x_BT):  # mean over each row's masked tokens (0 for an empty row), then over the batch
        return jnp.mean(jnp.sum(jnp.where(m_BT, x_BT, 0.0), axis=-1) / jnp.maximum(count_B, 1.0))

    tokens = jnp.maximum(jnp.sum(count_B), 1.0)
    clip_frac = jnp.sum(m_BT & (clipped_BT < unclipped_BT)) / tokens
    ratio_dev = jnp.max(jnp.where(m_BT, jnp.abs(ratio_BT - 1.0), 0.0))
    return GRPOStats(-seq_mean(per_token_BT), seq_mean(kl_BT), clip_frac, ratio_dev)


def grpo_loss(logp_new, logp_old, logp_ref, advantages, mask, clip_eps, kl_beta) -> jax.Array:
    """The GRPO loss to minimise (eqs. 26-28, per-token form): logp_* float32 [B, T] log-probs of the sampled
    tokens under the policy, the sampling policy and the reference; advantages [B]; mask [B, T] (1 on completion
    tokens). Mean over each row's masked tokens, then over the B rows (an empty row contributes 0)."""
    return grpo_terms(logp_new, logp_old, logp_ref, advantages, mask, clip_eps, kl_beta).loss


def group_advantages(rewards_PG, eps: float = ADVANTAGE_EPS) -> np.ndarray:
    """A = (r - mean) / (std + eps) within each group (row) of rewards [P, G] (population std); float32 [P, G]."""
    r = np.asarray(rewards_PG, np.float64)
    if r.ndim != 2 or r.shape[1] < 1:
        raise ValueError(f"group_advantages: rewards must be [P, G], got shape {r.shape}")
    centred = r - r.mean(axis=1, keepdims=True)
    return (centred / (r.std(axis=1, keepdims=True) + eps)).astype(np.float32)


def masked_mtp_loss(mtp_logits_DBTV, tokens_BS, mask_BS) -> jax.Array:
    """Mean over the D MTP modules of their cross-entropy on the masked target positions (module k at input
    position i predicts tokens_BS[:, i + 1 + k]); tokens_BS and mask_BS are the whole sequences (S = T + 1)."""
    d, _, t, _ = mtp_logits_DBTV.shape
    total = jnp.zeros((), jnp.float32)
    for k in range(1, d + 1):
        n = min(t, tokens_BS.shape[1] - 1 - k)
        if n <= 0:
            continue
        nll = -token_logprobs(mtp_logits_DBTV[k - 1, :, :n], tokens_BS[:, 1 + k:1 + k + n])
        m = mask_BS[:, 1 + k:1 + k + n].astype(jnp.float32)
        total = total + jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)
    return total / max(d, 1)


# -- run arguments --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GRPOArgs:
    """The arguments of one GRPO run (what `dsv3 grpo` parses); saved with every checkpoint."""

    init: str  # a `dsv3 train`/`dsv3 sft` work directory or a released-format checkpoint (policy and reference)
    workdir: str
    task: str = "builtin:addition"  # builtin:NAME (tasks.TASKS) or a JSONL file of {"prompt", "answer"}
    task_options: tuple[tuple[str, int], ...] = ()  # e.g. (("digits", 1),), passed to tasks.make_problems
    iterations: int = 100
    prompts_per_batch: int = 8
    group_size: int = 8
    updates_per_batch: int = 1  # mu: gradient steps on each batch of samples
    lr: float = 1e-5
    lr_schedule: str = "constant"  # "constant" | "cosine" (to 0.1 x lr over the run's updates)
    weight_decay: float = 0.0
    clip_eps: float = 0.2
    kl_beta: float = 0.04
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    rewards: tuple[str, ...] = ()  # NAME=WEIGHT (rewards.REWARDS); empty: rewards.DEFAULT_WEIGHTS
    gamma: float = 0.0  # expert-bias update speed; 0 keeps the bias frozen
    mtp_weight: float = 0.0  # weight of the MTP loss on completion tokens; 0 leaves the MTP modules untouched
    system: str | None = None  # optional system message of every prompt
    seed: int = 0
    save_every: int = 50
    keep: int = 3
    resume: bool = False
    stop_at: int | None = None  # stop after this iteration with a checkpoint, as an interruption would
    progress: bool = True


LR_SCHEDULES = ("constant", "cosine")


def validate_args(args: GRPOArgs, rules: Mapping[str, RewardFn] = REWARDS) -> None:
    """ValueError naming the first bad flag (FileNotFoundError for a missing --task file)."""
    for name in ("iterations", "prompts_per_batch", "group_size", "updates_per_batch", "max_new_tokens",
                 "save_every", "keep"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if args.group_size < 2:
        raise ValueError(f"--group-size must be >= 2 (advantages compare the completions of a group), got "
                         f"{args.group_size}")
    if not (isinstance(args.lr, (int, float)) and math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr!r}")
    if args.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {args.lr_schedule!r}")
    if not args.weight_decay >= 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 < args.clip_eps < 1:
        raise ValueError(f"--clip-eps must be in (0, 1), got {args.clip_eps}")
    if not args.kl_beta >= 0:
        raise ValueError(f"--kl-beta must be >= 0, got {args.kl_beta}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0 (GRPO samples a group per prompt; 0 would make them all "
                         f"equal), got {args.temperature}")
    if args.top_k is not None and args.top_k <= 0:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.gamma >= 0:
        raise ValueError(f"--gamma must be >= 0, got {args.gamma}")
    if not args.mtp_weight >= 0:
        raise ValueError(f"--mtp-weight must be >= 0, got {args.mtp_weight}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.stop_at is not None and not 0 < args.stop_at <= args.iterations:
        raise ValueError(f"--stop-at {args.stop_at} must be in [1, --iterations {args.iterations}]")
    parse_reward_weights(args.rewards, rules)
    parse_task(args.task, dict(args.task_options))


def parse_task(spec: str, options: Mapping[str, int]) -> tuple[str | None, str | None]:
    """(built-in task name, None) for builtin:NAME, (None, path) for a JSONL file; ValueError/FileNotFoundError."""
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        if name not in TASKS:
            raise ValueError(f"--task {spec!r}: unknown built-in task {name!r}; expected builtin:"
                             f"{'|'.join(TASKS)} or a JSONL file")
        task_options(name, **options)
        return name, None
    if options:
        raise ValueError(f"--task-option applies to builtin:{'|'.join(TASKS)} tasks, not to the file {spec!r}")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--task {spec!r}: no such JSONL file (or use builtin:{'|'.join(TASKS)})")
    return None, spec


def lr_schedule(args: GRPOArgs, total_updates: int):
    """step -> learning rate: constant, or cosine from lr to 0.1 x lr over `total_updates`."""
    if args.lr_schedule == "constant":
        return lambda step: jnp.asarray(args.lr, jnp.float32)

    def cosine(step):
        p = jnp.clip(jnp.asarray(step, jnp.float32) / total_updates, 0.0, 1.0)
        return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * p)))

    return cosine


def grpo_optimizer(params, args: GRPOArgs, total_updates: int) -> optax.GradientTransformation:
    """Clip by global norm 1.0, then AdamW(0.9, 0.95) with bf16 moments: train.optim.make_optimizer's layout
    (so `dsv3 train`'s loaders restore it) with the GRPO learning rate and weight decay."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       adamw_bf16_moments(lr_schedule(args, total_updates), weight_decay=args.weight_decay,
                                          mask=decay_mask(params)))


# -- the trainer ----------------------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    seq_BS: np.ndarray  # int32 prompt + completion, right-padded
    mask_BS: np.ndarray  # float32 1 on completion tokens (first generated through EOS inclusive)
    rewards_B: np.ndarray  # float32 total reward
    advantages_B: np.ndarray  # float32
    parts: dict[str, np.ndarray]  # unweighted value of each reward rule, and "accuracy" (the task's score)
    completions: list[str]  # decoded completion text (EOS excluded)
    lengths_B: np.ndarray  # completion tokens (EOS included)


def _precision_name(precision: Precision) -> str:
    for name in PRECISION_NAMES:
        if Precision.named(name) == precision:
            return name
    raise ValueError(f"GRPO trains float32 master weights (precision fp32, bf16 or fp8); the --init model has "
                     f"{precision}")


class GRPOTrainer:
    """The policy (state: params, bias, optimizer), the frozen reference, the problem stream and the jitted steps."""

    def __init__(self, args: GRPOArgs, model, tokenizer, rules: Mapping[str, RewardFn] = REWARDS):
        validate_args(args, rules)
        self.args = args
        self.cfg = model.config
        self.precision = _precision_name(model.precision)
        if args.mtp_weight > 0 and not self.cfg.num_mtp_layers:
            raise ValueError("--mtp-weight > 0 needs a model with MTP modules (num_mtp_layers > 0)")
        self.tokenizer = chat_tokenizer(tokenizer)
        too_big = [t for t in ("<|system|>", "<|user|>", "<|assistant|>")
                   if self.tokenizer.token_id(t) >= self.cfg.vocab_size]
        if too_big or self.tokenizer.eos_id >= self.cfg.vocab_size:
            raise ValueError(f"the tokenizer's chat tokens {too_big or ['<|eos|>']} have ids past the model's "
                             f"vocabulary ({self.cfg.vocab_size}); GRPO needs a model whose tokenizer has them")
        self.rules = rules
        self.weights = parse_reward_weights(args.rewards, rules)
        self.task, path = parse_task(args.task, dict(args.task_options))
        if self.task is not None:
            self.pool = make_problems(self.task, args.iterations * args.prompts_per_batch, args.seed,
                                      **dict(args.task_options))
        else:
            self.pool = load_problems(path)
        self.prompts = [render_prompt(p.prompt, self.tokenizer, args.system) for p in self.pool]
        self._perm_epoch, self._perm = -1, None
        self.prompt_len = max(len(p) for p in self.prompts)  # every batch is padded to it: one compile
        if self.prompt_len + args.max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"the longest prompt ({self.prompt_len} tokens) + --max-new-tokens {args.max_new_tokens} "
                             f"exceeds the model's max_position_embeddings {self.cfg.max_position_embeddings}")
        self.total_updates = args.iterations * args.updates_per_batch
        self.graphdef, params, bias = split_model(model)
        # committed to one device like the update's outputs and restored arrays: every iteration, fresh or
        # resumed, runs the same compiled programs
        params, bias = jax.device_put((params, bias), jax.devices()[0])
        self.ref_params, self.ref_bias = params, bias  # jax arrays are immutable: the reference never moves
        self.optimizer = grpo_optimizer(params, args, self.total_updates)
        self.lr = lr_schedule(args, self.total_updates)
        self.state = jax.device_put(init_state(params, bias, self.optimizer), jax.devices()[0])
        self._logprobs = jax.jit(self._logprobs_fn)
        self._update = jax.jit(self._update_fn)

    # ---- problems and sampling ----

    def batch_indices(self, iteration: int) -> list[int]:
        """Pool indices of the iteration's prompts: the pool in a seeded order per epoch, P at a time."""
        n, p = len(self.pool), self.args.prompts_per_batch
        return [int(self._permutation(g // n)[g % n]) for g in range(iteration * p, (iteration + 1) * p)]

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.args.seed, epoch]).permutation(len(self.pool))
            self._perm_epoch = epoch
        return self._perm

    def policy(self):
        """The current policy as a Transformer (shares the state's arrays)."""
        return nnx.merge(self.graphdef, self.state["params"], self.state["bias"])

    def rollout(self, iteration: int) -> Rollout:
        """Sample G completions of each of the iteration's P prompts and score them."""
        args, eos = self.args, self.tokenizer.eos_id
        idx = [i for i in self.batch_indices(iteration) for _ in range(args.group_size)]
        b, n = len(idx), args.max_new_tokens
        prompt_BT = np.zeros((b, self.prompt_len), np.int32)
        lengths = np.array([len(self.prompts[i]) for i in idx], np.int64)
        for row, i in enumerate(idx):
            prompt_BT[row, :lengths[row]] = self.prompts[i]
        seed = (args.seed * 1_000_003 + iteration) % 2**31
        seq_BS = generate(self.policy(), prompt_BT, n, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=seed, stop_tokens=[eos], prompt_lengths=lengths)
        mask_BS = np.zeros(seq_BS.shape, np.float32)
        texts, finished, comp_len = [], [], np.zeros((b,), np.int64)
        for row in range(b):
            gen = seq_BS[row, lengths[row]:lengths[row] + n]
            stops = np.flatnonzero(gen == eos)
            done = stops.size > 0
            k = int(stops[0]) + 1 if done else n
            mask_BS[row, lengths[row]:lengths[row] + k] = 1.0
            texts.append(self.tokenizer.decode(gen[:k - 1] if done else gen))
            finished.append(done)
            comp_len[row] = k
        problems = [self.pool[i] for i in idx]
        scorers = [self.task or problem_scorer(p) for p in problems]
        totals, parts = compute_rewards(texts, finished, problems, scorers, self.weights, self.rules)
        parts = {name: np.asarray(v, np.float32) for name, v in parts.items()}
        parts["accuracy"] = np.asarray([score(s, c, p) for c, p, s in zip(texts, problems, scorers)], np.float32)
        rewards = np.asarray(totals, np.float32)
        adv = group_advantages(rewards.reshape(-1, args.group_size)).reshape(-1)
        return Rollout(seq_BS.astype(np.int32), mask_BS, rewards, adv, parts, texts, comp_len)

    # ---- jitted pieces ----

    def _logprobs_fn(self, params, bias, seq_BS):
        model = nnx.merge(self.graphdef, params, bias)
        logits = model.forward(seq_BS[:, :-1], mtp=False).logits
        return token_logprobs(logits, seq_BS[:, 1:])

    def logprobs(self, params, bias, seq_BS) -> jax.Array:
        """float32 [B, S-1]: log-prob of each token given those before it (one jitted forward)."""
        return self._logprobs(params, bias, jnp.asarray(seq_BS))

    def _update_fn(self, state, seq_BS, mask_BS, adv_B, old_BT, ref_BT, clip_eps, kl_beta, mtp_weight, gamma):
        train_mtp = self.args.mtp_weight > 0  # static: without it the MTP modules are neither run nor updated
        mask_BT = mask_BS[:, 1:]

        def loss_fn(params):
            model = nnx.merge(self.graphdef, params, state["bias"])
            out = model.forward(seq_BS[:, :-1], mtp=train_mtp)
            new_BT = token_logprobs(out.logits, seq_BS[:, 1:])
            stats = grpo_terms(new_BT, old_BT, ref_BT, adv_B, mask_BT, clip_eps, kl_beta)
            mtp = masked_mtp_loss(out.mtp_logits, seq_BS, mask_BS) if train_mtp else jnp.zeros((), jnp.float32)
            return stats.loss + mtp_weight * mtp, (stats, mtp, out.expert_counts, out.mtp_expert_counts)

        params = state["params"]
        (_, (stats, mtp, counts, mtp_counts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = self.optimizer.update(grads, state["opt"], params)
        if not train_mtp:  # no gradient reaches them, but weight decay would still move them
            updates = jax.tree_util.tree_map_with_path(
                lambda path, u: jnp.zeros_like(u) if getattr(path[0], "key", None) == "mtp" else u, updates)
        new_params = optax.apply_updates(params, updates)

        def move_bias(path, b):  # gamma = 0 leaves b unchanged (b + 0 * sign(...))
            c = counts if getattr(path[0], "key", None) == "moe_layers" else mtp_counts
            return b if c is None else update_expert_bias(b, c, gamma)

        new_bias = jax.tree_util.tree_map_with_path(move_bias, state["bias"])
        # a non-finite loss or gradient skips the update (parameters, bias and optimizer state kept), as in train
        skip = ~(jnp.isfinite(stats.loss) & jnp.isfinite(mtp) & jnp.isfinite(grad_norm))
        keep = lambda old, new: jax.tree.map(lambda a, b: jnp.where(skip, a, b), old, new)
        new_state = {**state, "params": keep(params, new_params), "bias": keep(state["bias"], new_bias),
                     "opt": keep(state["opt"], new_opt), "step": state["step"] + 1}
        return new_state, {"loss": stats.loss, "kl": stats.kl, "clip_frac": stats.clip_frac,
                           "ratio_dev": stats.ratio_dev, "mtp_loss": mtp, "grad_norm": grad_norm, "skipped": skip}

    def update(self, rollout: Rollout, old_BT, ref_BT, gamma: float | None = None) -> dict[str, jax.Array]:
        """One gradient step on the rollout's GRPO loss (bias speed `gamma`, default --gamma); the step's metrics."""
        a = self.args
        gamma = a.gamma if gamma is None else gamma
        self.state, m = self._update(self.state, jnp.asarray(rollout.seq_BS), jnp.asarray(rollout.mask_BS),
                                     jnp.asarray(rollout.advantages_B), old_BT, ref_BT, jnp.float32(a.clip_eps),
                                     jnp.float32(a.kl_beta), jnp.float32(a.mtp_weight), jnp.float32(gamma))
        return m

    def iteration(self, iteration: int) -> dict[str, Any]:
        """Sample, score, compute old/reference log-probs, then updates_per_batch steps; the metrics row."""
        t0 = time.perf_counter()
        ro = self.rollout(iteration)
        t1 = time.perf_counter()
        seq = jnp.asarray(ro.seq_BS)
        old_BT = self.logprobs(self.state["params"], self.state["bias"], seq)
        ref_BT = self.logprobs(self.ref_params, self.ref_bias, seq)
        lr = float(self.lr(int(self.state["step"])))
        steps = [jax.device_get(self.update(ro, old_BT, ref_BT)) for _ in range(self.args.updates_per_batch)]
        t2 = time.perf_counter()
        mean = lambda key: float(np.mean([s[key] for s in steps]))
        row = {"step": iteration + 1, "loss": mean("loss"), "kl": mean("kl"), "clip_frac": mean("clip_frac"),
               "ratio_dev_first": float(steps[0]["ratio_dev"]), "grad_norm": mean("grad_norm"),
               "reward_mean": float(ro.rewards_B.mean()), "reward_std": float(ro.rewards_B.std()),
               "accuracy": float(ro.parts["accuracy"].mean()), "completion_len": float(ro.lengths_B.mean()),
               "lr": lr, "skipped": int(sum(bool(s["skipped"]) for s in steps)), "sample_time": t1 - t0,
               "update_time": t2 - t1}
        row.update({f"reward_{name}": float(v.mean()) for name, v in ro.parts.items() if name != "accuracy"})
        if self.args.mtp_weight > 0:
            row["mtp_loss"] = mean("mtp_loss")
        return row


# -- the run --------------------------------------------------------------------------------------------------------
class GRPOInterrupted(Exception):
    pass


def run_meta(trainer: GRPOTrainer, iteration: int) -> dict:
    """Checkpoint meta in `dsv3 train`'s layout (model_config, run_args with steps/lr/precision, tokenizer)."""
    a = trainer.args
    run_args = {**dataclasses.asdict(a), "steps": trainer.total_updates, "precision": trainer.precision,
                "kind": "grpo"}
    return {"step": iteration, "model_config": trainer.cfg.to_hf(), "run_args": run_args,
            "tokenizer": trainer.tokenizer.to_json()}


def run_grpo(args: GRPOArgs, rules: Mapping[str, RewardFn] = REWARDS) -> dict[str, Any]:
    """Run (or resume) GRPO from args.init into args.workdir; returns a summary dict."""
    from dsv3_jax.load import load_model_and_tokenizer
    from dsv3_jax.train.checkpoint import Checkpointer
    from dsv3_jax.train.loop import _abstract, _Log, flat_state, unflat_state

    validate_args(args, rules)
    workdir = pathlib.Path(args.workdir)
    if workdir.resolve() == pathlib.Path(args.init).resolve():
        raise ValueError("--workdir must differ from --init (the reference model is read from --init)")
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=args.keep)
    existing = ckpt.latest_step()
    if existing is not None and not args.resume:
        ckpt.close()
        raise ValueError(f"{workdir / 'checkpoints'} already holds checkpoints (latest iteration {existing}); pass "
                         "--resume to continue, or choose another --workdir")
    if args.resume and existing is None:
        ckpt.close()
        raise FileNotFoundError(f"--resume: no checkpoint in {workdir / 'checkpoints'}")
    model, tokenizer = load_model_and_tokenizer(args.init)
    trainer = GRPOTrainer(args, model, tokenizer, rules)
    del model
    workdir.mkdir(parents=True, exist_ok=True)
    start = 0
    if args.resume:
        start, restored, meta = ckpt.restore(flat_state(_abstract(trainer.state)))
        if meta.get("model_config") != trainer.cfg.to_hf():
            raise ValueError(f"--resume: the checkpoint in {workdir / 'checkpoints'} has a different model config "
                             f"than --init {args.init}")
        trainer.state = unflat_state(restored, trainer.state)
    log = _Log(workdir, start)
    print(f"dsv3 grpo: {args.task}, {args.iterations} iterations x {args.prompts_per_batch} prompts x "
          f"{args.group_size} samples, mu {args.updates_per_batch}, lr {args.lr:g}, rewards {trainer.weights}, "
          f"workdir {workdir}" + (f", resuming at iteration {start}" if start else ""), file=sys.stderr)
    interrupted: list[int] = []
    handlers = {sig: signal.signal(sig, lambda s, f: interrupted.append(s)) for sig in (signal.SIGINT,
                                                                                        signal.SIGTERM)}
    first = last = None
    it, stop = start, args.stop_at or args.iterations
    try:
        for it in range(start, stop):
            row = trainer.iteration(it)
            log.metric(row)
            if row["skipped"]:
                log.event(it + 1, "skipped_updates", count=row["skipped"], loss=row["loss"],
                          grad_norm=row["grad_norm"], note="non-finite loss or gradient")
            first = row if first is None else first
            last = row
            if args.progress:
                print(f"\r[grpo {it + 1}/{args.iterations}] reward {row['reward_mean']:.3f} acc "
                      f"{row['accuracy']:.3f} kl {row['kl']:.4f} len {row['completion_len']:.1f}", end="",
                      file=sys.stderr, flush=True)
            done = it + 1
            if done % args.save_every == 0 or done == stop:
                ckpt.save(done, flat_state(trainer.state), run_meta(trainer, done))
            if interrupted:
                raise GRPOInterrupted
    except GRPOInterrupted:
        done = it + 1
        if done not in ckpt.all_steps():
            ckpt.save(done, flat_state(trainer.state), run_meta(trainer, done))
        ckpt.wait()
        log.event(done, "interrupted", note="checkpoint saved; continue with --resume")
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        ckpt.close()
        log.close()
        if args.progress:
            print(file=sys.stderr)
    summary = {"iterations_done": stop, "workdir": str(workdir)}
    if first is not None:
        summary.update(first_reward=first["reward_mean"], last_reward=last["reward_mean"],
                       first_accuracy=first["accuracy"], last_accuracy=last["accuracy"])
    return summary


def parse_task_options(specs: Sequence[str] | None) -> tuple[tuple[str, int], ...]:
    """(("digits", 1), ...) from KEY=INT strings; ValueError on a malformed one."""
    out = []
    for key, value in key_values(specs, "--task-option", "KEY=INTEGER (e.g. digits=1)").items():
        try:
            out.append((key, int(value)))
        except ValueError:
            raise ValueError(f"--task-option {key}={value}: {value!r} is not an integer") from None
    return tuple(out)
