"""Transformer: stacked/scanned layers, causality through the whole model, and the MTP logits against a direct
restatement of eqs. 21-23 for depth D = 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import TINY
from dsv3_jax.model.norm import rms_norm
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.model.transformer import Transformer, causal_mask

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
        h_k, _ = mod.block(h_prime, cos, sin, causal_mask(n))  # eq. 22
        logits = np.asarray(rms_norm(h_k, mod.head_norm.weight[...], eps)) @ head  # eq. 23 (before softmax)
        np.testing.assert_allclose(np.asarray(out.mtp_logits[k - 1, :, :n]), logits, rtol=1e-5, atol=1e-5)
        h_prev = h_k
