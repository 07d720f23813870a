"""The DeepSeek-V3 transformer (paper §2; reference §3.1) with its multi-token-prediction modules (§2.2).

Layers are stacked on a leading 'layers' axis and scanned (DESIGN principle 3): one stack for the first k dense
layers, one for the MoE layers, one for the D MTP modules. Dimension letters: B batch, T tokens, D model,
V vocab, L layers, E routed experts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import fp8_linear
from dsv3_jax.model.attention import GQA
from dsv3_jax.model.compiled import compiled_method
from dsv3_jax.model.ffn import MLP
from dsv3_jax.model.mla import MLA
from dsv3_jax.model.moe import MoE, MoEAux
from dsv3_jax.model.norm import RMSNorm, rms_norm
from dsv3_jax.model.params import deferred_init, param, randomize, scan_layers, stacked
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.precision import FP32, Precision


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] main head; position i predicts token i+1
    mtp_logits: jax.Array | None  # [D, B, T, V]; module k at position i predicts token i+1+k (tail invalid)
    expert_counts: jax.Array | None  # [L_moe, E] tokens per expert in each main MoE layer
    mtp_expert_counts: jax.Array | None  # [D, E] the same for the MTP blocks
    balance: jax.Array  # sum over main MoE layers of mean_b sum_i f_i P_i (eqs. 17-20, without alpha)
    mtp_balance: jax.Array  # the same over the MTP blocks
    hidden: jax.Array  # [B, T, D] main-model output after the final norm
    balance_batch: jax.Array | float = 0.0  # sum over main MoE layers of the batch-wise sum_i f_i P_i (§4.5.3)
    mtp_balance_batch: jax.Array | float = 0.0  # the same over the MTP blocks


class Block(nnx.Module):
    """Pre-norm residual block: h += Attn(norm(h)); h += FFN(norm(h)), FFN dense SwiGLU or MoE. Attn is MLA, or
    MHA/GQA (model/attention.py) by cfg.attention."""

    def __init__(self, cfg: ModelConfig, moe: bool, dtype, rngs: nnx.Rngs, fp8: bool = False):
        self.is_moe = moe
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype)
        self.attn = (MLA if cfg.attention == "mla" else GQA)(cfg, dtype, rngs, fp8=fp8)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype)
        self.ffn = (MoE(cfg, dtype, rngs, fp8=fp8) if moe
                    else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, rngs, cfg.initializer_range, fp8=fp8))

    def __call__(self, h_BTD, cos, sin, mask_BTS, absorbed: bool = False) -> tuple[jax.Array, MoEAux | None]:
        h_BTD = h_BTD + self.attn(self.attn_norm(h_BTD), cos, sin, mask_BTS, absorbed)
        if self.is_moe:
            y, aux = self.ffn(self.ffn_norm(h_BTD))
        else:
            y, aux = self.ffn(self.ffn_norm(h_BTD)), None
        return h_BTD + y, aux

    def cached(self, h_BTD, cos, sin, positions_BT, cache_a, cache_b):
        """The block over new tokens with this layer's cache, (c_kv, k_pe) for MLA (absorbed attention) or (k, v)
        for MHA/GQA; returns (h, cache_a, cache_b)."""
        a, cache_a, cache_b = self.attn.cached(self.attn_norm(h_BTD), cos, sin, positions_BT, cache_a, cache_b)
        h_BTD = h_BTD + a
        y = self.ffn(self.ffn_norm(h_BTD))
        return h_BTD + (y[0] if self.is_moe else y), cache_a, cache_b


class MTPModule(nnx.Module):
    """MTP module k (eqs. 21-22): h'_i = M_k [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)], h^k = TRM_k(h').

    The concatenation puts the embedding first, as the released weights and the engines that load them do
    (reference §6); eq. 21 writes the other order.
    """

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, fp8: bool = False):
        d = cfg.hidden_size
        self.fp8 = fp8
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, "embed", dtype)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, "embed", dtype)
        self.eh_proj = param(rngs, (2 * d, d), ("mtp_concat", "embed"), dtype, std=cfg.initializer_range)
        self.block = Block(cfg, cfg.mtp_layer_is_moe, dtype, rngs, fp8)
        self.head_norm = RMSNorm(d, cfg.rms_norm_eps, "embed", dtype)

    def __call__(self, h_prev_BTD, emb_BTD, cos, sin, mask_BTS):
        x = jnp.concatenate([self.enorm(emb_BTD), self.hnorm(h_prev_BTD)], axis=-1)
        h = fp8_linear(x, self.eh_proj[...]) if self.fp8 else x @ self.eh_proj[...].astype(x.dtype)
        return self.block(h, cos, sin, mask_BTS)


def causal_mask(t: int) -> jax.Array:
    """[1, T, T] boolean, True where query i may attend key j (j <= i)."""
    return jnp.tril(jnp.ones((t, t), jnp.bool_))[None]


def segment_mask(segment_ids_BT: jax.Array) -> jax.Array:
    """[B, T, T] boolean: causal and same segment (packed samples do not attend to each other)."""
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return same_BTS & causal_mask(segment_ids_BT.shape[1])


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """int32 [B, T]: each token's position within its segment (0 where a new segment id starts)."""
    b, t = segment_ids_BT.shape
    idx_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    starts_BT = jnp.concatenate([jnp.ones((b, 1), jnp.bool_), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], 1)
    return idx_BT - jax.lax.cummax(jnp.where(starts_BT, idx_BT, 0), axis=1)


class Transformer(nnx.Module):
    """DeepSeek-V3: embedding, L blocks (scanned), final norm, output head, D MTP modules sharing both.

    `model(tokens)`, `forward` and `forward_cached` run compiled on concrete arrays (one compile per structure,
    shapes and flags; the current parameters every call) and as the plain body under a trace; `with
    jax.disable_jit():` runs them op by op for debugging (dsv3_jax/model/compiled.py)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, precision: Precision = FP32):
        cfg.validate()
        self.config = cfg
        self.precision = precision
        dtype, std, fp8 = precision.param_dtype, cfg.initializer_range, precision.fp8
        with deferred_init():
            self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, std=std)
            self.dense_layers = stacked(cfg.num_dense_layers, lambda r: Block(cfg, False, dtype, r, fp8), rngs)
            self.moe_layers = stacked(cfg.num_moe_layers, lambda r: Block(cfg, True, dtype, r, fp8), rngs)
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype)
            self.head = (None if cfg.tie_word_embeddings
                         else param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype, std=std))
            self.mtp = stacked(cfg.num_mtp_layers, lambda r: MTPModule(cfg, dtype, r, fp8), rngs)
        randomize(self, rngs.params())

    # -- pieces shared with inference --
    def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.precision.compute_dtype)

    def output_head(self, h_BTD: jax.Array) -> jax.Array:
        """Logits [.., V] in float32 from a normalised hidden state."""
        w = self.embed[...].T if self.head is None else self.head[...]
        return jnp.einsum("btd,dv->btv", h_BTD, w.astype(h_BTD.dtype), preferred_element_type=jnp.float32)

    @compiled_method
    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """Main-head logits [B, T, V] (float32)."""
        return self.forward(tokens_BT, mtp=False).logits

    @compiled_method
    def forward(self, tokens_BT: jax.Array, *, segment_ids_BT: jax.Array | None = None,
                positions_BT: jax.Array | None = None, mtp: bool = True, absorbed: bool = False,
                remat: str = "none") -> ModelOutput:
        """Full forward: main logits, MTP logits (when mtp and the model has MTP modules), expert counts and
        balance terms. `absorbed` runs attention in the weight-absorbed form (same result); `remat` is the
        recomputation policy of every block ('none', 'paper', 'full'; see params.remat_policy).

        segment_ids_BT (int32, packed samples): attention is causal within a segment only, positions (RoPE) restart
        at 0 at each segment start unless positions_BT is given, and MTP module k at position i sees Emb(t_{i+k})
        only inside i's segment (zeros otherwise). Expert counts and the balance terms cover every token of a row
        (padding included); a packed row is one "sequence" of the sequence-wise balance loss."""
        cfg = self.config
        b, t = tokens_BT.shape
        if segment_ids_BT is not None and tuple(segment_ids_BT.shape) != (b, t):
            raise ValueError(f"segment_ids_BT has shape {tuple(segment_ids_BT.shape)}, expected the tokens' {(b, t)}")
        if positions_BT is None:
            positions_BT = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if segment_ids_BT is None
                            else segment_positions(segment_ids_BT))
        cos, sin = rope_cos_sin(positions_BT, cfg)
        mask = causal_mask(t) if segment_ids_BT is None else segment_mask(segment_ids_BT)
        emb_BTD = self.embed_tokens(tokens_BT)

        def body(layer, h, *_):
            h, aux = layer(h, cos, sin, mask, absorbed)
            return h, aux

        h, _ = scan_layers(self.dense_layers, body, emb_BTD, remat=remat)
        h, moe_aux = scan_layers(self.moe_layers, body, h, remat=remat)
        hidden = self.norm(h)
        logits = self.output_head(hidden)
        zero = jnp.zeros((), jnp.float32)
        counts = None if moe_aux is None else moe_aux.counts_E
        balance = zero if moe_aux is None else jnp.sum(moe_aux.balance)
        balance_batch = zero if moe_aux is None else jnp.sum(moe_aux.balance_batch)
        mtp_logits = mtp_counts = None
        mtp_balance = mtp_balance_batch = zero
        if mtp and self.mtp is not None:
            mtp_logits, mtp_counts, mtp_balance, mtp_balance_batch = self._mtp_forward(
                hidden, tokens_BT, cos, sin, mask, remat, segment_ids_BT)
        return ModelOutput(logits, mtp_logits, counts, mtp_counts, balance, mtp_balance, hidden, balance_batch,
                           mtp_balance_batch)

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop_tokens=(), **kwargs):
        """Greedy or sampled continuation of int32 [B, T] prompts -> [B, T + N] (see inference.generate);
        speculative=True drafts with the MTP module (inference.speculative)."""
        if kwargs.pop("speculative", False):
            from dsv3_jax.inference.speculative import speculative_generate as fn
        else:
            from dsv3_jax.inference.generate import generate as fn
        return fn(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  stop_tokens=stop_tokens, **kwargs)

    @compiled_method
    def forward_cached(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache, layers=None):
        """Main-model logits [B,T,V] of tokens at `positions` (int32 [B,T]) against a LatentCache (MLA) or KVCache
        (MHA/GQA); returns
        (logits, hidden [B,T,D] after the final norm, updated cache). Prefill passes the prompt at positions
        0..T-1, decode one token per sequence at its own position; slots past a query's position are never read.

        `layers` (optional): the blocks as separate modules, dense then MoE, with the cache's fields sequences of
        per-layer arrays. The decoder uses this form: a scan over the stacks copies every layer's weights out of
        its stack at every step, which dominates a decode step on the CPU."""
        cos, sin = rope_cos_sin(positions_BT, self.config)
        h = self.embed_tokens(tokens_BT)
        first, second = cache  # (c_kv, k_pe) or (k, v), each [L, ...] or per-layer sequences
        if layers is not None:
            new_a, new_b = [], []
            for layer, a, b in zip(layers, first, second, strict=True):
                h, a, b = layer.cached(h, cos, sin, positions_BT, a, b)
                new_a.append(a)
                new_b.append(b)
            new_cache = type(cache)(tuple(new_a), tuple(new_b))
        else:
            k = self.config.num_dense_layers

            def body(layer, h, c, pe):
                h, c, pe = layer.cached(h, cos, sin, positions_BT, c, pe)
                return h, (c, pe)

            h, dense = scan_layers(self.dense_layers, body, h, first[:k], second[:k])
            h, moe = scan_layers(self.moe_layers, body, h, first[k:], second[k:])
            parts = [x for x in (dense, moe) if x is not None]
            new_cache = type(cache)(jnp.concatenate([p[0] for p in parts]), jnp.concatenate([p[1] for p in parts]))
        hidden = self.norm(h)
        return self.output_head(hidden), hidden, new_cache

    def _mtp_forward(self, hidden_BTD, tokens_BT, cos, sin, mask, remat: str, segment_ids_BT=None):
        """Run the D MTP modules in sequence; module k sees Emb(t_{i+k}) (zeros past the end, or outside i's
        segment when segment ids are given)."""
        d = self.config.num_mtp_layers
        t = tokens_BT.shape[1]
        shifted = jnp.stack([jnp.pad(tokens_BT[:, k:], ((0, 0), (0, k))) for k in range(1, d + 1)])
        emb_DBTD = self.embed_tokens(shifted)
        valid = jnp.arange(t)[None, None, :] < (t - jnp.arange(1, d + 1))[:, None, None]
        if segment_ids_BT is not None:
            seg = segment_ids_BT
            shifted_seg = jnp.stack([jnp.pad(seg[:, k:], ((0, 0), (0, k)), constant_values=-1)
                                     for k in range(1, d + 1)])
            valid = valid & (shifted_seg == seg[None])
        emb_DBTD = jnp.where(valid[..., None], emb_DBTD, 0)

        def body(module, h_prev, emb):
            h_k, aux = module(h_prev, emb, cos, sin, mask)
            logits = self.output_head(module.head_norm(h_k))
            return h_k, (logits, aux)

        # h^0 is the main model's normalised output, the hidden state the serving engines hand to MTP.
        _, (mtp_logits, aux) = scan_layers(self.mtp, body, hidden_BTD, emb_DBTD, remat=remat)
        if aux is None:
            return mtp_logits, None, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        return mtp_logits, aux.counts_E, jnp.sum(aux.balance), jnp.sum(aux.balance_batch)
