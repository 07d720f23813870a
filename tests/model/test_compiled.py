"""Compiled-by-default model calls (dsv3_jax/model/compiled.py): the compiled call against the op-by-op body
(`jax.disable_jit()`) and the traced body (inside nnx.jit), current parameters seen, one compile per shape, and the
plain body under an outer trace."""

import jax
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import TINY
from dsv3_jax.model import compiled
from dsv3_jax.model.transformer import Transformer

CFG = TINY.replace(num_hidden_layers=2, first_k_dense_replace=1, num_mtp_layers=1)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(0), (2, 6), 0, CFG.vocab_size)


def _compiles() -> int:
    return compiled._apply._cache_size()


def test_compiled_equals_eager_and_traced(model, tokens):
    out = model.forward(tokens)
    traced = nnx.jit(lambda m, t: m.forward(t))(model, tokens)
    for name in ("logits", "mtp_logits", "expert_counts", "balance", "hidden"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), np.asarray(getattr(traced, name)), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
    with jax.disable_jit():  # the documented debugging mode: the body op by op, no compiled program
        before = _compiles()
        eager = model(tokens[:1])
        assert _compiles() == before
    np.testing.assert_allclose(np.asarray(eager), np.asarray(out.logits[:1]), rtol=1e-5, atol=1e-5)


def test_second_call_does_not_recompile_and_sees_new_parameters(model, tokens):
    logits = model(tokens)
    n = _compiles()
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(logits))
    old = model.embed[...]
    try:
        model.embed[...] = old * 2.0  # a notebook editing a weight in place
        changed = model(tokens)
        assert _compiles() == n  # same structure and shapes: the cached program, with the new parameters
        expected = nnx.jit(lambda m, t: m(t))(model, tokens)
        assert not np.allclose(np.asarray(changed), np.asarray(logits))
        np.testing.assert_allclose(np.asarray(changed), np.asarray(expected), rtol=1e-5, atol=1e-5)
    finally:
        model.embed[...] = old
    # a second model of the same config shares the program; a new shape or flag compiles once more
    other = Transformer(CFG, nnx.Rngs(1))
    other(tokens)
    assert _compiles() == n
    model(tokens[:1])
    assert _compiles() == n + 1


def test_under_an_outer_trace_the_plain_body_runs(model, tokens):
    model(tokens)
    n = _compiles()
    step = jax.jit(lambda t: model.forward(t, mtp=False).logits)  # tokens traced: no nested compiled call
    np.testing.assert_allclose(np.asarray(step(tokens)), np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens))(state)  # parameters traced, tokens concrete
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)
    assert _compiles() == n
