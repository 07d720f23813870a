"""MTP speculative decoding (paper §2.2, §5.4.3): the first MTP module drafts the token after next, one main-model
forward verifies [next, draft] together; greedy accepts on an exact match, sampling uses the speculative-sampling
rule (accept with probability min(1, p/q), else resample from max(0, p - q)), so the output distribution is the
main model's. Each row of the batch advances by one or two tokens per forward; the verify steps run in a device
loop (up to SPECULATIVE_CHUNK forwards per host round trip), as generate()'s decode steps do.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.inference.decoder import Decoder, compile_step, layer_cache
from dsv3_jax.inference.generate import _place, _prepare, filter_logits


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
    draft_logits, mtp_cache = dec.mtp_forward(state, mtp_state, hidden, shifted, positions, mtp_cache, last_B)
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
    draft_logits, mtp_cache = dec.mtp_forward(state, mtp_state, hidden, jnp.stack([tok0, new_nxt], axis=1),
                                              verify_pos, mtp_cache, accept.astype(jnp.int32))
    return accept, new_nxt, _pick(draft_logits, k_draft, temperature, top_k, top_p), draft_logits, cache, mtp_cache


class _Loop(NamedTuple):
    """The state the verify loop carries from step to step and from one device call to the next."""

    new_BN: jax.Array  # int32: row b's new tokens, the first emitted_B[b] written
    emitted_B: jax.Array
    done_B: jax.Array  # a stop token was emitted
    nxt_B: jax.Array  # emitted, not yet run through the model (at pos_B)
    draft_B: jax.Array  # the MTP module's guess for the token after nxt_B
    draft_logits_BV: jax.Array
    pos_B: jax.Array
    cache: tuple
    mtp_cache: tuple
    drafted: jax.Array  # int32 scalars: the statistics
    accepted: jax.Array
    forwards: jax.Array


SPECULATIVE_CHUNK = 32  # verify steps per device call (each emits up to 2 tokens per row)


def _emit(new_BN, emitted_B, done_B, tok_B, valid_B, stops):
    """Append tok_B to the rows where valid_B; a stop token ends its row."""
    at = jnp.where(valid_B, emitted_B, new_BN.shape[1])  # out of range: dropped
    new_BN = new_BN.at[jnp.arange(tok_B.shape[0]), at].set(tok_B, mode="drop")
    return new_BN, emitted_B + valid_B, done_B | (valid_B & jnp.isin(tok_B, stops))


def _verify_chunk(dec: Decoder, chunk: int, temperature, top_k, top_p, state, layer_states, mtp_state, loop: _Loop,
                  stops, key):
    """Up to `chunk` verify steps in one device loop, stopping early when every row is done or full:
    (loop, finished). Step i uses fold_in(key, forwards) as the host loop of single steps did."""
    n = loop.new_BN.shape[1]

    def live(c: _Loop):
        return ~c.done_B & (c.emitted_B < n)

    def cond(ic):
        i, c = ic
        return (i < chunk) & jnp.any(live(c))

    def body(ic):
        i, c = ic
        live_B = live(c)
        accept, nxt, draft, draft_logits, cache, mtp_cache = _verify_step(
            dec, temperature, top_k, top_p, state, layer_states, mtp_state, c.nxt_B, c.draft_B, c.draft_logits_BV,
            c.pos_B, c.cache, c.mtp_cache, key, c.forwards)
        new, emitted, done = _emit(c.new_BN, c.emitted_B, c.done_B, c.draft_B, accept & live_B, stops)
        new, emitted, done = _emit(new, emitted, done, nxt, ~done & (emitted < n), stops)
        pos = c.pos_B + jnp.where(live_B, 1 + accept, 0)  # finished rows stay put (their cache stays in range)
        return i + 1, _Loop(new, emitted, done, nxt, draft, draft_logits, pos, cache, mtp_cache,
                            c.drafted + jnp.sum(live_B), c.accepted + jnp.sum(accept & live_B), c.forwards + 1)

    _, loop = jax.lax.while_loop(cond, body, (jnp.int32(0), loop))
    return loop, ~jnp.any(live(loop))


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
    prefill = compile_step(_prefill_step, dec.static(), ("cache", "mtp_cache"), *settings)
    verify = compile_step(_verify_chunk, dec.static(), ("loop",), SPECULATIVE_CHUNK, *settings)
    dtype = model.precision.compute_dtype
    cache = layer_cache(cfg, b, total + 2, dtype)
    mtp_cache = layer_cache(cfg, b, total + 2, dtype, layers=1)
    key = jax.random.key(seed)
    nxt, draft, draft_logits, cache, mtp_cache = prefill(dec.state, dec.layer_states, dec.mtp_state, prompt, cache,
                                                         mtp_cache, (lengths - 1).astype(np.int32), key)
    stops = np.asarray(list(stop_tokens), np.int32)
    nxt = np.asarray(nxt)
    new = np.zeros((b, max_new_tokens), np.int32)
    new[:, 0] = nxt
    zero = np.int32(0)
    loop = _Loop(new, np.ones((b,), np.int32), np.isin(nxt, stops), nxt, draft, draft_logits,
                 lengths.astype(np.int32), cache, mtp_cache, zero, zero, np.int32(1))
    finished = max_new_tokens == 1 or bool(loop.done_B.all())
    while not finished:
        loop, finished = verify(dec.state, dec.layer_states, dec.mtp_state, loop, stops, key)
        finished = bool(finished)
    emitted = np.asarray(loop.emitted_B)
    out = _place(out, lengths, np.asarray(loop.new_BN), emitted)
    stats = SpeculativeStats(int(loop.drafted), int(loop.accepted), int(loop.forwards), int(emitted.sum()), b)
    return (out, stats) if return_stats else out
