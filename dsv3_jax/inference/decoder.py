"""The model in the form decoding wants: its layer stacks split into one module per layer, and a per-layer cache.

A training model keeps each block's weights stacked on a leading layer axis and scans over it; inside a scan XLA
copies every layer's weights out of the stack at every iteration, which for one token per step costs more than the
step's arithmetic. The decoder slices the stacks once per generate() call and runs the layers one after the other
(the compile grows with depth, the step does not copy weights). Compiled steps are cached per model graph.
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.inference.cache import KVCache, LatentCache, cache_layout
from dsv3_jax.model.rope import rope_cos_sin


class Decoder(NamedTuple):
    """Pure state of a model for decoding: graph definitions (static) and arrays."""

    graphdef: nnx.GraphDef  # the whole model (its layer stacks are passed along but not read by the steps)
    layer_defs: tuple  # one graph definition per layer, dense layers first (MoE experts as separate arrays)
    state: nnx.State
    layer_states: tuple  # one state per layer: the stacks sliced once
    mtp_def: nnx.GraphDef | None = None  # the first MTP module (speculative drafting), if the model has one
    mtp_state: nnx.State | None = None

    @classmethod
    def of(cls, model) -> "Decoder":
        """Split a Transformer: the whole state, and each stacked layer (and the first MTP module) sliced out.
        The slices are kept with the model and reused while its stacked weights are the same arrays."""
        _, state = nnx.split(model)
        leaves = jax.tree.leaves(state)
        hit = _DECODERS.get(model)
        if hit is not None and len(hit[0]) == len(leaves) and all(a is b for a, b in zip(hit[0], leaves)):
            return hit[1]
        dec = cls._split(model)
        _DECODERS[model] = (leaves, dec)
        return dec

    @classmethod
    def _split(cls, model) -> "Decoder":
        graphdef, state = nnx.split(model)
        defs, states = [], []
        for stack in (model.dense_layers, model.moe_layers):
            if stack is None:
                continue
            gd, st = nnx.split(stack)
            for layer_state in _unstack(st, jax.tree.leaves(st)[0].shape[0]):
                d, s = _decode_form(nnx.merge(gd, layer_state))
                defs.append(d)
                states.append(s)
        mtp_def = mtp_state = None
        if model.mtp is not None:
            mtp_def, mtp_stack = nnx.split(model.mtp)
            mtp_def, mtp_state = _decode_form(nnx.merge(mtp_def, _unstack(mtp_stack, 1)[0]))
        return cls(graphdef, tuple(defs), state, tuple(states), mtp_def, mtp_state)

    def forward(self, state, layer_states, tokens_BT, positions_BT, cache):
        """(logits [B,T,V], hidden [B,T,D], cache): Transformer.forward against the cache with the layers one by
        one (call under jit)."""
        layers = [nnx.merge(d, s) for d, s in zip(self.layer_defs, layer_states)]
        return nnx.merge(self.graphdef, state).forward_cached(tokens_BT, positions_BT, cache, layers)

    def mtp_forward(self, state, mtp_state, hidden_BTD, next_tokens_BT, positions_BT, cache: LatentCache | KVCache):
        """The first MTP module at `positions` (h_i of the main model, token i+1) against its own one-layer cache:
        (logits [B,T,V], cache). Call under jit."""
        model, mod = nnx.merge(self.graphdef, state), nnx.merge(self.mtp_def, mtp_state)
        cos, sin = rope_cos_sin(positions_BT, model.config)
        h, _, (a, b) = mod(hidden_BTD, model.embed_tokens(next_tokens_BT), cos, sin, cache=(cache[0][0], cache[1][0]),
                           positions_BT=positions_BT)
        return model.output_head(mod.head_norm(h)), type(cache)((a,), (b,))

    def static(self) -> tuple:
        """The hashable part (graph definitions), the key of compiled steps."""
        return self.graphdef, self.layer_defs, self.mtp_def


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode_form(module):
    """nnx.split of a block (or MTP module) in the decoder's form: its MoE, if any, holds the experts as separate
    arrays (MoE.split_experts: a decode step reads the chosen experts' weights without copying them) and its MLA
    the absorbed weights head-major (MLA.absorb_weights: not cut from wkv_b at every step)."""
    block = getattr(module, "block", module)
    if hasattr(block.ffn, "split_experts"):
        block.ffn.split_experts()
    if hasattr(block.attn, "absorb_weights"):
        block.attn.absorb_weights()
    return nnx.split(module)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(stacked, n: int):
    return [jax.tree.map(lambda a: a[i], stacked) for i in range(n)]


def layer_cache(cfg, batch: int, max_len: int, dtype, layers: int | None = None) -> LatentCache | KVCache:
    """A zero cache as per-layer arrays for each of `layers` layers: [B, S, C] and [B, S, R] (MLA's latent cache)
    or [B, S, G, K] keys and values (MHA/GQA)."""
    n = cfg.num_hidden_layers if layers is None else layers
    kind, a, b = cache_layout(cfg)
    return kind(tuple(jnp.zeros((batch, max_len) + a, dtype) for _ in range(n)),
                tuple(jnp.zeros((batch, max_len) + b, dtype) for _ in range(n)))


@functools.lru_cache(maxsize=64)
def compile_step(fn, static: tuple, donate: tuple[str, ...], *settings):
    """jax.jit of fn(decoder, *settings, *arrays), once per (function, model graph, settings); the arguments
    named in `donate` (the caches) are updated in place."""
    graphdef, layer_defs, mtp_def = static
    dec = Decoder(graphdef, layer_defs, None, None, mtp_def, None)
    return jax.jit(functools.partial(fn, dec, *settings), donate_argnames=donate)
