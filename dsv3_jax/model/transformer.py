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
from dsv3_jax.model.dense import dense
from dsv3_jax.model.ffn import MLP
from dsv3_jax.model.mla import MLA
from dsv3_jax.model.moe import MoE
from dsv3_jax.model.norm import RMSNorm
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
    cache: object = None  # the updated LatentCache / KVCache when forward was given one


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

    def __call__(self, h_BTD, cos, sin, mask_BTS=None, absorbed: bool = False, cache=None, positions_BT=None):
        """(h, MoE aux or None, cache) of the block over h [B,T,D].

        Without a cache: attention over these tokens under mask_BTS (`absorbed`: MLA's weight-absorbed form, same
        result). With cache = this layer's (c_kv, k_pe) for MLA (absorbed) or (k, v) for MHA/GQA and the tokens'
        positions_BT: their entries are written at those positions and each query attends to the cache slots at
        or before its own position (prefill, decode and verification alike; mask_BTS unused); the updated cache
        is returned (None without one)."""
        with jax.named_scope("attention"):
            x = self.attn_norm(h_BTD)
            if cache is None:
                a = self.attn(x, cos, sin, mask_BTS, absorbed)
            else:
                a, *cache = self.attn.cached(x, cos, sin, positions_BT, *cache)
                cache = tuple(cache)
        h_BTD = h_BTD + a
        with jax.named_scope("moe" if self.is_moe else "mlp"):
            x = self.ffn_norm(h_BTD)
            y, aux = self.ffn(x) if self.is_moe else (self.ffn(x), None)
        return h_BTD + y, aux, cache


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

    def __call__(self, h_prev_BTD, emb_BTD, cos, sin, mask_BTS=None, cache=None, positions_BT=None):
        """(h^k, MoE aux or None, cache) from h^{k-1} and Emb(t_{i+k}) (eqs. 21-22); the cache as in Block."""
        x = jnp.concatenate([self.enorm(emb_BTD), self.hnorm(h_prev_BTD)], axis=-1)
        h = fp8_linear(x, self.eh_proj[...]) if self.fp8 else dense(x, self.eh_proj[...])
        return self.block(h, cos, sin, mask_BTS, False, cache, positions_BT)


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


def _or_empty(scanned):
    """scan_layers' (carry, outputs) with outputs (None, None) when the stack is absent."""
    carry, out = scanned
    return carry, (None, None) if out is None else out


class Transformer(nnx.Module):
    """DeepSeek-V3: embedding, L blocks (scanned), final norm, output head, D MTP modules sharing both.

    `model(tokens)` and `forward` run compiled on concrete arrays (one compile per structure,
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
    @jax.named_scope("embed")
    def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
        from sharding.rules import embedding_lookup  # jnp.take, per data-parallel rank under a mesh

        return embedding_lookup(self.embed[...], tokens_BT).astype(self.precision.compute_dtype)

    @jax.named_scope("head")
    def output_head(self, h_BTD: jax.Array) -> jax.Array:
        """Logits [.., V] in float32 from a normalised hidden state."""
        w = self.embed[...].T if self.head is None else self.head[...]
        return dense(h_BTD, w, out_dtype=jnp.float32)

    @compiled_method
    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """Main-head logits [B, T, V] (float32)."""
        return self.forward(tokens_BT, mtp=False).logits

    @compiled_method
    def forward(self, tokens_BT: jax.Array, *, segment_ids_BT: jax.Array | None = None,
                positions_BT: jax.Array | None = None, mtp: bool = True, absorbed: bool = False,
                remat: str = "none", unroll: bool = False, cache=None, layers=None) -> ModelOutput:
        """The model's one forward: main logits, MTP logits (when mtp and the model has MTP modules), expert
        counts and balance terms. `absorbed` runs attention in the weight-absorbed form (same result); `remat` is
        the recomputation policy of every block ('none', 'paper', 'full'; see params.remat_policy); `unroll` unrolls
        the scans over the layer stacks (params.scan_layers: same result, faster on the CPU, longer compile).

        segment_ids_BT (int32, packed samples): attention is causal within a segment only, positions (RoPE) restart
        at 0 at each segment start unless positions_BT is given, and MTP module k at position i sees Emb(t_{i+k})
        only inside i's segment (zeros otherwise). Expert counts and the balance terms cover every token of a row
        (padding included); a packed row is one "sequence" of the sequence-wise balance loss.

        Decoding passes `cache`, a LatentCache (MLA) or KVCache (MHA/GQA), and the tokens' positions_BT: the tokens
        attend to the cache as in Block, the output carries the updated cache, and the MTP modules do not run
        (they keep their own cache: mtp_forward, inference/decoder.py). Prefill passes the prompt at positions
        0..T-1, decode one token per row at its own position. `layers` (decoding): the blocks as separate modules,
        dense then MoE, with the cache's fields sequences of per-layer arrays; a scan over the stacks copies each
        layer's weights out of its stack at every step, which dominates a decode step on the CPU."""
        cfg = self.config
        b, t = tokens_BT.shape
        if segment_ids_BT is not None and tuple(segment_ids_BT.shape) != (b, t):
            raise ValueError(f"segment_ids_BT has shape {tuple(segment_ids_BT.shape)}, expected the tokens' {(b, t)}")
        if cache is not None and (positions_BT is None or segment_ids_BT is not None):
            raise ValueError("forward with a cache needs positions_BT and takes no segment_ids_BT")
        if positions_BT is None:
            positions_BT = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if segment_ids_BT is None
                            else segment_positions(segment_ids_BT))
        cos, sin = rope_cos_sin(positions_BT, cfg)
        mask = None if cache is not None else causal_mask(t) if segment_ids_BT is None else segment_mask(
            segment_ids_BT)
        h = self.embed_tokens(tokens_BT)
        if layers is not None:  # one module per layer; the cache's fields are per-layer sequences
            if cache is None:
                raise ValueError("forward(layers=...) is the decoding form: pass a cache with it")
            new_a, new_b, moe_aux = [], [], []
            for layer, a, c in zip(layers, *cache, strict=True):
                h, aux, (a, c) = layer(h, cos, sin, cache=(a, c), positions_BT=positions_BT)
                new_a.append(a)
                new_b.append(c)
                moe_aux += [] if aux is None else [aux]
            new_cache = type(cache)(tuple(new_a), tuple(new_b))
            moe_aux = jax.tree.map(lambda *x: jnp.stack(x), *moe_aux) if moe_aux else None
        else:
            def body(layer, h, *layer_cache):
                h, aux, layer_cache = layer(h, cos, sin, mask, absorbed, layer_cache or None, positions_BT)
                return h, (aux, layer_cache)

            k = cfg.num_dense_layers
            dense_xs = () if cache is None else (cache[0][:k], cache[1][:k])
            moe_xs = () if cache is None else (cache[0][k:], cache[1][k:])
            options = dict(remat=remat, unroll=unroll)
            h, (_, dense_cache) = _or_empty(scan_layers(self.dense_layers, body, h, *dense_xs, **options))
            h, (moe_aux, moe_cache) = _or_empty(scan_layers(self.moe_layers, body, h, *moe_xs, **options))
            new_cache = None if cache is None else type(cache)(
                *(jnp.concatenate([p[i] for p in (dense_cache, moe_cache) if p is not None]) for i in (0, 1)))
        hidden = self.norm(h)
        logits = self.output_head(hidden)
        zero = jnp.zeros((), jnp.float32)
        counts = None if moe_aux is None else moe_aux.counts_E
        balance = zero if moe_aux is None else jnp.sum(moe_aux.balance)
        balance_batch = zero if moe_aux is None else jnp.sum(moe_aux.balance_batch)
        mtp_logits = mtp_counts = None
        mtp_balance = mtp_balance_batch = zero
        if mtp and self.mtp is not None and cache is None:
            mtp_logits, mtp_counts, mtp_balance, mtp_balance_batch = self.mtp_forward(
                hidden, tokens_BT, cos, sin, mask, remat, segment_ids_BT)
        return ModelOutput(logits, mtp_logits, counts, mtp_counts, balance, mtp_balance, hidden, balance_batch,
                           mtp_balance_batch, new_cache)

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

    def forward_cached(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache, layers=None):
        """(logits [B,T,V], hidden [B,T,D] after the final norm, updated cache): `forward` against a cache."""
        out = self.forward(tokens_BT, positions_BT=positions_BT, cache=cache, layers=layers)
        return out.logits, out.hidden, out.cache

    def mtp_forward(self, hidden_BTD, tokens_BT, cos, sin, mask, remat: str = "none", segment_ids_BT=None):
        """(mtp_logits [D,B,T,V], counts [D,E] or None, balance, balance_batch) of the D MTP modules run in sequence
        from the main model's normalised output hidden_BTD (training's form; the pipeline's last stage calls it
        too); module k sees Emb(t_{i+k}) (zeros past the end, or outside i's segment when segment ids are given)."""
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
            h_k, aux, _ = module(h_prev, emb, cos, sin, mask)
            logits = self.output_head(module.head_norm(h_k))
            return h_k, (logits, aux)

        # h^0 is the main model's normalised output, the hidden state the serving engines hand to MTP.
        with jax.named_scope("mtp"):
            _, (mtp_logits, aux) = scan_layers(self.mtp, body, hidden_BTD, emb_DBTD, remat=remat)
        if aux is None:
            return mtp_logits, None, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        return mtp_logits, aux.counts_E, jnp.sum(aux.balance), jnp.sum(aux.balance_batch)
