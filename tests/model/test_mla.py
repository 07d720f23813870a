"""MLA: the weight-absorbed form over the compressed latent equals the naive form (reference §3.3, §14 item 2),
attention is causal, and the naive form matches a plain NumPy restatement of eqs. 1-11."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.mla import MLA, mla_absorbed, mla_naive
from dsv3_jax.model.params import values
from dsv3_jax.model.rope import rope_cos_sin, rope_inv_freq, softmax_scale
from dsv3_jax.model.transformer import causal_mask

YARN = ModelConfig(hidden_size=64, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=12, rope_factor=4.0, rope_original_max_position_embeddings=8,
                   max_position_embeddings=64, initializer_range=0.2)


def _inputs(cfg, b=2, t=19, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, cfg.hidden_size))
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(t), (b, t)), cfg)
    return x, cos, sin, causal_mask(t)


@pytest.mark.parametrize("cfg", [YARN, YARN.replace(q_lora_rank=0, rope_type="default")], ids=["yarn", "no_q_lora"])
def test_absorbed_equals_naive(cfg):
    mla = MLA(cfg, jnp.float32, nnx.Rngs(0))
    x, cos, sin, mask = _inputs(cfg)
    p = values(mla)
    naive = np.asarray(mla_naive(p, x, cos, sin, mask, cfg, softmax_scale(cfg)))
    absorbed = np.asarray(mla_absorbed(p, x, cos, sin, mask, cfg, softmax_scale(cfg)))
    rel = np.max(np.abs(absorbed - naive)) / np.max(np.abs(naive))
    assert rel <= 1e-5, rel


def test_causal():
    cfg = YARN
    mla = MLA(cfg, jnp.float32, nnx.Rngs(0))
    x, cos, sin, mask = _inputs(cfg)
    y = mla(x, cos, sin, mask)
    x2 = x.at[:, 10:].set(jax.random.normal(jax.random.key(9), x[:, 10:].shape))
    y2 = mla(x2, cos, sin, mask)
    np.testing.assert_array_equal(np.asarray(y[:, :10]), np.asarray(y2[:, :10]))
    assert not np.allclose(np.asarray(y[:, 10:]), np.asarray(y2[:, 10:]))


def _rms(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope_np(x, pos, inv_freq):
    """Interleaved pairs as complex numbers times e^{i pos f} (reference §3.4)."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * pos[:, None] * inv_freq)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def test_naive_matches_numpy_restatement():
    cfg = YARN
    mla = MLA(cfg, jnp.float32, nnx.Rngs(1))
    x, cos, sin, mask = _inputs(cfg, b=1, t=9)
    y = np.asarray(mla(x, cos, sin, mask))[0]
    p = {k: np.asarray(v, np.float64) for k, v in values(mla).items()}
    xs = np.asarray(x, np.float64)[0]
    t, h, kn, r = xs.shape[0], cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    pos = np.arange(t, dtype=np.float64)
    f = rope_inv_freq(cfg).astype(np.float64)
    q = np.einsum("tq,qhk->thk", _rms(xs @ p["wq_a"], p["q_norm"]), p["wq_b"])  # eqs. 6-7
    kv = xs @ p["wkv_a"]
    c_kv = _rms(kv[:, :cfg.kv_lora_rank], p["kv_norm"])  # eq. 1
    k_r = _rope_np(kv[:, cfg.kv_lora_rank:], pos, f)  # eq. 3
    kvb = np.einsum("tc,chx->thx", c_kv, p["wkv_b"])  # eqs. 2, 5
    k = np.concatenate([kvb[..., :kn], np.broadcast_to(k_r[:, None], (t, h, r))], -1)  # eq. 4
    qf = np.concatenate([q[..., :kn], np.stack([_rope_np(q[:, i, kn:], pos, f) for i in range(h)], 1)], -1)  # eq. 8-9
    out = np.zeros((t, h, cfg.v_head_dim))
    for i in range(t):
        for hh in range(h):
            s = (k[: i + 1, hh] @ qf[i, hh]) * softmax_scale(cfg)
            a = np.exp(s - s.max())
            out[i, hh] = (a / a.sum()) @ kvb[: i + 1, hh, kn:]  # eq. 10
    ref = np.einsum("thv,hvd->td", out, p["wo"])  # eq. 11
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("query_block,dtype", [(512, jnp.float32), (3, jnp.float32), (1, jnp.float32),
                                               (512, jnp.bfloat16), (3, jnp.bfloat16)])
def test_attention_core_gradients_equal_autodiff_of_the_plain_softmax(query_block, dtype):
    """The recomputing backward of attention_core against autodiff through a plain softmax(q k^T) v, with a
    causal mask and one fully masked row (zeros out, zero gradients), whole or over blocks of query rows (the
    first 3 blocks: one block; blocks of 3 rows, the last padded; of 1 row). In bfloat16 (row-major operands on
    the CPU's bfloat16 path, dsv3_jax.model.dense) against float32 autodiff of the same values, to bfloat16's
    precision."""
    from dsv3_jax.model.mla import attention_core

    attention_core = functools.partial(attention_core, query_block=query_block)

    b, h, t, k, v = 2, 3, 7, 5, 4
    rng = np.random.default_rng(0)
    q_, k_ = (jnp.asarray(rng.standard_normal((b, h, t, k)), dtype).astype(jnp.float32) for _ in range(2))
    v_ = jnp.asarray(rng.standard_normal((b, h, t, v)), dtype).astype(jnp.float32)
    mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    mask[1, 3] = False  # row 3 of sequence 1 sees nothing
    mask = jnp.asarray(mask)
    w = jnp.asarray(rng.standard_normal((b, h, t, v)), jnp.float32)

    def plain(q, k, v):
        s = jnp.where(mask[:, None], 0.3 * q @ jnp.swapaxes(k, -1, -2), -1e30)
        p = jax.nn.softmax(s, axis=-1) * jnp.any(mask, -1)[:, None, :, None]
        return p @ v

    def core(q, k, v):
        return attention_core(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, 0.3).astype(jnp.float32)

    tol = (1e-5, 1e-6, 1e-4, 1e-5) if dtype == jnp.float32 else (3e-2, 3e-2, 5e-2, 5e-2)
    out = core(q_, k_, v_)
    assert attention_core(q_.astype(dtype), k_.astype(dtype), v_.astype(dtype), mask, 0.3).dtype == dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain(q_, k_, v_)), rtol=tol[0], atol=tol[1])
    assert np.all(np.asarray(out)[1, :, 3] == 0)
    grads = jax.grad(lambda *a: jnp.sum(core(*a) * w), argnums=(0, 1, 2))(q_, k_, v_)
    expected = jax.grad(lambda *a: jnp.sum(plain(*a) * w), argnums=(0, 1, 2))(q_, k_, v_)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=tol[2], atol=tol[3])
