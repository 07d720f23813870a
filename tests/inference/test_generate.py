"""Generation over the latent cache: greedy tokens equal transformers' greedy generate on a checkpoint saved by
transformers; batched prompts of different lengths equal one-by-one generation; sampling controls."""

import numpy as np
import pytest
import torch

import dsv3_jax
from dsv3_jax.inference.generate import generate_text
from tests import hf_reference as ref


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = ref.build_hf_model()
    path = tmp_path_factory.mktemp("hf")
    ref.save_hf(hf, str(path))
    return hf, dsv3_jax.from_pretrained(path)


def test_greedy_matches_transformers(models):
    hf, m = models
    prompt = np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 7)).astype(np.int32)
    ours = m.generate(prompt, max_new_tokens=12)
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor(prompt, dtype=torch.long), attention_mask=torch.ones(2, 7),
                             max_new_tokens=12, min_new_tokens=12, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_different_prompt_lengths_in_one_batch(models):
    _, m = models
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 96, 4).astype(np.int32), rng.integers(0, 96, 9).astype(np.int32)
    batch = np.zeros((2, 9), np.int32)
    batch[0, :4], batch[1] = a, b
    out = m.generate(batch, 6, prompt_lengths=[4, 9])
    np.testing.assert_array_equal(out[0, :10], m.generate(a[None], 6)[0])
    np.testing.assert_array_equal(out[1], m.generate(b[None], 6)[0])


def test_stop_tokens_and_streaming(models):
    _, m = models
    prompt = np.random.default_rng(2).integers(0, 96, (1, 5)).astype(np.int32)
    free = m.generate(prompt, 8)
    stop = int(free[0, 7])  # the third generated token
    seen = []
    out = m.generate(prompt, 8, stop_tokens=[stop], callback=lambda i, tok: seen.append(int(tok[0])))
    first = 5 + int(np.argmax(free[0, 5:] == stop))
    np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first:] == stop).all()
    assert seen == list(free[0, 5:first + 1])


class _CharTokenizer:
    """Characters ' '..'}' as ids 2..95 of the reference model's 96-id vocabulary; BOS 0."""

    bos_id = 0

    def __init__(self, eos_id):
        self.eos_id = eos_id

    def encode(self, text):
        return [ord(c) - 30 for c in text]

    def decode(self, ids):
        return "".join(chr(int(i) + 30) for i in ids)


def test_generate_text_is_greedy_generate(models):
    """The end-of-run sample (generate_text: bucketed generate_batched) equals plain greedy generate on the exact
    prompt, cut at EOS and at the end of the context."""
    _, m = models
    prompt = "def f(x):"
    ids = np.asarray([[0] + [ord(c) - 30 for c in prompt]], np.int32)
    free = [int(t) for t in m.generate(ids, 8)[0, ids.shape[1]:]]
    unused = next(t for t in range(96) if t not in free)
    assert generate_text(m, _CharTokenizer(unused), prompt, 8) == prompt + _CharTokenizer(None).decode(free)
    stop = free[3]
    cut = free[:free.index(stop)]
    assert generate_text(m, _CharTokenizer(stop), prompt, 8) == prompt + _CharTokenizer(None).decode(cut)
    long = "x" * 124  # BOS + 124 tokens: 3 positions of the 128-token context are left
    ids = np.asarray([[0] + [ord("x") - 30] * 124], np.int32)
    tail = m.generate(ids, 3)[0, 125:]
    assert generate_text(m, _CharTokenizer(None), long, 8) == long + _CharTokenizer(None).decode(tail)


def test_sampling_controls(models):
    _, m = models
    prompt = np.random.default_rng(3).integers(0, 96, (2, 5)).astype(np.int32)
    greedy = m.generate(prompt, 6)
    np.testing.assert_array_equal(m.generate(prompt, 6, temperature=1.0, top_k=1), greedy)
    np.testing.assert_array_equal(m.generate(prompt, 6, temperature=0.7, top_p=1e-6), greedy)
    a = m.generate(prompt, 6, temperature=1.5, seed=4)
    np.testing.assert_array_equal(a, m.generate(prompt, 6, temperature=1.5, seed=4))
    assert not all(np.array_equal(a, m.generate(prompt, 6, temperature=1.5, seed=s)) for s in range(5, 9))


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=1000), "exceeds max_position_embeddings 128"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature must be >= 0"),
    (dict(max_new_tokens=2, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=2, prompt_lengths=[0, 3]), "prompt_lengths must be in"),
])
def test_bad_generation_arguments(models, kw, match):
    _, m = models
    with pytest.raises(ValueError, match=match):
        m.generate(np.zeros((2, 3), np.int32), **kw)
