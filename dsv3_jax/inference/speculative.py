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

from dsv3_jax.inference.decoder import Decoder, compile_step, layer_cache
from dsv3_jax.inference.generate import _prepare, filter_logits


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


def _pick(logits_BV, key, temperature, top_k, top_p):
    """One token per row: argmax when greedy, else a draw from the filtered distribution."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    p = _filtered_probs(logits_BV, temperature, top_k, top_p)
    return jax.random.categorical(key, jnp.log(p), axis=-1).astype(jnp.int32)


def _prefill_step(dec: Decoder, temperature, top_k, top_p, state, layer_states, mtp_state, prompt_BT, cache,
                  mtp_cache, last_B, key):
    """Main model over the prompt, its next token, then the MTP module over (h_i, t_{i+1}) at every prompt
    position and the first draft: (next, draft, draft_logits, cache, mtp_cache)."""
    b, t = prompt_BT.shape
    rows = jnp.arange(b)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, hidden, cache = dec.forward(state, layer_states, prompt_BT, positions, cache)
    k1, k2 = jax.random.split(key)
    nxt = _pick(logits[rows, last_B], k1, temperature, top_k, top_p)
    shifted = jnp.concatenate([prompt_BT[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1).at[rows, last_B].set(nxt)
    mtp_logits, mtp_cache = dec.mtp_forward(state, mtp_state, hidden, shifted, positions, mtp_cache)
    draft_logits = mtp_logits[rows, last_B]
    return nxt, _pick(draft_logits, k2, temperature, top_k, top_p), draft_logits, cache, mtp_cache


def _verify_step(dec: Decoder, temperature, top_k, top_p, state, layer_states, mtp_state, nxt_B, draft_B,
                 draft_logits_BV, pos_B, cache, mtp_cache, key, i):
    """One main-model forward over [next, draft] at [pos, pos+1], the acceptance test, and the next draft from
    the MTP module: (accept, new_next, new_draft, new_draft_logits, cache, mtp_cache). Each row emits draft (if
    accepted) and new_next."""
    key = jax.random.fold_in(key, i)
    k_acc, k_fix, k_bonus, k_draft = jax.random.split(key, 4)
    verify_pos = jnp.stack([pos_B, pos_B + 1], axis=1)
    logits, hidden, cache = dec.forward(state, layer_states, jnp.stack([nxt_B, draft_B], axis=1), verify_pos, cache)
    rows = jnp.arange(nxt_B.shape[0])
    if temperature > 0:  # speculative sampling: accept with min(1, p/q), else resample from max(0, p - q)
        p0 = _filtered_probs(logits[:, 0], temperature, top_k, top_p)
        q0 = _filtered_probs(draft_logits_BV, temperature, top_k, top_p)
        p_d, q_d = p0[rows, draft_B], q0[rows, draft_B]
        accept = jax.random.uniform(k_acc, p_d.shape) < jnp.minimum(1.0, p_d / jnp.maximum(q_d, 1e-30))
        residual = jnp.maximum(p0 - q0, 0.0)
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p0)
        fix = jax.random.categorical(k_fix, jnp.log(residual), axis=-1).astype(jnp.int32)
    else:
        fix = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        accept = fix == draft_B
    bonus = _pick(logits[:, 1], k_bonus, temperature, top_k, top_p)
    new_nxt = jnp.where(accept, bonus, fix)
    # MTP over (h_pos, token pos+1) and (h_pos+1, token pos+2); the draft comes from the last valid one
    tok0 = jnp.where(accept, draft_B, fix)
    mtp_logits, mtp_cache = dec.mtp_forward(state, mtp_state, hidden, jnp.stack([tok0, new_nxt], axis=1),
                                            verify_pos, mtp_cache)
    draft_logits = jnp.where(accept[:, None], mtp_logits[:, 1], mtp_logits[:, 0])
    return accept, new_nxt, _pick(draft_logits, k_draft, temperature, top_k, top_p), draft_logits, cache, mtp_cache


def speculative_generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                         top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = (),
                         prompt_lengths: Sequence[int] | None = None, return_stats: bool = False):
    """Like generate(), drafting with the MTP module; greedy output equals plain greedy token for token."""
    cfg = model.config
    if model.mtp is None:
        raise ValueError("speculative decoding needs an MTP module, but this model has num_mtp_layers=0 (a "
                         "checkpoint without the model.layers.{num_hidden_layers}.* tensors)")
    prompt, lengths, out = _prepare(cfg, prompt_ids, prompt_lengths, max_new_tokens, temperature, top_k, top_p)
    b, total = prompt.shape[0], out.shape[1]
    if max_new_tokens == 0:
        return (out, SpeculativeStats(0, 0, 0, 0, b)) if return_stats else out
    dec = Decoder.of(model)
    settings = (temperature, top_k, top_p)
    donate = ("cache", "mtp_cache")
    prefill = compile_step(_prefill_step, dec.static(), donate, *settings)
    verify = compile_step(_verify_step, dec.static(), donate, *settings)
    dtype = model.precision.compute_dtype
    size = total + 2
    cache = layer_cache(cfg, b, size, dtype)
    mtp_cache = layer_cache(cfg, b, size, dtype, layers=1)
    key = jax.random.key(seed)
    rows = np.arange(b)
    nxt, draft, draft_logits, cache, mtp_cache = prefill(dec.state, dec.layer_states, dec.mtp_state, prompt, cache,
                                                         mtp_cache, (lengths - 1).astype(np.int32), key)
    nxt = np.asarray(nxt)
    pos = lengths.copy()  # position of `nxt`
    emitted = np.zeros((b,), np.int64)
    stops = np.asarray(list(stop_tokens), np.int32)
    done = np.zeros((b,), bool)
    drafted = accepted = 0
    forwards = 1

    def emit(row, token):
        if done[row] or emitted[row] >= max_new_tokens:
            return
        out[row, lengths[row] + emitted[row]] = token
        emitted[row] += 1
        if token in stops:
            done[row] = True

    for r in rows:
        emit(r, nxt[r])
    while not all(done[r] or emitted[r] >= max_new_tokens for r in rows):
        old_draft = np.asarray(draft)
        accept, nxt, draft, draft_logits, cache, mtp_cache = verify(
            dec.state, dec.layer_states, dec.mtp_state, nxt, draft, draft_logits, pos.astype(np.int32), cache,
            mtp_cache, key, forwards)
        accept, nxt = np.asarray(accept), np.asarray(nxt)
        forwards += 1
        live = ~done & (emitted < max_new_tokens)
        drafted += int(live.sum())
        accepted += int((accept & live).sum())
        for r in rows:
            if accept[r]:
                emit(r, old_draft[r])
            emit(r, nxt[r])
        pos = pos + np.where(accept, 2, 1)
    for row in rows:  # rows that stopped early keep the stop token to the end
        if done[row]:
            end = lengths[row] + max_new_tokens
            out[row, lengths[row] + emitted[row]:end] = out[row, lengths[row] + emitted[row] - 1]
    stats = SpeculativeStats(drafted, accepted, forwards, int(emitted.sum()), b)
    return (out, stats) if return_stats else out
