"""Held-out evaluation's MaxVio figures (train/heldout.py): the global MaxVio over a set's expert counts and
MaxVio_batch (per evaluated micro-batch, averaged over micro-batches and layers), against NumPy restatements."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import TINY
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.train.heldout import Evaluator, set_metrics
from dsv3_jax.train.step import split_model


def np_max_vio(counts_LE: np.ndarray) -> np.ndarray:
    """Per layer: max_i load_i / mean_i load_i - 1."""
    c = np.asarray(counts_LE, np.float64)
    return c.max(-1) / c.mean(-1) - 1


def test_set_metrics_batch_and_global_max_vio():
    rng = np.random.default_rng(0)
    counts_NLE = rng.integers(0, 20, size=(3, 2, 8))
    counts_NLE[1, 0] = 5  # one perfectly balanced micro-batch in layer 0
    row = set_metrics(123.0, 60, counts_NLE)
    whole_LE = counts_NLE.sum(0)
    glob = np_max_vio(whole_LE).mean()
    batch = np.mean([np_max_vio(c) for c in counts_NLE])
    assert row["max_vio"] == pytest.approx(glob, rel=1e-6) and row["max_vio_global"] == row["max_vio"]
    assert row["max_vio_batch"] == pytest.approx(batch, rel=1e-6)
    assert row["max_vio_batch"] > row["max_vio_global"] + 0.05  # per-batch imbalance partly cancels over the set
    np.testing.assert_allclose(row["load"], whole_LE / whole_LE.sum(-1, keepdims=True), rtol=1e-6)
    assert row["ce"] == pytest.approx(123.0 / 60)
    assert "max_vio_batch" not in set_metrics(1.0, 4, np.zeros((2, 0, 0), np.int64))  # no MoE layers


def test_evaluator_max_vio_batch_uses_each_micro_batch_counts(tmp_path):
    model = Transformer(TINY, nnx.Rngs(0))
    graphdef, params, bias = split_model(model)
    rng = np.random.default_rng(1)
    windows = rng.integers(0, TINY.vocab_size, size=(3, 2, 17)).astype(np.int32)  # 3 micro-batches of 2 x 16
    ev = Evaluator(graphdef, {"a": windows}, every=0, stop=1, path=tmp_path / "eval.jsonl")
    row = ev.evaluate({"params": params, "bias": bias})["a"]
    counts_NLE = np.stack([np.asarray(model.forward(jnp.asarray(w[:, :-1]), mtp=False).expert_counts)
                           for w in windows])
    assert counts_NLE.shape == (3, TINY.num_hidden_layers - TINY.first_k_dense_replace, TINY.n_routed_experts)
    np.testing.assert_allclose(row["max_vio_batch"], np.mean([np_max_vio(c) for c in counts_NLE]), rtol=1e-5)
    np.testing.assert_allclose(row["max_vio_global"], np_max_vio(counts_NLE.sum(0)).mean(), rtol=1e-5)
    assert row["max_vio_batch"] >= row["max_vio_global"] and row["tokens"] == 3 * 2 * 16
