"""Transformer: stacked/scanned layers, causality through the whole model, the MTP logits against a direct
restatement of eqs. 21-23 for depth D = 2, and packed samples (segment ids) against the samples run alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import TINY
from dsv3_jax.model.norm import rms_norm
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.losses import cross_entropy, mtp_loss, target_weights
from dsv3_jax.model.transformer import Transformer, causal_mask, segment_mask, segment_positions

CFG = TINY.replace(num_mtp_layers=2, num_hidden_layers=3, first_k_dense_replace=1)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda m, t: m.forward(t))


def test_layers_are_stacked_with_logical_axes(model):
    m = model
    wq_b = m.moe_layers.attn.wq_b
    assert wq_b.shape == (2, CFG.q_lora_rank, CFG.num_attention_heads, CFG.qk_head_dim)
    assert wq_b.get_metadata()["out_sharding"] == ("layers", "q_lora", "heads", "qk_head")
    assert m.dense_layers.ffn.w_gate.shape == (1, CFG.hidden_size, CFG.intermediate_size)
    assert m.mtp.eh_proj.shape == (2, 2 * CFG.hidden_size, CFG.hidden_size)
    assert m.moe_layers.ffn.expert_bias.shape == (2, CFG.n_routed_experts)


def test_forward_shapes_and_counts(model, forward):
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.vocab_size)
    out = forward(model, tokens)
    assert out.logits.shape == (2, 12, CFG.vocab_size)
    assert out.mtp_logits.shape == (2, 2, 12, CFG.vocab_size)
    assert out.expert_counts.shape == (2, CFG.n_routed_experts)
    # every token reaches exactly K experts in every MoE layer: nothing dropped
    np.testing.assert_array_equal(np.asarray(out.expert_counts.sum(-1)), 2 * 12 * CFG.num_experts_per_tok)
    np.testing.assert_array_equal(np.asarray(out.mtp_expert_counts.sum(-1)), 2 * 12 * CFG.num_experts_per_tok)
    assert float(out.balance) > 0


def test_causal_through_the_model(model, forward):
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % CFG.vocab_size)
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_array_equal(np.asarray(a.logits[:, :9]), np.asarray(b.logits[:, :9]))
    # MTP module k at position i sees token i + k: positions < 9 - k are unaffected
    for k in (1, 2):
        np.testing.assert_array_equal(np.asarray(a.mtp_logits[k - 1, :, :9 - k]),
                                      np.asarray(b.mtp_logits[k - 1, :, :9 - k]))
        assert not np.allclose(np.asarray(a.mtp_logits[k - 1, :, 9 - k]), np.asarray(b.mtp_logits[k - 1, :, 9 - k]))


def _mtp_slice(m, k):
    graphdef, state = nnx.split(m.mtp)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[k], state))


def test_mtp_logits_equal_restated_equations(model, forward):
    m = model
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)
    out = forward(m, tokens)
    t = tokens.shape[1]
    emb = np.asarray(m.embed[...])
    head = np.asarray(m.head[...])
    h_prev = out.hidden  # h^0: the main model's normalised output
    for k in (1, 2):
        mod = _mtp_slice(m, k - 1)
        n = t - k  # positions 0..n-1 have t_{i+k}
        h_in = h_prev[:, :n]
        e = jnp.asarray(emb[np.asarray(tokens[:, k:k + n])])
        eps = CFG.rms_norm_eps
        cat = jnp.concatenate([rms_norm(e, mod.enorm.weight[...], eps), rms_norm(h_in, mod.hnorm.weight[...], eps)], -1)
        h_prime = cat @ mod.eh_proj[...]  # eq. 21 (embedding half first, as the released weights)
        cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(n), (2, n)), CFG)
        h_k, _, _ = mod.block(h_prime, cos, sin, causal_mask(n))  # eq. 22
        logits = np.asarray(rms_norm(h_k, mod.head_norm.weight[...], eps)) @ head  # eq. 23 (before softmax)
        np.testing.assert_allclose(np.asarray(out.mtp_logits[k - 1, :, :n]), logits, rtol=1e-5, atol=1e-5)
        h_prev = h_k


# ----- packed samples: segment ids -----

LENGTHS = ((5, 7, 3), (7, 4))  # two rows of packed samples, each with a padding tail (segment id 0)
PACKED_T = 18


def test_segment_positions_and_mask():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(np.asarray(segment_positions(seg)), [[0, 1, 2, 0, 1, 0, 0, 1]])
    mask = np.asarray(segment_mask(seg))[0]
    ref = np.array([[j <= i and seg[0, i] == seg[0, j] for j in range(8)] for i in range(8)])
    np.testing.assert_array_equal(mask, ref)


@pytest.fixture(scope="module")
def packed(model):
    """Packed rows run with segment ids, and every sample run alone (right-padded to T: causal, so its positions
    < n see only the sample; one compile), sharing one random token row per sample."""
    rng = np.random.default_rng(5)
    samples = [[rng.integers(0, CFG.vocab_size, n) for n in row] for row in LENGTHS]
    tokens = np.zeros((len(LENGTHS), PACKED_T), np.int32)
    seg = np.zeros((len(LENGTHS), PACKED_T), np.int32)
    for r, row in enumerate(samples):
        at = 0
        for s, x in enumerate(row):
            tokens[r, at:at + len(x)], seg[r, at:at + len(x)] = x, s + 1
            at += len(x)
        tokens[r, at:] = rng.integers(0, CFG.vocab_size, PACKED_T - at)  # padding tail: arbitrary tokens
    flat = [x for row in samples for x in row]
    alone = np.stack([np.pad(x, (0, PACKED_T - len(x))) for x in flat]).astype(np.int32)
    fwd = nnx.jit(lambda m, t, s: m.forward(t, segment_ids_BT=s))
    out = fwd(model, jnp.asarray(tokens), jnp.asarray(seg))
    out_alone = nnx.jit(lambda m, t: m.forward(t))(model, jnp.asarray(alone))
    return tokens, seg, samples, out, out_alone


def _sample_slices(samples):
    i = 0
    for r, row in enumerate(samples):
        at = 0
        for s, x in enumerate(row):
            yield i, r, s + 1, at, len(x)
            at, i = at + len(x), i + 1


def test_packed_samples_match_samples_run_alone(packed):
    """The acceptance test: position by position the same logits and MTP logits, the same per-sample CE and MTP CE
    (the packed row's losses restricted to one sample by a loss mask)."""
    tokens, seg, samples, out, out_alone = packed
    for i, r, s, at, n in _sample_slices(samples):
        np.testing.assert_allclose(np.asarray(out.logits[r, at:at + n]), np.asarray(out_alone.logits[i, :n]),
                                   rtol=1e-5, atol=1e-5)
        for k in (1, 2):  # positions with t_{i+k} inside the sample (the alone run's tail sees padding there)
            np.testing.assert_allclose(np.asarray(out.mtp_logits[k - 1, r, at:at + n - k]),
                                       np.asarray(out_alone.mtp_logits[k - 1, i, :n - k]), rtol=1e-5, atol=1e-5)
        only = jnp.asarray((seg[r:r + 1] == s).astype(np.float32))  # this sample's targets only
        row_tokens, row_seg = jnp.asarray(tokens[r:r + 1]), jnp.asarray(seg[r:r + 1])
        ce = cross_entropy(out.logits[r:r + 1, :-1], row_tokens[:, 1:],
                           target_weights(row_tokens.shape, 1, only, row_seg))
        alone_tokens = jnp.asarray(samples[r][s - 1])[None]
        ce_alone = cross_entropy(out_alone.logits[i:i + 1, :n - 1], alone_tokens[:, 1:])
        assert float(ce) == pytest.approx(float(ce_alone), rel=1e-5)
        mtp = mtp_loss(out.mtp_logits[:, r:r + 1], row_tokens, loss_mask_BS=only, segment_ids_BS=row_seg)
        mtp_alone = mtp_loss(out_alone.mtp_logits[:, i:i + 1, :n], alone_tokens)  # eq. 24's 1/(n-1) normaliser
        assert float(mtp) == pytest.approx(float(mtp_alone), rel=1e-5)


def test_segments_do_not_see_each_other(model, packed):
    """Changing the second sample of row 0 leaves the first sample's logits (main and MTP) bit-identical."""
    tokens, seg, samples, out, _ = packed
    n0 = len(samples[0][0])
    changed = tokens.copy()
    changed[0, n0:] = (changed[0, n0:] + 3) % CFG.vocab_size
    out2 = nnx.jit(lambda m, t, s: m.forward(t, segment_ids_BT=s))(model, jnp.asarray(changed), jnp.asarray(seg))
    np.testing.assert_array_equal(np.asarray(out2.logits[0, :n0]), np.asarray(out.logits[0, :n0]))
    np.testing.assert_array_equal(np.asarray(out2.mtp_logits[:, 0, :n0]), np.asarray(out.mtp_logits[:, 0, :n0]))
    assert not np.allclose(np.asarray(out2.logits[0, n0:]), np.asarray(out.logits[0, n0:]))
