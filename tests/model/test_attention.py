"""MHA/GQA (dsv3_jax/model/attention.py): the module against a plain NumPy restatement (head sharing, RoPE on the
whole head, YaRN's softmax factor), cached greedy decoding against the full forward, one training step per
attention kind, and the config errors (unknown kind, kv heads, MLA-only use, no released checkpoint layout)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv3_jax.config import TINY, ModelConfig
from dsv3_jax.hf import from_pretrained, save_pretrained
from dsv3_jax.inference.cache import KVCache, cache_bytes_per_token, init_cache
from dsv3_jax.inference.generate import generate
from dsv3_jax.model.attention import GQA
from dsv3_jax.model.params import values
from dsv3_jax.model.rope import rope_cos_sin, rope_inv_freq
from dsv3_jax.model.transformer import Transformer, causal_mask
from dsv3_jax.train.step import StepConfig, init_state, make_train_step, split_model

SMALL_ATTN = dict(hidden_size=32, num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2)
GQA_YARN = ModelConfig(**SMALL_ATTN, attention="gqa", num_key_value_heads=2, head_dim=8, rope_factor=4.0,
                       rope_original_max_position_embeddings=8)
MHA_DEFAULT = ModelConfig(**SMALL_ATTN, attention="mha", head_dim=6, rope_type="default", rope_theta=500.0)
MODEL = TINY.replace(num_hidden_layers=2, first_k_dense_replace=2, num_mtp_layers=0, initializer_range=0.1,
                     max_position_embeddings=64)
VARIANTS = {"mha": MODEL.replace(attention="mha"), "gqa": MODEL.replace(attention="gqa", num_key_value_heads=2)}


def _rope_np(x_TK, pos_T, inv_freq):
    """Interleaved pairs (2j, 2j+1) as complex numbers times e^{i pos f_j}."""
    z = (x_TK[..., 0::2] + 1j * x_TK[..., 1::2]) * np.exp(1j * pos_T[:, None] * inv_freq)
    out = np.empty_like(x_TK)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


@pytest.mark.parametrize("cfg", [GQA_YARN, MHA_DEFAULT], ids=["gqa_yarn", "mha_default_rope"])
def test_matches_numpy_restatement(cfg):
    attn = GQA(cfg, jnp.float32, nnx.Rngs(1))
    b, t = 2, 9
    x = jax.random.normal(jax.random.key(0), (b, t, cfg.hidden_size))
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(t), (b, t)), cfg)
    y = np.asarray(attn(x, cos, sin, causal_mask(t)))
    p = {k: np.asarray(v, np.float64) for k, v in values(attn).items()}
    h, k = cfg.num_attention_heads, 8 if cfg is GQA_YARN else 6
    g = 2 if cfg is GQA_YARN else h
    assert p["wk"].shape == (cfg.hidden_size, g, k) and p["wq"].shape == (cfg.hidden_size, h, k)
    if cfg.uses_yarn:  # the YaRN blend is test_rope's; here its width (the whole head) and the softmax factor
        inv_freq = rope_inv_freq(cfg).astype(np.float64)
        assert inv_freq.shape == (k // 2,)
        scale = k ** -0.5 * (0.1 * math.log(cfg.rope_factor) + 1) ** 2
    else:
        inv_freq = cfg.rope_theta ** (-np.arange(0, k, 2) / k)
        scale = k ** -0.5
    pos = np.arange(t, dtype=np.float64)
    for row in range(b):
        xs = np.asarray(x, np.float64)[row]
        out = np.zeros((t, h, k))
        for hh in range(h):
            kv_head = hh // (h // g)  # consecutive query heads share a key/value head
            q = _rope_np(xs @ p["wq"][:, hh], pos, inv_freq)
            key = _rope_np(xs @ p["wk"][:, kv_head], pos, inv_freq)
            v = xs @ p["wv"][:, kv_head]
            for i in range(t):
                s = key[: i + 1] @ q[i] * scale
                a = np.exp(s - s.max())
                out[i, hh] = (a / a.sum()) @ v[: i + 1]
        ref = np.einsum("thk,hkd->td", out, p["wo"])
        np.testing.assert_allclose(y[row], ref, rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_model(request):
    cfg = VARIANTS[request.param]
    return request.param, Transformer(cfg, nnx.Rngs(0))


def test_cache_shape_and_bytes(variant_model):
    name, m = variant_model
    cfg = m.config
    cache = init_cache(cfg, 3, 7, jnp.bfloat16)
    g = 2 if name == "gqa" else cfg.num_attention_heads
    assert isinstance(cache, KVCache)
    assert cache.k.shape == cache.v.shape == (cfg.num_hidden_layers, 3, 7, g, cfg.qk_nope_head_dim +
                                              cfg.qk_rope_head_dim)
    assert cache_bytes_per_token(cfg) == 2 * g * 24 * cfg.num_hidden_layers * 2


def test_greedy_decode_equals_full_forward(variant_model):
    """Cached greedy generation (prompts of two lengths in one batch) is token-identical to the full forward's
    argmax over the generated sequence, and its logits agree."""
    _, m = variant_model
    rng = np.random.default_rng(0)
    lens, n_new = [4, 7], 9
    prompt = np.zeros((2, max(lens)), np.int32)
    for r, n in enumerate(lens):
        prompt[r, :n] = rng.integers(0, m.config.vocab_size, n)
    out = generate(m, prompt, n_new, prompt_lengths=lens, cache_dtype=jnp.float32)
    seqs = np.zeros((2, max(lens) + n_new), np.int32)
    for r, n in enumerate(lens):
        seqs[r, :n + n_new] = out[r, :n + n_new]
    full = np.asarray(m(jnp.asarray(seqs)))
    for r, n in enumerate(lens):
        greedy = full[r, n - 1:n + n_new - 1].argmax(-1)
        np.testing.assert_array_equal(out[r, n:n + n_new], greedy)
    # the logits of the cached path match the full forward at every decoded position
    positions = jnp.broadcast_to(jnp.arange(seqs.shape[1], dtype=jnp.int32), seqs.shape)
    logits, _, _ = m.forward_cached(jnp.asarray(seqs), positions, init_cache(m.config, 2, seqs.shape[1],
                                                                             jnp.float32))
    np.testing.assert_allclose(np.asarray(logits), full, atol=1e-4)


def test_training_step_lowers_the_loss(variant_model):
    _, m = variant_model
    graphdef, params, bias = split_model(m)
    opt = optax.adam(3e-3)
    step = make_train_step(graphdef, opt, StepConfig(), donate=False)  # the initial params are compared below
    windows = jax.random.randint(jax.random.key(1), (1, 4, 17), 0, m.config.vocab_size)
    state = init_state(params, bias, opt)
    losses = []
    for _ in range(3):
        state, metrics = step(state, windows, 0.0, 0.0)
        losses.append(float(metrics.loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    grads_reached = [not np.allclose(np.asarray(a), np.asarray(b)) for a, b in
                     zip(jax.tree.leaves(state["params"]["dense_layers"]["attn"]),
                         jax.tree.leaves(params["dense_layers"]["attn"]))]
    assert all(grads_reached)  # wq, wk, wv, wo all trained


def test_mla_stays_the_default():
    assert ModelConfig().attention == "mla" and TINY.rope_dim == TINY.qk_rope_head_dim
    assert TINY.attn_head_dim == TINY.qk_head_dim


@pytest.mark.parametrize("changes, match", [
    (dict(attention="linear"), "attention must be one of"),
    (dict(num_key_value_heads=2), "num_key_value_heads applies to attention='mha' or 'gqa' only"),
    (dict(head_dim=16), "head_dim applies to attention='mha' or 'gqa' only"),
    (dict(attention="gqa"), "num_key_value_heads must be set for attention='gqa'"),
    (dict(attention="gqa", num_key_value_heads=3), r"num_key_value_heads \(3\) must divide"),
    (dict(attention="gqa", num_key_value_heads=0), "num_key_value_heads must be a positive integer"),
    (dict(attention="mha", num_key_value_heads=2), "must equal num_attention_heads"),
    (dict(attention="mha", head_dim=7), "head_dim must be even"),
])
def test_bad_configs(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)


def test_set_overrides_and_config_json_round_trip():
    from dsv3_jax.config import apply_overrides

    cfg = apply_overrides(TINY, ["attention=gqa", "num_key_value_heads=2", "head_dim=16"])
    assert (cfg.attention, cfg.num_key_value_heads, cfg.head_dim) == ("gqa", 2, 16)
    for c in (cfg, TINY.replace(attention="mha"), TINY):
        assert ModelConfig.from_hf(c.to_hf()) == c
    assert "attention" not in TINY.to_hf()  # MLA's config.json is the released one, unchanged


def test_no_released_checkpoint_layout(tmp_path):
    cfg = TINY.replace(attention="gqa", num_key_value_heads=2)
    m = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="attention='gqa' has no released checkpoint layout"):
        save_pretrained(m, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg.to_hf()))
    with pytest.raises(ValueError, match="no released checkpoint layout"):
        from_pretrained(tmp_path / "ck")
