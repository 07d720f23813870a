"""Router golden cases (reference §4, §14 item 3): hand-built affinities with the router weight = identity, so the
router logits are the token vectors themselves."""

import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.experts import route

E = 8


def _cfg(**kw):
    base = dict(hidden_size=E, n_routed_experts=E, num_experts_per_tok=2, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, scoring_func="sigmoid", expert_bias=True, norm_topk_prob=True)
    return ModelConfig(**{**base, **kw})


def _route_scores(scores, bias=None, **kw):
    """Route one token whose sigmoid affinities are `scores` (logit = log(s/(1-s)))."""
    s = np.asarray(scores, np.float64)
    logits = np.log(s / (1 - s))[None].astype(np.float32)
    b = None if bias is None else jnp.asarray(bias, jnp.float32)
    r = route(jnp.asarray(logits), jnp.eye(E, dtype=jnp.float32), b, _cfg(**kw))
    return np.asarray(r.experts_TK[0]), np.asarray(r.weights_TK[0]), np.asarray(r.scores_TE[0])


def test_group_score_is_top2_sum():
    # groups (pairs): g0=(0.9, 0.1) sum 1.0, g1=(0.6, 0.6) sum 1.2, g2=(0.55,0.55) 1.1, g3=(0.2,0.2)
    # max-score would keep g0 and g1; the top-2 sum keeps g1 and g2, so expert 0 (0.9, the best) is NOT chosen
    scores = [0.9, 0.1, 0.6, 0.6, 0.55, 0.55, 0.2, 0.2]
    experts, _, _ = _route_scores(scores, bias=np.zeros(E))
    assert sorted(experts) == [2, 3]


def test_without_bias_group_score_is_max():
    scores = [0.9, 0.1, 0.6, 0.6, 0.55, 0.55, 0.2, 0.2]
    experts, _, _ = _route_scores(scores, bias=None, expert_bias=False)
    assert sorted(experts) == [0, 2]


def test_masked_groups_use_minus_inf():
    # the bias makes every expert of the kept groups negative; a 0.0 mask would pick masked experts instead
    scores = [0.5] * E
    bias = np.array([-0.6, -0.6, -0.55, -0.7, -0.9, -0.9, -0.9, -0.9])
    experts, _, _ = _route_scores(scores, bias=bias, topk_group=1, n_group=4)
    assert sorted(experts) == [0, 1]  # group 0 (sum -0.2) wins; its two experts are chosen despite negative scores


def test_bias_selects_weights_use_unbiased_scores():
    scores = [0.9, 0.8, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1]
    experts, w, _ = _route_scores(scores, bias=np.zeros(E), n_group=1, topk_group=1)
    assert sorted(experts) == [0, 1]
    bias = np.array([0, -0.7, 0.0, 0.0, 0, 0, 0, 0])  # flips expert 1 out, expert 2 in
    experts, w, s = _route_scores(scores, bias=bias, n_group=1, topk_group=1)
    assert sorted(experts) == [0, 2]
    expect = np.array([0.9, 0.3]) / 1.2 * 2.5  # renormalised UNBIASED scores times route scale
    np.testing.assert_allclose(w[np.argsort(experts)], expect, rtol=1e-5)
    assert w.sum() == pytest.approx(2.5, rel=1e-6)


def test_no_renormalisation_when_norm_topk_prob_false():
    scores = [0.9, 0.8, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1]
    experts, w, _ = _route_scores(scores, bias=np.zeros(E), n_group=1, topk_group=1, norm_topk_prob=False)
    np.testing.assert_allclose(np.sort(w), np.sort([0.9 * 2.5, 0.8 * 2.5]), rtol=1e-5)


def test_softmax_scoring_v2_style():
    logits = np.array([[2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 0.2, 0.1]], np.float32)
    cfg = _cfg(scoring_func="softmax", expert_bias=False, norm_topk_prob=False, n_group=1, topk_group=1,
               routed_scaling_factor=1.0)
    r = route(jnp.asarray(logits), jnp.eye(E, dtype=jnp.float32), None, cfg)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert sorted(np.asarray(r.experts_TK[0])) == [0, 3]
    np.testing.assert_allclose(np.sort(np.asarray(r.weights_TK[0])), np.sort(p[[0, 3]]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.scores_TE[0]), p, rtol=1e-6)
