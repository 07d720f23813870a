"""Model FLOPs per token and a measured matmul peak, for tokens/s -> MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.stats import model_stats


def training_flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool = True) -> float:
    """6 x (activated matmul parameters) + the attention products, per trained token.

    Matmul parameters: the activated parameters without the embedding lookup (the head is a matmul), plus for each
    MTP module its activated block and eh_proj and another pass through the head. Attention: q.k over
    qk_head_dim and p.v over v_head_dim (MHA/GQA: head_dim both) for H heads against (seq_len + 1)/2 keys on
    average (causal).
    """
    stats = model_stats(cfg)
    v, d = cfg.vocab_size, cfg.hidden_size
    matmul = stats.activated_params - v * d  # embedding is a lookup
    layers = cfg.num_hidden_layers
    if mtp and cfg.num_mtp_layers:
        routed_per_layer = 3 * d * cfg.moe_intermediate_size * cfg.n_routed_experts
        mtp_active = stats.mtp_params - routed_per_layer * cfg.num_mtp_layers * (
            1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
        matmul += mtp_active + cfg.num_mtp_layers * v * d
        layers += cfg.num_mtp_layers
    qk_v = cfg.qk_head_dim + cfg.v_head_dim if cfg.attention == "mla" else 2 * cfg.attn_head_dim
    attention = layers * 2 * cfg.num_attention_heads * qk_v * (seq_len + 1) / 2
    return 3.0 * (2.0 * matmul + attention)


def measure_peak_flops(n: int = 1024, dtype=jnp.float32, reps: int = 8) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` with float32 accumulation (as the model's products run:
    dsv3_jax.model.dense) on the default device (the best of `reps` runs after a warm-up)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best
