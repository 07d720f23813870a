"""Training losses: next-token cross-entropy, the MTP loss (paper §2.2, eqs. 24-25), the sequence-wise
balance loss (paper §2.1.2, eqs. 17-20) and its batch-wise variant (§4.5.3).

Masks (packed post-training samples): a per-token loss weight and segment ids over the window of S = T + 1 tokens.
`target_weights` turns them into the weight of each prediction "position i predicts token i + offset": the loss
weight of the target, zero unless the target is in the same segment as i, zero on padding (segment id 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, float32 [B, T] (the scores of evaluation, GRPO, distillation)."""
    logits = logits_BTV.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _weighted_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    """sum(x * w) / sum(w), 0 when every weight is 0 (never NaN)."""
    total = jnp.sum(w)
    return jnp.sum(jnp.where(w != 0, x * w, 0.0)) / jnp.where(total != 0, total, 1.0)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
    """Mean of -log softmax(logits)[target] in float32, weighted by mask_BT when given (0 if it is all zero)."""
    nll = -token_logprobs(logits_BTV, targets_BT)
    if mask_BT is None:
        return jnp.mean(nll)
    return _weighted_mean(nll, mask_BT.astype(jnp.float32))


def target_weights(shape_BS: tuple[int, int], offset: int = 1, loss_mask_BS: jax.Array | None = None,
                   segment_ids_BS: jax.Array | None = None) -> jax.Array | None:
    """float32 [B, S - offset]: weight of "position i predicts token j = i + offset" (column i), or None when
    there is no mask: loss_mask[j], times [segment_ids[j] == segment_ids[i] != 0] with segment ids."""
    b, s = shape_BS
    if loss_mask_BS is None and segment_ids_BS is None:
        return None
    for name, a in (("loss_mask", loss_mask_BS), ("segment_ids", segment_ids_BS)):
        if a is not None and tuple(a.shape) != (b, s):
            raise ValueError(f"{name} has shape {tuple(a.shape)}, expected the tokens' shape {(b, s)}")
    w = jnp.ones((b, max(s - offset, 0)), jnp.float32)
    if loss_mask_BS is not None:
        w = w * loss_mask_BS[:, offset:].astype(jnp.float32)
    if segment_ids_BS is not None:
        target, source = segment_ids_BS[:, offset:], segment_ids_BS[:, :s - offset]
        w = jnp.where((target == source) & (target != 0), w, 0.0)
    return w


def next_token_loss(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """Main-model loss: position i predicts token i+1 (T-1 terms per sequence)."""
    return cross_entropy(logits_BTV[:, :-1], tokens_BT[:, 1:])


def mtp_loss(mtp_logits_DBTV: jax.Array, tokens_BS: jax.Array, weight: float | jax.Array = 1.0,
             loss_mask_BS: jax.Array | None = None, segment_ids_BS: jax.Array | None = None) -> jax.Array:
    """(lambda/D) sum_k L^k with L^k = -(1/T') sum_i log P^k_i[t_{i+1+k}] (eqs. 24-25).

    tokens_BS is the token window the logits were computed on, optionally with the next-token targets appended
    (S = T or T + 1). Module k (1-based) at position i predicts tokens[i+1+k]; as in eq. 24 the normaliser is the
    main model's prediction count T' = S - 1 per sequence, although module k has only T' - k terms.

    With a loss mask or segment ids ([B, S], as tokens_BS), term (k, i) is weighted by
    target_weights(offset=1+k) (its target's loss weight, zero across segments or on padding), and the normaliser
    is the main model's weighted prediction count, sum of target_weights(offset=1): the same count as the main
    cross-entropy's denominator, as T' is without masks. No target at all gives 0.
    """
    d, b, t, _ = mtp_logits_DBTV.shape
    s = tokens_BS.shape[1]
    masked = loss_mask_BS is not None or segment_ids_BS is not None
    if masked:
        count = jnp.sum(target_weights((b, s), 1, loss_mask_BS, segment_ids_BS))
        norm = jnp.where(count != 0, count, 1.0)
    else:
        norm = b * (s - 1)
    total = jnp.zeros((), jnp.float32)
    for k in range(1, d + 1):
        n = min(t, s - 1 - k)
        if n <= 0:
            continue
        logits = mtp_logits_DBTV[k - 1, :, :n].astype(jnp.float32)
        targets = tokens_BS[:, 1 + k:1 + k + n]
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        if masked:
            w = target_weights((b, s), 1 + k, loss_mask_BS, segment_ids_BS)[:, :n]
            nll = jnp.where(w != 0, nll * w, 0.0)
        total = total + jnp.sum(nll) / norm
    return weight * total / max(d, 1)


def sequence_balance_terms(scores_BTE: jax.Array, experts_BTK: jax.Array) -> jax.Array:
    """sum_i f_i P_i per sequence [B] (eqs. 18-20; multiply by alpha for L_Bal).

    f_i = E/(K T) * #{t : i routed at t} (the routed set, bias included), P_i = mean_t s_{i,t} / sum_j s_{j,t}.
    """
    _, t, e = scores_BTE.shape
    k = experts_BTK.shape[-1]
    s = scores_BTE.astype(jnp.float32)
    p_BE = jnp.mean(s / jnp.sum(s, axis=-1, keepdims=True), axis=1)
    hits_BE = jnp.sum(jax.nn.one_hot(experts_BTK, e, dtype=jnp.float32), axis=(1, 2))
    f_BE = hits_BE * (e / (k * t))
    return jnp.sum(jax.lax.stop_gradient(f_BE) * p_BE, axis=-1)


def expert_score_means(scores_TE: jax.Array) -> jax.Array:
    """P_i over the tokens of the leading axes: mean_t s_{i,t} / sum_j s_{j,t}, float32 [E]."""
    s = scores_TE.astype(jnp.float32)
    s = s / jnp.sum(s, axis=-1, keepdims=True)
    return jnp.mean(s.reshape(-1, s.shape[-1]), axis=0)


def balance_from_stats(hits_E: jax.Array, p_E: jax.Array) -> jax.Array:
    """sum_i f_i P_i from routed-token hits over N tokens (sum of hits = K N): f_i = E/(K N) hits_i = E hits_i /
    sum_j hits_j (no gradient through f); 0 when there are no hits."""
    e = hits_E.shape[-1]
    hits = hits_E.astype(jnp.float32)
    total = jnp.sum(hits, axis=-1, keepdims=True)
    f_E = jax.lax.stop_gradient(e * hits / jnp.where(total > 0, total, 1.0))
    return jnp.sum(f_E * p_E, axis=-1)


def batch_balance_terms(scores_TE: jax.Array, experts_TK: jax.Array) -> jax.Array:
    """Batch-wise sum_i f_i P_i (paper §4.5.3): eqs. 18-20 with f_i and P_i over all tokens of the batch instead
    of one sequence (scores [..., E], routed experts [..., K], the leading axes flattened)."""
    e = scores_TE.shape[-1]
    hits_E = jnp.sum(jax.nn.one_hot(experts_TK.reshape(-1), e, dtype=jnp.float32), axis=0)
    return balance_from_stats(hits_E, expert_score_means(scores_TE))


def sequence_balance_loss(scores_BTE: jax.Array, experts_BTK: jax.Array, alpha: float = 1e-4) -> jax.Array:
    """L_Bal = alpha * sum_i f_i P_i, averaged over the sequences of the batch."""
    return alpha * jnp.mean(sequence_balance_terms(scores_BTE, experts_BTK))


def distill_kl(student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array, mask_BT: jax.Array | None = None,
               temperature: float | jax.Array = 1.0) -> jax.Array:
    """KL(teacher || student) of the temperature-softened distributions, per position, mask-weighted mean (float32;
    0 when the mask is all zero). The teacher gets no gradient. Logit distillation scales it by temperature^2."""
    t = jnp.asarray(temperature, jnp.float32)
    log_s = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / t, axis=-1)
    log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits_BTV).astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    if mask_BT is None:
        return jnp.mean(kl)
    w = mask_BT.astype(jnp.float32)
    total = jnp.sum(w)
    return jnp.sum(jnp.where(w != 0, kl * w, 0.0)) / jnp.where(total != 0, total, 1.0)
