"""The absorbed latent cache: prefill + step-by-step decode reproduce the full forward's logits at every position
(float32, <= 1e-4), with YaRN scaling and prompts of different lengths in one batch; the cache holds C + R
values per token per layer."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import Transformer, get_preset
from dsv3_jax.inference.cache import cache_bytes_per_token, init_cache

CFG = get_preset("tiny").replace(rope_type="yarn", rope_factor=4.0, rope_original_max_position_embeddings=8,
                                 initializer_range=0.1)


def test_prefill_then_decode_equals_full_forward():
    m = Transformer(CFG, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    s, lens = 16, [5, 9]
    seqs = [rng.integers(0, CFG.vocab_size, s) for _ in lens]
    forward = nnx.jit(lambda m, t: m(t))
    full = [np.asarray(forward(m, jnp.asarray(x[None], jnp.int32)))[0] for x in seqs]
    prompt = np.zeros((2, max(lens)), np.int32)  # right-padded; pad slots are overwritten before they are read
    for b, n in enumerate(lens):
        prompt[b, :n] = seqs[b][:n]
    cached = nnx.jit(lambda m, t, p, c: m.forward_cached(t, p, c))
    positions = jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
    logits, _, cache = cached(m, jnp.asarray(prompt), positions, init_cache(CFG, 2, s, jnp.float32))
    errors = [np.max(np.abs(np.asarray(logits[b, :n]) - full[b][:n])) for b, n in enumerate(lens)]
    cur = np.array(lens)
    while cur.min() < s:
        at = np.minimum(cur, s - 1)
        tokens = np.array([[seqs[b][at[b]]] for b in range(2)], np.int32)
        step_logits, _, cache = cached(m, jnp.asarray(tokens), jnp.asarray(at[:, None], jnp.int32), cache)
        errors += [np.max(np.abs(np.asarray(step_logits[b, 0]) - full[b][cur[b]])) for b in range(2) if cur[b] < s]
        cur += 1
    assert max(errors) <= 1e-4, max(errors)


def test_cache_size():
    assert cache_bytes_per_token(get_preset("deepseek-v3")) == 70272  # 576 values x 61 layers x 2 bytes
    cache = init_cache(CFG, 3, 7)
    assert cache.c_kv.shape == (CFG.num_hidden_layers, 3, 7, CFG.kv_lora_rank)
    assert cache.k_pe.shape == (CFG.num_hidden_layers, 3, 7, CFG.qk_rope_head_dim)
    assert cache.c_kv.dtype == jnp.bfloat16
