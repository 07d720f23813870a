"""Losses and balancing against NumPy restatements and hand-computed toy loads (reference §7, §14 item 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.balance import max_violation, update_expert_bias
from dsv3_jax.losses import (cross_entropy, mtp_loss, next_token_loss, sequence_balance_loss, sequence_balance_terms,
                             target_weights)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5))
    ref = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), targets[..., None], -1).mean()
    assert float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets))) == pytest.approx(ref, rel=1e-6)
    mask = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    nll = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
    assert float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))) == pytest.approx(
        (nll * mask).sum() / 3, rel=1e-6)
    tokens = rng.integers(0, 11, (2, 6))
    full = rng.standard_normal((2, 6, 11)).astype(np.float32)
    assert float(next_token_loss(jnp.asarray(full), jnp.asarray(tokens))) == pytest.approx(
        float(cross_entropy(jnp.asarray(full[:, :-1]), jnp.asarray(tokens[:, 1:]))))


def test_mtp_loss_eq_24_25():
    rng = np.random.default_rng(1)
    d, b, t, v = 2, 2, 7, 5
    logits = rng.standard_normal((d, b, t, v))
    tokens = rng.integers(0, v, (b, t))
    lam = 0.3
    total = 0.0
    for k in (1, 2):
        lp = _log_softmax(logits[k - 1])
        terms = [lp[bb, i, tokens[bb, i + 1 + k]] for bb in range(b) for i in range(t - 1 - k)]
        total += -np.sum(terms) / (b * (t - 1))  # 1/T normaliser with T-k terms (eq. 24)
    ref = lam / d * total
    got = float(mtp_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), lam))
    assert got == pytest.approx(ref, rel=1e-5)


def _np_target_weights(loss_mask, seg, offset):
    b, s = seg.shape
    return np.array([[loss_mask[r, i + offset] * (seg[r, i + offset] == seg[r, i] != 0) for i in range(s - offset)]
                     for r in range(b)], np.float64)


@pytest.fixture(scope="module")
def packed_case():
    """Two rows of S = 10: packed samples with a padding tail, a loss mask that switches some targets off."""
    rng = np.random.default_rng(2)
    d, b, s, v = 2, 2, 10, 7
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 3, 3, 3, 3]])
    loss_mask = (rng.random((b, s)) > 0.3).astype(np.float32)
    loss_mask[0, 5:7] = 1.0
    return (rng.standard_normal((d, b, s - 1, v)).astype(np.float32), rng.integers(0, v, (b, s)), loss_mask, seg)


def test_target_weights_restated(packed_case):
    _, tokens, loss_mask, seg = packed_case
    for offset in (1, 2, 3):
        got = target_weights(tokens.shape, offset, jnp.asarray(loss_mask), jnp.asarray(seg))
        np.testing.assert_array_equal(np.asarray(got), _np_target_weights(loss_mask, seg, offset))
    assert target_weights(tokens.shape, 1) is None
    with pytest.raises(ValueError, match="segment_ids has shape"):
        target_weights(tokens.shape, 1, None, jnp.asarray(seg[:, :-1]))


def test_masked_losses_restated(packed_case):
    """Masked CE and MTP loss against NumPy: weighted sums over the main model's weighted target count."""
    logits, tokens, loss_mask, seg = packed_case
    d, b, t, _ = logits.shape
    lp = _log_softmax(logits.astype(np.float64))
    w1 = _np_target_weights(loss_mask, seg, 1)
    nll0 = -np.take_along_axis(lp[0], tokens[:, 1:, None], -1)[..., 0]
    ce = cross_entropy(jnp.asarray(logits[0]), jnp.asarray(tokens[:, 1:]), target_weights(
        tokens.shape, 1, jnp.asarray(loss_mask), jnp.asarray(seg)))
    assert float(ce) == pytest.approx((nll0 * w1).sum() / w1.sum(), rel=1e-6)
    total = 0.0
    for k in (1, 2):
        wk = _np_target_weights(loss_mask, seg, 1 + k)
        n = t - k
        nll = -np.take_along_axis(lp[k - 1, :, :n], tokens[:, 1 + k:, None], -1)[..., 0]
        total += (nll * wk).sum() / w1.sum()
    got = mtp_loss(jnp.asarray(logits), jnp.asarray(tokens), 0.3, jnp.asarray(loss_mask), jnp.asarray(seg))
    assert float(got) == pytest.approx(0.3 / d * total, rel=1e-5)


def test_masked_out_targets_do_not_count(packed_case):
    """A target whose weight is 0 (loss mask off, another segment, or padding) can change without moving the loss;
    no target at all gives 0, not NaN; an all-ones mask in one segment gives exactly the unmasked losses."""
    logits, tokens, loss_mask, seg = packed_case
    lm, sg = jnp.asarray(loss_mask), jnp.asarray(seg)
    off = (loss_mask == 0) | (seg == 0)  # targets with weight 0 for every head (main and MTP)
    off[:, 0] = False
    assert off.sum() >= 5
    changed = np.where(off, (tokens + 1) % logits.shape[-1], tokens)
    for fn in (lambda tok: cross_entropy(jnp.asarray(logits[0]), jnp.asarray(tok[:, 1:]),
                                         target_weights(tok.shape, 1, lm, sg)),
               lambda tok: mtp_loss(jnp.asarray(logits), jnp.asarray(tok), 0.3, lm, sg)):
        assert float(fn(changed)) == float(fn(tokens))
        assert float(fn(np.where(off, tokens, (tokens + 1) % logits.shape[-1]))) != float(fn(tokens))
    zero = jnp.zeros(tokens.shape, jnp.float32)
    assert float(cross_entropy(jnp.asarray(logits[0]), jnp.asarray(tokens[:, 1:]), zero[:, 1:])) == 0.0
    assert float(mtp_loss(jnp.asarray(logits), jnp.asarray(tokens), 1.0, zero, sg)) == 0.0
    ones, one_seg = jnp.ones(tokens.shape, jnp.float32), jnp.ones(tokens.shape, jnp.int32)
    assert float(mtp_loss(jnp.asarray(logits), jnp.asarray(tokens), 0.3, ones, one_seg)) == pytest.approx(
        float(mtp_loss(jnp.asarray(logits), jnp.asarray(tokens), 0.3)), rel=1e-6)
    assert float(cross_entropy(jnp.asarray(logits[0]), jnp.asarray(tokens[:, 1:]),
                               target_weights(tokens.shape, 1, ones, one_seg))) == pytest.approx(
        float(cross_entropy(jnp.asarray(logits[0]), jnp.asarray(tokens[:, 1:]))), rel=1e-6)


def test_sequence_balance_loss_toy():
    # one sequence, T=2 tokens, E=4, K=1; token 0 -> expert 0, token 1 -> expert 0
    scores = np.array([[[0.8, 0.2, 0.5, 0.5], [0.6, 0.2, 0.1, 0.1]]], np.float32)
    experts = np.array([[[0], [0]]])
    s_norm = scores[0] / scores[0].sum(-1, keepdims=True)
    p = s_norm.mean(0)
    f = np.array([4 / (1 * 2) * 2, 0, 0, 0])  # E/(K T) * count
    expected = (f * p).sum()
    assert float(sequence_balance_terms(jnp.asarray(scores), jnp.asarray(experts))[0]) == pytest.approx(expected, rel=1e-6)
    assert float(sequence_balance_loss(jnp.asarray(scores), jnp.asarray(experts), alpha=1e-4)) == pytest.approx(
        1e-4 * expected, rel=1e-6)
    # perfectly balanced routing with uniform scores gives the minimum, 1
    uni = np.full((1, 4, 4), 0.5, np.float32)
    bal = np.arange(4).reshape(1, 4, 1)
    assert float(sequence_balance_terms(jnp.asarray(uni), jnp.asarray(bal))[0]) == pytest.approx(1.0)


def test_expert_bias_sign_rule():
    bias = jnp.array([[0.0, 0.1, -0.2, 0.0]])
    counts = jnp.array([[10, 2, 4, 4]])  # mean 5: expert 0 over, others under
    new = update_expert_bias(bias, counts, 0.001)
    np.testing.assert_allclose(np.asarray(new), [[-0.001, 0.101, -0.199, 0.001]], rtol=1e-6)
    same = update_expert_bias(bias, jnp.array([[5, 5, 5, 5]]), 0.001)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(bias))
    assert update_expert_bias(bias.astype(jnp.float32), counts, 0.0).dtype == jnp.float32


def test_max_violation_constructed_loads():
    counts = jnp.array([[4, 4, 4, 4], [8, 0, 4, 4], [16, 0, 0, 0]])
    np.testing.assert_allclose(np.asarray(max_violation(counts)), [0.0, 1.0, 3.0])
    assert float(max_violation(jnp.zeros((4,)))) == 0.0


def test_balance_loss_gradient_reaches_scores_only():
    scores = jnp.asarray(np.random.default_rng(2).uniform(0.1, 0.9, (2, 5, 6)), jnp.float32)
    experts = jnp.asarray(np.random.default_rng(3).integers(0, 6, (2, 5, 2)))
    g = jax.grad(lambda s: sequence_balance_loss(s, experts))(scores)
    assert float(jnp.abs(g).sum()) > 0
