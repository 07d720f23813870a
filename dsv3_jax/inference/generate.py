"""Batched generation over the compressed latent cache (paper §2.1.1): one prefill, then one decode step per token,
both jit-compiled once for static shapes (cache preallocated to prompt + max_new_tokens)."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.inference.decoder import Decoder, compile_step, layer_cache


def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """logits / T (float32) with everything outside the top_k tokens, and outside the smallest set whose
    probability reaches top_p, set to -inf: the sampling distribution is softmax of the result."""
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token while the mass strictly before it is below top_p (the first token is always kept)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                  top_p: float | None) -> jax.Array:
    """Next tokens [B]: argmax when temperature == 0, else a draw from softmax(filter_logits(...))."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BV, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


def _check(prompt_ids: np.ndarray, lengths: np.ndarray, max_new_tokens: int, temperature: float, top_k, top_p,
           vocab: int, max_positions: int) -> None:
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be int32 [B, T] with T >= 1, got shape {prompt_ids.shape}")
    if prompt_ids.min() < 0 or prompt_ids.max() >= vocab:
        raise ValueError(f"prompt_ids hold token ids outside [0, {vocab})")
    if np.any(lengths < 1) or np.any(lengths > prompt_ids.shape[1]):
        raise ValueError(f"prompt_lengths must be in [1, {prompt_ids.shape[1]}], got {lengths.tolist()}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_ids.shape[1] + max_new_tokens > max_positions:
        raise ValueError(f"prompt length {prompt_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_position_embeddings {max_positions}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 0 < top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _prepare(cfg, prompt_ids, prompt_lengths, max_new_tokens: int, temperature: float, top_k, top_p):
    """Checked int32 prompts [B, T], their lengths [B] and the output buffer [B, T + N] holding the prompts."""
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    b, t = prompt.shape if prompt.ndim == 2 else (0, 0)
    lengths = np.full((b,), t, np.int64) if prompt_lengths is None else np.asarray(prompt_lengths, np.int64)
    _check(prompt, lengths, max_new_tokens, temperature, top_k, top_p, cfg.vocab_size, cfg.max_position_embeddings)
    out = np.zeros((b, t + max_new_tokens), np.int32)
    out[:, :t] = prompt
    return prompt, lengths, out


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = (),
             prompt_lengths: Sequence[int] | None = None, callback: Callable[[int, np.ndarray], None] | None = None,
             cache_dtype=None) -> np.ndarray:
    """Continue int32 [B, T] prompts by up to max_new_tokens tokens; returns [B, T + max_new_tokens].

    Prompts of different lengths are right-padded, with `prompt_lengths` giving each real length: row b's new
    tokens start at prompt_lengths[b]. After a stop token (kept in the output) a row is filled with it.
    `callback(step, tokens_B)` is called with every new column (streaming).
    """
    cfg = model.config
    prompt, lengths, out = _prepare(cfg, prompt_ids, prompt_lengths, max_new_tokens, temperature, top_k, top_p)
    (b, t), total = prompt.shape, out.shape[1]
    if max_new_tokens == 0:
        return out
    dec = Decoder.of(model)
    prefill = compile_step(_last_logits_step, dec.static(), ("cache",))
    chunk = CALLBACK_CHUNK if callback is not None else DECODE_CHUNK
    decode = compile_step(_decode_chunk, dec.static(), ("cache",), chunk, temperature, top_k, top_p)
    cache = layer_cache(cfg, b, total, cache_dtype or model.precision.compute_dtype)
    key = jax.random.key(seed)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    logits, cache = prefill(dec.state, dec.layer_states, prompt, positions, cache, (lengths - 1).astype(np.int32))
    nxt = np.asarray(_sampler(temperature, top_k, top_p)(logits, key, 0))
    stops = np.asarray(list(stop_tokens), np.int32)
    new = np.zeros((b, max_new_tokens), np.int32)  # column i: each row's i-th new token
    new[:, 0] = nxt
    done = np.isin(nxt, stops)
    if callback is not None:
        callback(0, nxt.copy())
    made = 1
    while made < max_new_tokens and not done.all():
        # the device runs up to `chunk` decode steps (fewer when every row has stopped) without returning
        tokens, steps, cache, done_dev = decode(dec.state, dec.layer_states, new[:, made - 1], (lengths + made - 1)
                                                .astype(np.int32), cache, done, stops, key, np.int32(made),
                                                np.int32(max_new_tokens - made))
        steps, tokens, done = int(steps), np.asarray(tokens), np.asarray(done_dev)
        new[:, made:made + steps] = tokens[:, :steps]
        if callback is not None:
            for i in range(steps):
                callback(made + i, tokens[:, i].copy())
        made += steps
    new[:, made:] = new[:, made - 1:made]  # every row stopped: each keeps its stop token to the end
    for row in range(b):
        out[row, lengths[row]:lengths[row] + max_new_tokens] = new[row]
    return out


DECODE_CHUNK = 64  # decode steps per device call of generate() (one host round trip per chunk)
CALLBACK_CHUNK = 4  # the same when streaming to a callback


def _decode_chunk(dec: Decoder, chunk: int, temperature, top_k, top_p, state, layer_states, last_B, pos_B, cache,
                  done_B, stops, key, first, limit):
    """Up to min(chunk, limit) greedy or sampled decode steps in one device loop, stopping early when every row
    is done: (tokens [B, chunk] (the first `steps` columns valid), steps, cache, done [B]). Step i feeds each row's
    previous token at its position and samples with fold_in(key, first + i), as a host loop of single steps would;
    a finished row repeats its stop token."""
    b = last_B.shape[0]

    def cond(c):
        i, _, _, _, done, _ = c
        return (i < jnp.minimum(chunk, limit)) & ~jnp.all(done)

    def body(c):
        i, tok, pos, cache, done, toks = c
        logits, cache = _last_logits_step(dec, state, layer_states, tok[:, None], pos[:, None], cache,
                                          jnp.zeros((b,), jnp.int32))
        nxt = sample_logits(logits, jax.random.fold_in(key, first + i), temperature, top_k, top_p)
        nxt = jnp.where(done, tok, nxt)
        done = done | jnp.isin(nxt, stops)
        return i + 1, nxt, pos + 1, cache, done, toks.at[:, i].set(nxt)

    init = (jnp.int32(0), last_B, pos_B, cache, done_B, jnp.zeros((b, chunk), jnp.int32))
    steps, _, _, cache, done, toks = jax.lax.while_loop(cond, body, init)
    return toks, steps, cache, done


MIN_BUCKET = 16  # shortest padded prompt length of generate_batched (and of eval's scoring batches)


def bucket_length(n: int, max_len: int) -> int:
    """The padded length of an n-token input: the next power of two (at least MIN_BUCKET), capped at max_len."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, max_len)


def generate_batched(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, batch_size: int = 8,
                     temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                     stop_tokens: Sequence[int] = ()) -> list[tuple[list[int], bool]]:
    """(new ids before the first stop token, whether one came) for each prompt of any length, in input order.

    Prompts run longest first in batches of batch_size rows padded to a power-of-two length, so a run compiles
    once per length bucket; batch n samples with seed + n. ValueError when a prompt is empty or does not fit the
    model's context together with max_new_tokens."""
    max_pos = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if not len(p):
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > max_pos:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens {max_new_tokens} it exceeds the "
                             f"model's context of {max_pos}")
    results: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for n_batch, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        t = min(bucket_length(len(prompts[idx[0]]), max_pos), max_pos - max_new_tokens)
        batch = np.zeros((batch_size, t), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for r, i in enumerate(idx):
            batch[r, :len(prompts[i])] = prompts[i]
            lengths[r] = len(prompts[i])
        out = generate(model, batch, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed + n_batch, stop_tokens=stop_tokens, prompt_lengths=lengths)
        for r, i in enumerate(idx):
            new = [int(x) for x in out[r, lengths[r]:lengths[r] + max_new_tokens]]
            stop = next((j for j, x in enumerate(new) if x in stop_tokens), None)
            results[i] = (new, False) if stop is None else (new[:stop], True)
    return results


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """``prompt`` and up to max_new_tokens greedy tokens after it (generate_batched; BOS first, stops at EOS, fewer
    tokens when the context ends sooner)."""
    ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(prompt)
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    if max_new_tokens <= 0:
        return prompt
    eos = tokenizer.eos_id
    [(new, _)] = generate_batched(model, [ids], max_new_tokens, batch_size=1, stop_tokens=[] if eos is None else [eos])
    return prompt + tokenizer.decode(new)


def _last_logits_step(dec: Decoder, state, layer_states, tokens_BT, positions_BT, cache, last_B):
    """Run the model over new tokens against the cache; each row's logits [B, V] at its position last_B."""
    logits, _, cache = dec.forward(state, layer_states, tokens_BT, positions_BT, cache)
    return logits[jnp.arange(tokens_BT.shape[0]), last_B], cache


@functools.lru_cache(maxsize=64)
def _sampler(temperature: float, top_k: int | None, top_p: float | None):
    """sample_logits for fixed settings, jitted apart from the model step (which then compiles once per shape)."""
    return jax.jit(lambda logits, key, i: sample_logits(logits, jax.random.fold_in(key, i), temperature, top_k, top_p))
