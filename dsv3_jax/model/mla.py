"""Multi-head Latent Attention (paper §2.1.1, eqs. 1-11; reference §3.3).

Dimension letters: B batch, T query tokens, S key tokens, D model, H heads, Q query latent (q_lora_rank),
C kv latent (kv_lora_rank), K nope head dim, R rope dim, V value head dim.

Two forms of the same function:
- `mla_naive` (training): up-project the latent to per-head keys and values, then ordinary attention;
- `mla_absorbed` (decoding): fold W^UK into the query and W^UV into the output, so attention runs directly
  over the cached latent c^KV [C] and the shared rotated key k^R [R]: C + R values per token per layer.

With `fp8` (training, paper §3.3) the five projections of `mla_naive` are FP8 linears; the input of the output
projection gets power-of-two scales (§3.3.3); the attention core softmax(QK^T)V stays in the compute dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import fp8_dense
from dsv3_jax.model.dense import dense, matmul, mT
from dsv3_jax.model.norm import rms_norm
from dsv3_jax.model.params import param, values
from dsv3_jax.model.rope import apply_rope, softmax_scale
from dsv3_jax.residuals import as_bits, from_bits

Params = dict[str, jax.Array]


def mla_latents(p: Params, x_BTD: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array, cfg: ModelConfig,
                fp8: bool = False):
    """Queries and the compressed KV: q_nope [B,T,H,K], rotated q_pe [B,T,H,R], normalised c_kv [B,T,C] and the
    rotated shared key k_pe [B,T,R] (the two tensors the absorbed cache stores)."""
    if cfg.q_lora_rank:
        c_q_BTQ = fp8_dense(x_BTD, p["wq_a"]) if fp8 else dense(x_BTD, p["wq_a"])
        c_q_BTQ = rms_norm(c_q_BTQ, p["q_norm"], cfg.rms_norm_eps)
        q_BTHK = fp8_dense(c_q_BTQ, p["wq_b"]) if fp8 else dense(c_q_BTQ, p["wq_b"])
        q_BTHK = checkpoint_name(q_BTHK, "mla_up")
    else:
        q_BTHK = fp8_dense(x_BTD, p["wq"]) if fp8 else dense(x_BTD, p["wq"])
    q_nope, q_pe = jnp.split(q_BTHK, [cfg.qk_nope_head_dim], axis=-1)
    kv_BTX = fp8_dense(x_BTD, p["wkv_a"]) if fp8 else dense(x_BTD, p["wkv_a"])
    c_kv, k_pe = jnp.split(kv_BTX, [cfg.kv_lora_rank], axis=-1)
    c_kv = rms_norm(c_kv, p["kv_norm"], cfg.rms_norm_eps)
    q_pe = apply_rope(q_pe, cos_BTR[:, :, None, :], sin_BTR[:, :, None, :])
    k_pe = apply_rope(k_pe, cos_BTR, sin_BTR)
    return q_nope, q_pe, c_kv, k_pe


def _masked_scores(scores_BHTS: jax.Array, mask_BTS: jax.Array, scale: float) -> jax.Array:
    """scale * scores in float32, -inf where mask is False."""
    return jnp.where(mask_BTS[:, None], scores_BHTS.astype(jnp.float32) * scale, -jnp.inf)


def _softmax_parts(s_BHTS: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(exp(s - m), its row sums (at least float32's tiny), m) of masked scores: softmax = e / sum; a fully
    masked row has m = 0 and e = 0, so it gives zeros."""
    m = jnp.max(s_BHTS, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s_BHTS - m)
    return e, jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny), m


def masked_softmax(scores_BHTS: jax.Array, mask_BTS: jax.Array, scale: float) -> jax.Array:
    """softmax(scale * scores) over S in float32 where mask is True (a fully masked row gives zeros)."""
    e, total, _ = _softmax_parts(_masked_scores(scores_BHTS, mask_BTS, scale))
    return e / total


QUERY_BLOCK = 512  # query rows per step of the attention core: [B, H, 512, S] scores at a time


def attention_core(q_BHTK: jax.Array, k_BHSK: jax.Array, v_BHSV: jax.Array, mask_BTS: jax.Array,
                   scale: float, query_block: int = QUERY_BLOCK) -> jax.Array:
    """o [B,H,T,V] = softmax(scale * q.k^T where mask) . v, the softmax in float32 and the probabilities cast to
    v's dtype before the product (masked_softmax's rule; a fully masked row gives zeros).

    Its backward keeps only q, k, v, o and the per-row log-sum-exp, and recomputes the probabilities from them, as
    fused attention kernels do: the [B,H,T,S] probabilities are never saved for the backward (at DeepSeek-V3's
    4096 tokens they are the largest activation of a layer), and the backward is the five matmuls of the
    closed form dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO o)), dQ = scale dS K, dK = scale dS^T Q.
    Forward and backward run over blocks of `query_block` query rows (a softmax row needs only its own scores),
    so at most [B, H, query_block, S] scores exist at a time (the last block padded with masked rows)."""
    return _attention_core(q_BHTK, k_BHSK, v_BHSV, mask_BTS, scale, query_block)[0]


def _scores(q_BHTK, k_BHSK, mask_BTS, scale):
    return _masked_scores(matmul(q_BHTK, mT(k_BHSK), jnp.float32), mask_BTS, scale)


def _query_blocks(block: int, *xs_BHT):
    """Blocks [n, ...] of `block` rows along the query axis (axis 2 of [B, H, T, ...], 1 of the mask [B, T, S]),
    zero-padded (a padded mask row is False)."""
    t = xs_BHT[0].shape[2]
    n = -(-t // block)

    def split(x, axis):
        x = jnp.pad(x, [(0, n * block - t) if i == axis else (0, 0) for i in range(x.ndim)])
        return jnp.moveaxis(x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:]), axis, 0)

    return tuple(split(x, 1 if x.ndim == 3 else 2) for x in xs_BHT)


def _join_query_blocks(t: int, x_nBHb):
    """[B, H, T, ...] from _query_blocks' [n, B, H, block, ...] (padding dropped)."""
    x = jnp.moveaxis(x_nBHb, 0, 2)
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])[:, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention_core(q_BHTK, k_BHSK, v_BHSV, mask_BTS, scale, block):
    def rows(q, mask):
        e, total, m = _softmax_parts(_scores(q, k_BHSK, mask, scale))
        return matmul((e / total).astype(v_BHSV.dtype), v_BHSV), m + jnp.log(total)

    t = q_BHTK.shape[2]
    if t <= block:
        return rows(q_BHTK, mask_BTS)
    o, lse = jax.lax.map(lambda a: rows(*a), _query_blocks(block, q_BHTK, mask_BTS))
    return _join_query_blocks(t, o), _join_query_blocks(t, lse)


def _attention_core_fwd(q_BHTK, k_BHSK, v_BHSV, mask_BTS, scale, block):
    o, lse = _attention_core(q_BHTK, k_BHSK, v_BHSV, mask_BTS, scale, block)
    return (o, lse), as_bits((q_BHTK, k_BHSK, v_BHSV, mask_BTS, o, lse))  # as bits: see dsv3_jax/residuals.py


def _attention_core_bwd(scale, block, res, cotangents):
    q, k, v, mask, o, lse = from_bits(*res)
    f32 = jnp.float32

    def rows(q, mask, o, lse, do):  # dq of these query rows, and their float32 parts of dk and dv
        p = jnp.exp(_scores(q, k, mask, scale) - lse)  # float32, zeros where masked
        dv = matmul(mT(p.astype(v.dtype)), do.astype(v.dtype), f32)
        dp = matmul(do, mT(v), f32)
        delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1, keepdims=True)
        ds = (p * (dp - delta) * scale).astype(q.dtype)
        return matmul(ds, k), matmul(mT(ds), q, f32), dv

    t = q.shape[2]
    if t <= block:
        dq, dk, dv = rows(q, mask, o, lse, cotangents[0])
    else:
        def step(acc, blk):
            dq, dk, dv = rows(*blk)
            return (acc[0] + dk, acc[1] + dv), dq

        zeros = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
        (dk, dv), dq = jax.lax.scan(step, zeros, _query_blocks(block, q, mask, o, lse, cotangents[0]))
        dq = _join_query_blocks(t, dq)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), np.zeros(mask.shape, jax.dtypes.float0)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def mla_naive(p: Params, x_BTD, cos_BTR, sin_BTR, mask_BTS, cfg: ModelConfig, scale: float,
              fp8: bool = False) -> jax.Array:
    """MLA with per-head keys/values materialised (the training form); `fp8` runs the projections in FP8."""
    q_nope, q_pe, c_kv, k_pe = mla_latents(p, x_BTD, cos_BTR, sin_BTR, cfg, fp8)
    kv_BSHX = fp8_dense(c_kv, p["wkv_b"]) if fp8 else dense(c_kv, p["wkv_b"])
    kv_BSHX = checkpoint_name(kv_BSHX, "mla_up")
    k_nope, v_BSHV = jnp.split(kv_BSHX, [cfg.qk_nope_head_dim], axis=-1)
    # k = [k_nope; k_pe shared by all heads] (eq. 4); head-major batched matmuls are 2-3x faster on the CPU
    # than the token-major einsums.
    with jax.named_scope("core"):
        q_BHTK = jnp.concatenate([q_nope, q_pe], axis=-1).transpose(0, 2, 1, 3)
        k_pe_BSHR = jnp.broadcast_to(k_pe[:, :, None, :], k_nope.shape[:3] + k_pe.shape[-1:])
        k_BHSK = jnp.concatenate([k_nope, k_pe_BSHR], axis=-1).transpose(0, 2, 1, 3)
        o_BTHV = attention_core(q_BHTK, k_BHSK, v_BSHV.transpose(0, 2, 1, 3), mask_BTS, scale).transpose(0, 2, 1, 3)
    if fp8:  # ue8m0: the paper's E5M6 input with power-of-two scales (E5M6 is not a JAX dtype; E4M3 here)
        return fp8_dense(o_BTHV, p["wo"], n_in=2, scale_fmt="ue8m0")
    return dense(o_BTHV, p["wo"], n_in=2)


def absorbed_weights(wkv_b_CHX: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(W^UK [H,K,C], W^UV [H,C,V]) cut from wkv_b [C,H,K+V], head-major as the absorbed products take them."""
    k = cfg.qk_nope_head_dim
    return wkv_b_CHX[..., :k].transpose(1, 2, 0), wkv_b_CHX[..., k:].transpose(1, 0, 2)


def _absorbed(p: Params, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """W^UK, W^UV of p: cut from wkv_b, or as stored by MLA.absorb_weights (the decoder's form)."""
    w = p["wkv_b"]
    return w if isinstance(w, tuple) else absorbed_weights(w, cfg)


def absorb_query(p: Params, q_nope_BTHK: jax.Array, cfg: ModelConfig) -> jax.Array:
    """q_lat [B,T,H,C] = q_nope . W^UK: the query expressed in the latent space."""
    w_uk_HKC = _absorbed(p, cfg)[0].astype(q_nope_BTHK.dtype)
    return jnp.einsum("bthk,hkc->bthc", q_nope_BTHK, w_uk_HKC)


@jax.named_scope("core")
def attend_latent(q_lat_BTHC, q_pe_BTHR, c_kv_BSC, k_pe_BSR, mask_BTS, scale: float) -> jax.Array:
    """Attention over the latent cache: softmax(q_lat.c_kv + q_pe.k_pe) . c_kv -> o_lat [B,T,H,C]."""
    scores = (jnp.einsum("bthc,bsc->bhts", q_lat_BTHC, c_kv_BSC)
              + jnp.einsum("bthr,bsr->bhts", q_pe_BTHR, k_pe_BSR))
    probs = masked_softmax(scores, mask_BTS, scale).astype(c_kv_BSC.dtype)
    return jnp.einsum("bhts,bsc->bthc", probs, c_kv_BSC)


def absorbed_output(p: Params, o_lat_BTHC: jax.Array, cfg: ModelConfig) -> jax.Array:
    """o = (o_lat . W^UV) . W^O -> [B,T,D]."""
    dt = o_lat_BTHC.dtype
    w_uv_HCV = _absorbed(p, cfg)[1].astype(dt)
    o_BTHV = jnp.einsum("bthc,hcv->bthv", o_lat_BTHC, w_uv_HCV)
    return jnp.einsum("bthv,hvd->btd", o_BTHV, p["wo"].astype(dt))


def mla_absorbed(p: Params, x_BTD, cos_BTR, sin_BTR, mask_BTS, cfg: ModelConfig, scale: float) -> jax.Array:
    """MLA in the weight-absorbed form over this sequence's own latents (equal to mla_naive)."""
    q_nope, q_pe, c_kv, k_pe = mla_latents(p, x_BTD, cos_BTR, sin_BTR, cfg)
    o_lat = attend_latent(absorb_query(p, q_nope, cfg), q_pe, c_kv, k_pe, mask_BTS, scale)
    return absorbed_output(p, o_lat, cfg)


def mla_cached(p: Params, x_BTD, cos_BTR, sin_BTR, positions_BT, c_cache_BSC, pe_cache_BSR, cfg: ModelConfig,
               scale: float):
    """Absorbed MLA against a latent cache: the new tokens' c_kv / k_pe are written at their positions, then each
    query attends to the cache slots at or before its own position. No per-head key or value is formed.

    Serves prefill (T prompt tokens), decode (T = 1) and the verification of several drafted tokens alike.
    Returns (out [B,T,D], c_cache, pe_cache).
    """
    q_nope, q_pe, c_kv, k_pe = mla_latents(p, x_BTD, cos_BTR, sin_BTR, cfg)
    rows = jnp.arange(x_BTD.shape[0])[:, None]
    c_cache_BSC = c_cache_BSC.at[rows, positions_BT].set(c_kv.astype(c_cache_BSC.dtype))
    pe_cache_BSR = pe_cache_BSR.at[rows, positions_BT].set(k_pe.astype(pe_cache_BSR.dtype))
    mask_BTS = jnp.arange(c_cache_BSC.shape[1])[None, None, :] <= positions_BT[:, :, None]
    dt = x_BTD.dtype
    o_lat = attend_latent(absorb_query(p, q_nope, cfg), q_pe, c_cache_BSC.astype(dt), pe_cache_BSR.astype(dt),
                          mask_BTS, scale)
    return absorbed_output(p, o_lat, cfg), c_cache_BSC, pe_cache_BSR


class MLA(nnx.Module):
    """MLA parameters (layout [in, ..., out]; see dsv3_jax/hf.py for the checkpoint mapping)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, fp8: bool = False):
        self.cfg = cfg
        self.fp8 = fp8
        d, h, std = cfg.hidden_size, cfg.num_attention_heads, cfg.initializer_range
        if cfg.q_lora_rank:
            self.wq_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), dtype, std=std)
            self.q_norm = param(rngs, (cfg.q_lora_rank,), ("q_lora",), dtype, init="ones")
            self.wq_b = param(rngs, (cfg.q_lora_rank, h, cfg.qk_head_dim), ("q_lora", "heads", "qk_head"), dtype,
                              std=std)
        else:
            self.wq = param(rngs, (d, h, cfg.qk_head_dim), ("embed", "heads", "qk_head"), dtype, std=std)
        self.wkv_a = param(rngs, (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"), dtype, std=std)
        self.kv_norm = param(rngs, (cfg.kv_lora_rank,), ("kv_lora",), dtype, init="ones")
        self.wkv_b = param(rngs, (cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim),
                           ("kv_lora", "heads", "kv_head"), dtype, std=std)
        self.wo = param(rngs, (h, cfg.v_head_dim, d), ("heads", "v_head", "embed"), dtype, std=std)

    def __call__(self, x_BTD, cos_BTR, sin_BTR, mask_BTS, absorbed: bool = False) -> jax.Array:
        if absorbed:  # the decoding form, always in the compute dtype
            return mla_absorbed(values(self), x_BTD, cos_BTR, sin_BTR, mask_BTS, self.cfg, softmax_scale(self.cfg))
        return mla_naive(values(self), x_BTD, cos_BTR, sin_BTR, mask_BTS, self.cfg, softmax_scale(self.cfg),
                         self.fp8)

    def absorb_weights(self) -> None:
        """Hold wkv_b as (W^UK [H,K,C], W^UV [H,C,V]) (absorbed_weights): the decoder's form, so that a decode
        step does not cut and transpose them from wkv_b every time. Only the absorbed forms run afterwards."""
        self.wkv_b = nnx.Param(absorbed_weights(self.wkv_b[...], self.cfg), **self.wkv_b.get_metadata())

    def cached(self, x_BTD, cos_BTR, sin_BTR, positions_BT, c_cache_BSC, pe_cache_BSR):
        """mla_cached with this module's weights."""
        return mla_cached(values(self), x_BTD, cos_BTR, sin_BTR, positions_BT, c_cache_BSC, pe_cache_BSR, self.cfg,
                          softmax_scale(self.cfg))
