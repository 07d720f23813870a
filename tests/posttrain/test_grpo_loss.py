"""grpo_loss against a NumPy restatement of eqs. 26-28 (per-token form), its gradient, the group advantages and the
masked MTP loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.posttrain import grpo_loss
from dsv3_jax.posttrain.grpo import group_advantages, grpo_terms, masked_mtp_loss


def numpy_grpo_loss(new, old, ref, adv, mask, eps, beta):
    """Eqs. 26-28 token by token in float64: per-sequence mean over its completion tokens, mean over sequences."""
    objectives = []
    for b in range(new.shape[0]):
        terms = []
        for t in range(new.shape[1]):
            if not mask[b, t]:
                continue
            r = np.exp(float(new[b, t]) - float(old[b, t]))
            surrogate = min(r * adv[b], min(max(r, 1 - eps), 1 + eps) * adv[b])
            q = np.exp(float(ref[b, t]) - float(new[b, t]))  # pi_ref / pi_theta
            terms.append(surrogate - beta * (q - np.log(q) - 1))
        objectives.append(np.mean(terms) if terms else 0.0)
    return -np.mean(objectives)


def _case(shape, seed, spread):
    rng = np.random.default_rng(seed)
    b, t = shape
    old = rng.uniform(-4.0, -0.1, shape).astype(np.float32)
    new = (old + rng.uniform(-spread, spread, shape)).astype(np.float32)
    ref = (old + rng.uniform(-spread, spread, shape)).astype(np.float32)
    adv = rng.normal(size=b).astype(np.float32)
    mask = (rng.uniform(size=shape) < 0.7).astype(np.float32)
    mask[-1] = 0.0  # an empty row (a prompt-only sequence) contributes 0
    if b > 1:
        mask[0, 0] = 1.0
    # padding past the completion holds garbage that must not leak (exp(80) overflows float32)
    new = np.where(mask > 0, new, 80.0).astype(np.float32)
    old = np.where(mask > 0, old, -80.0).astype(np.float32)
    return new, old, ref, adv, mask


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 17)])
@pytest.mark.parametrize("eps, clipping", [(0.02, True), (0.99, False)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_numpy_restatement(shape, eps, clipping, beta):
    new, old, ref, adv, mask = _case(shape, seed=shape[1] + int(100 * eps), spread=0.5)
    stats = grpo_terms(new, old, ref, adv, mask, eps, beta)
    want = numpy_grpo_loss(new, old, ref, adv, mask, eps, beta)
    np.testing.assert_allclose(float(grpo_loss(new, old, ref, adv, mask, eps, beta)), want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(float(stats.loss))
    if shape[0] > 1:  # a non-empty batch: the chosen eps must really (not) clip
        assert (float(stats.clip_frac) > 0) == clipping
    if shape == (1, 1):  # the only row is empty
        assert float(stats.loss) == 0.0


def test_gradient_sign_and_value():
    new, old, ref, adv, mask = _case((3, 6), seed=1, spread=0.0)  # ratio 1: nothing clipped
    adv = np.array([1.5, -0.7, 2.0], np.float32)
    grad = jax.grad(grpo_loss)(jnp.asarray(new), old, ref, adv, mask, 0.2, 0.04)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[mask == 0] == 0)
    b, t = 0, 0  # a completion token of a positive-advantage row: raising its log-prob lowers the loss
    assert mask[b, t] == 1 and grad[b, t] < 0
    assert np.all(np.asarray(grad)[1][mask[1] > 0] > 0)  # negative advantage: the other way
    bumped = new.copy()
    bumped[b, t] += 1e-2
    assert float(grpo_loss(bumped, old, ref, adv, mask, 0.2, 0.04)) < float(grpo_loss(new, old, ref, adv, mask,
                                                                                       0.2, 0.04))
    # at ratio 1 and new == ref, d loss / d logp_new[b, t] = -A_b / n_b (the KL term has zero slope there)
    np.testing.assert_allclose(float(grad[b, t]), -adv[b] / mask[b].sum() / 3, rtol=1e-5)


def test_clipped_tokens_have_no_policy_gradient():
    old = np.zeros((1, 2), np.float32)
    new = np.log(np.array([[1.5, 0.5]], np.float32))  # r = 1.5 (clipped for A > 0), r = 0.5 (not: min keeps it)
    grad = jax.grad(grpo_loss)(jnp.asarray(new), old, new, np.array([1.0], np.float32), np.ones((1, 2)), 0.2, 0.0)
    assert float(grad[0, 0]) == 0.0 and float(grad[0, 1]) < 0


def test_group_advantages():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 0.0]])
    adv = group_advantages(rewards)
    for row, a in zip(rewards, adv):
        np.testing.assert_allclose(a, (row - row.mean()) / (row.std() + 1e-4), rtol=1e-6)
    assert np.all(adv[1] == 0)  # equal rewards: zero advantages, no NaN
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-3)
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        group_advantages(np.zeros(4))


def test_masked_mtp_loss():
    rng = np.random.default_rng(0)
    d, b, s, v = 2, 2, 7, 5
    logits = rng.normal(size=(d, b, s - 1, v)).astype(np.float32)
    tokens = rng.integers(0, v, (b, s))
    mask = np.zeros((b, s), np.float32)
    mask[:, 3:6] = 1
    want = 0.0
    for k in range(1, d + 1):
        nll, n = 0.0, 0
        for row in range(b):
            for i in range(s - 1 - k):
                if mask[row, i + 1 + k]:
                    lp = logits[k - 1, row, i] - np.log(np.sum(np.exp(logits[k - 1, row, i])))
                    nll -= lp[tokens[row, i + 1 + k]]
                    n += 1
        want += nll / n
    np.testing.assert_allclose(float(masked_mtp_loss(logits, tokens, mask)), want / d, rtol=1e-5)
