"""Saved activations kept as raw bits between the forward and the backward pass of a custom VJP.

`as_bits` turns every floating-point array narrower than 32 bits (BF16, FP16, FP8) into an unsigned integer array of
the same width and bytes; `from_bits` turns it back. Both are bitcasts: nothing changes in value or in memory, and
on a GPU they compile to nothing.

Why: a layer scanned by `lax.scan` saves its residuals stacked over layers, and the backward scan slices them
layer by layer. XLA's CPU backend does not slice BF16 or FP8 arrays natively: it converts the whole stack to
FP32 (FP16 for FP8) first, and then hoists that conversion out of the backward loop, so an upcast copy of every
saved activation of the stack lives through the whole backward pass: about 12 GB per device for a 4-layer
DeepSeek-V3 pipeline stage at 4096 tokens (5.4 GB of it the attention core's q, k, v and o), and the
compile-only memory check (`dsv3 plan --compile`) runs on the CPU. Integer slices need no conversion. Users:
the attention core (`model.mla`), the FP8 GEMMs (`fp8`) and every checkpointed layer (`model.params.checkpointed`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_UINT = {1: jnp.uint8, 2: jnp.uint16}


def as_bits(tree):
    """(bits, dtypes): every floating array of 8 or 16 bits in `tree` as the unsigned integers of its bits (others
    unchanged), and a pytree of empty arrays recording the dtypes, for `from_bits`. Both are pytrees of arrays, so
    they can be a custom VJP's residuals."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [jnp.asarray(a) for a in leaves]
    bits = [jax.lax.bitcast_convert_type(a, _UINT[a.dtype.itemsize])
            if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize in _UINT else a for a in leaves]
    return treedef.unflatten(bits), treedef.unflatten([jnp.zeros((0,), a.dtype) for a in leaves])


def from_bits(bits, dtypes):
    """`as_bits`' inverse."""
    return jax.tree.map(lambda a, t: a if a.dtype == t.dtype else jax.lax.bitcast_convert_type(a, t.dtype), bits,
                        dtypes)
