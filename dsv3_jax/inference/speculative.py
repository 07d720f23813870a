"""MTP speculative decoding (paper §2.2, §5.4.3): the first MTP module drafts the token after next, one main-model
forward verifies [next, draft] together; greedy accepts on an exact match, sampling uses the speculative-sampling
rule (accept with probability min(1, p/q), else resample from max(0, p - q)), so the output distribution is the
main model's. Each row of the batch advances by one or two tokens per forward.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.inference.cache import LatentCache, init_cache
from dsv3_jax.inference.generate import _check, _compiled_step, filter_logits
from dsv3_jax.model.rope import rope_cos_sin


class SpeculativeStats(NamedTuple):
    drafted: int  # drafts verified (summed over rows)
    accepted: int
    forwards: int  # main-model forwards, the prefill included
    new_tokens: int  # summed over rows
    rows: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per row per main-model forward (1.0 for plain decoding)."""
        return self.new_tokens / max(self.forwards * self.rows, 1)


def _filtered_probs(logits, temperature, top_k, top_p):
    """The sampling distribution of generate.sample_logits as explicit probabilities [B, V] (float32)."""
    return jax.nn.softmax(filter_logits(logits, temperature, top_k, top_p), axis=-1)


def _mtp_step(model, hidden_BTD, next_tokens_BT, positions_BT, cache: LatentCache):
    """The first MTP module at `positions` (h_i from the main model, token i+1) with its own latent cache."""
    graphdef, state = nnx.split(model.mtp)
    mod = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    cos, sin = rope_cos_sin(positions_BT, model.config)
    emb = model.embed_tokens(next_tokens_BT)
    x = jnp.concatenate([mod.enorm(emb), mod.hnorm(hidden_BTD)], axis=-1) @ mod.eh_proj[...].astype(emb.dtype)
    h, c, pe = mod.block.cached(x, cos, sin, positions_BT, cache.c_kv[0], cache.k_pe[0])
    return model.output_head(mod.head_norm(h)), LatentCache(c[None], pe[None])


_MTP_STEP = nnx.jit(_mtp_step)


def speculative_generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                         top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = (),
                         prompt_lengths: Sequence[int] | None = None, return_stats: bool = False):
    """Like generate(), drafting with the MTP module; greedy output equals plain greedy token for token."""
    cfg = model.config
    if model.mtp is None:
        raise ValueError("speculative decoding needs an MTP module, but this model has num_mtp_layers=0 (a "
                         "checkpoint without the model.layers.{num_hidden_layers}.* tensors)")
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    b, t = prompt.shape if prompt.ndim == 2 else (0, 0)
    lengths = np.full((b,), t, np.int64) if prompt_lengths is None else np.asarray(prompt_lengths, np.int64)
    _check(prompt, lengths, max_new_tokens, temperature, top_k, top_p, cfg.vocab_size, cfg.max_position_embeddings)
    total = t + max_new_tokens
    out = np.zeros((b, total), np.int32)
    out[:, :t] = prompt
    if max_new_tokens == 0:
        return (out, SpeculativeStats(0, 0, 0, 0, b)) if return_stats else out
    dtype = model.precision.compute_dtype
    size = total + 2
    cache = init_cache(cfg, b, size, dtype)
    mtp_cache = LatentCache(*(x[:1] for x in init_cache(cfg, b, size, dtype)))
    main_fn, mtp_fn = _compiled_step(model), _MTP_STEP
    sampling = temperature > 0
    key = jax.random.key(seed)
    rows = np.arange(b)

    def pick(logits, k):  # one token per row from [B, V] logits
        if not sampling:
            return np.asarray(jnp.argmax(logits, axis=-1), np.int32)
        p = _filtered_probs(logits, temperature, top_k, top_p)
        return np.asarray(jax.random.categorical(k, jnp.log(p), axis=-1), np.int32)

    # prefill: main model over the prompt, then the MTP module over (h_i, t_{i+1}) for every prompt position
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, hidden, cache = main_fn(model, jnp.asarray(prompt), positions, cache)
    key, k1, k2 = jax.random.split(key, 3)
    nxt = pick(logits[rows, lengths - 1], k1)
    shifted = np.concatenate([prompt[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    shifted[rows, lengths - 1] = nxt
    mtp_logits, mtp_cache = mtp_fn(model, hidden, jnp.asarray(shifted), positions, mtp_cache)
    draft_logits = mtp_logits[rows, lengths - 1]
    draft = pick(draft_logits, k2)

    pos = lengths.copy()  # position of `nxt`
    emitted = np.zeros((b,), np.int64)
    stops = np.asarray(list(stop_tokens), np.int32)
    done = np.zeros((b,), bool)
    drafted = accepted = 0
    forwards = 1

    def emit(row, token):
        nonlocal done
        if done[row] or emitted[row] >= max_new_tokens:
            return
        out[row, lengths[row] + emitted[row]] = token
        emitted[row] += 1
        if token in stops:
            done[row] = True

    for r in rows:
        emit(r, nxt[r])
    while not all(done[r] or emitted[r] >= max_new_tokens for r in rows):
        verify_pos = np.stack([pos, pos + 1], axis=1)
        logits, hidden, cache = main_fn(model, jnp.asarray(np.stack([nxt, draft], axis=1)),
                                        jnp.asarray(verify_pos, jnp.int32), cache)
        forwards += 1
        key, k_acc, k_fix, k_bonus, k_draft = jax.random.split(key, 5)
        if sampling:
            p0 = _filtered_probs(logits[:, 0], temperature, top_k, top_p)
            q0 = _filtered_probs(draft_logits, temperature, top_k, top_p)
            p_d, q_d = np.asarray(p0[rows, draft]), np.asarray(q0[rows, draft])
            u = np.asarray(jax.random.uniform(k_acc, (b,)))
            accept = u < np.minimum(1.0, p_d / np.maximum(q_d, 1e-30))
            residual = jnp.maximum(p0 - q0, 0.0)
            residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p0)
            fix = np.asarray(jax.random.categorical(k_fix, jnp.log(residual), axis=-1), np.int32)
        else:
            fix = np.asarray(jnp.argmax(logits[:, 0], axis=-1), np.int32)
            accept = fix == draft
        bonus = pick(logits[:, 1], k_bonus)
        live = np.array([not done[r] and emitted[r] < max_new_tokens for r in rows])
        drafted += int(live.sum())
        accepted += int((accept & live).sum())
        new_nxt = np.where(accept, bonus, fix)
        for r in rows:
            if accept[r]:
                emit(r, draft[r])
            emit(r, new_nxt[r])
        # MTP over (h_pos, token pos+1) and (h_pos+1, token pos+2); the draft comes from the last valid one
        tok0 = np.where(accept, draft, fix)
        mtp_logits, mtp_cache = mtp_fn(model, hidden, jnp.asarray(np.stack([tok0, new_nxt], axis=1)),
                                       jnp.asarray(verify_pos, jnp.int32), mtp_cache)
        draft_logits = jnp.where(jnp.asarray(accept)[:, None], mtp_logits[:, 1], mtp_logits[:, 0])
        draft = pick(draft_logits, k_draft)
        pos = pos + np.where(accept, 2, 1)
        nxt = new_nxt
    for row in rows:  # rows that stopped early keep the stop token to the end
        if done[row]:
            end = lengths[row] + max_new_tokens
            out[row, lengths[row] + emitted[row]:end] = out[row, lengths[row] + emitted[row] - 1]
    stats = SpeculativeStats(drafted, accepted, forwards, int(emitted.sum()), b)
    return (out, stats) if return_stats else out
