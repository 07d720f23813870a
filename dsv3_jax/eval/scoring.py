"""Scoring core of the evaluation harness (paper §5.1 evaluations by log-likelihood and perplexity): the summed
log-probability of a continuation given a context, batched into fixed bucket shapes so the jitted forward
compiles once per (batch, length) bucket; rolling windows for perplexity of long documents."""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.inference.generate import bucket_length
from dsv3_jax.losses import token_logprobs



class Loglik(NamedTuple):
    """One request's result: summed log-probability of the continuation, whether greedy decoding would produce
    it, its token count, and how many context tokens were cut from the left to fit the model's context."""

    logprob: float
    is_greedy: bool
    n_tokens: int
    truncated: int


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, tokens_BT, targets_BT):
    """Per-position log-probability of the targets and whether each is the argmax, [B, T] each."""
    logits_BTV = nnx.merge(graphdef, state)(tokens_BT)
    return token_logprobs(logits_BTV, targets_BT), jnp.argmax(logits_BTV, axis=-1) == targets_BT


def loglikelihood(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                  max_len: int | None = None) -> list[Loglik]:
    """log P(continuation | context) for each (context_ids, continuation_ids) request.

    The context must hold at least one token (put BOS first to score from the start). A request longer than the
    model's context (max_position_embeddings, or max_len) keeps its last max_len + 1 tokens: the context is cut
    from the left and the cut count is returned in `truncated`; a continuation alone longer than that is an error.
    """
    cfg = model.config
    max_len = cfg.max_position_embeddings if max_len is None else min(max_len, cfg.max_position_embeddings)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        if not ctx:
            raise ValueError(f"request {i}: empty context (start it with a BOS token)")
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if len(cont) > max_len:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the model's context "
                             f"of {max_len}")
        bad = [t for t in ctx + cont if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"request {i}: token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        full = ctx + cont
        cut = max(0, len(full) - 1 - max_len)
        rows.append((full[cut:], len(cont), cut))
    graphdef, state = nnx.split(model)
    out: list[Loglik | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        t = bucket_length(max(len(rows[i][0]) - 1 for i in idx), max_len)
        tokens = np.zeros((batch_size, t), np.int32)
        targets = np.zeros((batch_size, t), np.int32)
        for r, i in enumerate(idx):
            full = rows[i][0]
            tokens[r, :len(full) - 1] = full[:-1]
            targets[r, :len(full) - 1] = full[1:]
        logp, greedy = jax.device_get(_score(graphdef, state, tokens, targets))
        for r, i in enumerate(idx):
            full, n, cut = rows[i]
            span = slice(len(full) - 1 - n, len(full) - 1)
            out[i] = Loglik(float(np.sum(logp[r, span], dtype=np.float64)), bool(np.all(greedy[r, span])), n, cut)
    return out  # type: ignore[return-value]


def rolling_windows(ids: Sequence[int], window: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that predict every token of ids[1:] exactly once with inputs of at most
    `window` tokens: the first window predicts `window` tokens, each later one `stride` (default: window, i.e.
    disjoint chunks) with the preceding window - stride tokens as context."""
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    ids = [int(t) for t in ids]
    pairs, a = [], 1
    while a < len(ids):
        b = min(a + (window if a == 1 else stride), len(ids))
        lo = max(0, b - 1 - window)
        pairs.append((ids[lo:a], ids[a:b]))
        a = b
    return pairs
