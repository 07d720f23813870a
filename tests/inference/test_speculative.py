"""MTP speculative decoding: greedy output equals plain greedy (also on a checkpoint with an MTP layer saved in
the transformers layout), the sampling acceptance rule preserves the main model's distribution, and a model
without MTP modules is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax
from dsv3_jax.inference.speculative import speculative_generate
from tests import hf_reference as ref


@pytest.fixture(scope="module")
def tiny_model():
    cfg = dsv3_jax.get_preset("tiny").replace(initializer_range=0.2)
    m = dsv3_jax.Transformer(cfg, nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 6)).astype(np.int32)
    return m, prompt, m.generate(prompt, 10, prompt_lengths=[6, 3, 5])


def test_greedy_speculative_equals_plain_greedy(tiny_model):
    m, prompt, plain = tiny_model
    spec, stats = speculative_generate(m, prompt, 10, prompt_lengths=[6, 3, 5], return_stats=True)
    np.testing.assert_array_equal(spec, plain)
    assert stats.new_tokens == 30 and stats.drafted > 0
    assert stats.forwards - 1 >= 10 / 2 and stats.drafted <= 3 * (stats.forwards - 1)


def test_greedy_speculative_stops_rows_where_plain_greedy_does(tiny_model):
    m, prompt, plain = tiny_model
    stop = int(plain[1, 3 + 3])  # row 1's fourth new token: that row ends early, the others may run on
    expected = m.generate(prompt, 10, prompt_lengths=[6, 3, 5], stop_tokens=[stop])
    spec, stats = speculative_generate(m, prompt, 10, prompt_lengths=[6, 3, 5], stop_tokens=[stop],
                                       return_stats=True)
    np.testing.assert_array_equal(spec, expected)
    assert np.all(spec[1, 6:13] == stop)
    counted = sum(min(list(r[n:n + 10]).index(stop) + 1 if stop in r[n:n + 10] else 10, 10)
                  for r, n in zip(spec, [6, 3, 5]))
    assert stats.new_tokens == counted < 30


def test_greedy_speculative_on_checkpoint_with_mtp_layer(tmp_path):
    hf = ref.build_hf_model()
    ref.save_hf(hf, str(tmp_path))
    mtp = ref.HFMTPReference(hf, {})
    ref.add_tensors_as_shard(str(tmp_path), mtp.tensors(), "model-mtp.safetensors", {"num_nextn_predict_layers": 1})
    m = dsv3_jax.from_pretrained(tmp_path)
    prompt = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 7)).astype(np.int32)
    np.testing.assert_array_equal(m.generate(prompt, 12, speculative=True), m.generate(prompt, 12))


def test_model_without_mtp_is_refused():
    cfg = dsv3_jax.get_preset("tiny").replace(num_mtp_layers=0)
    m = dsv3_jax.Transformer(cfg, nnx.Rngs(0))
    with pytest.raises(ValueError, match="speculative decoding needs an MTP module"):
        m.generate(np.zeros((1, 3), np.int32), 4, speculative=True)


def test_sampling_acceptance_rule_preserves_the_main_distribution():
    # vocabulary of 16: the joint law of the first two sampled tokens is enumerable exactly
    cfg = dsv3_jax.get_preset("tiny").replace(vocab_size=16, initializer_range=0.3, bos_token_id=None,
                                              eos_token_id=None)
    m = dsv3_jax.Transformer(cfg, nnx.Rngs(3))
    prompt = np.array([3, 7, 1, 12], np.int32)
    n = 6000
    out, stats = speculative_generate(m, np.tile(prompt, (n, 1)), 2, temperature=1.0, seed=5, return_stats=True)
    assert 0 < stats.accepted < stats.drafted  # both branches of the rule were taken
    forward = nnx.jit(lambda m, t: m(t))
    p1 = np.asarray(jax.nn.softmax(forward(m, jnp.asarray(prompt[None]))[0, -1]), np.float64)
    cont = np.concatenate([np.tile(prompt, (16, 1)), np.arange(16, dtype=np.int32)[:, None]], axis=1)
    p2 = np.asarray(jax.nn.softmax(forward(m, jnp.asarray(cont))[:, -1], axis=-1), np.float64)
    expected = (p1[:, None] * p2).ravel() * n  # joint of (x1, x2) under plain sampling from the main model
    observed = np.bincount(out[:, 4] * 16 + out[:, 5], minlength=256)
    keep = expected > 5  # chi-square over the well-populated cells, the rest pooled
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    chi2 = np.sum((obs - exp) ** 2 / exp)
    dof = len(obs) - 1
    # p < 1e-4 threshold: mean dof, sd sqrt(2 dof); 5 sd above the mean
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)
    # the MTP draft distribution alone is visibly different (the test could fail)
    assert stats.acceptance_rate < 0.99
