"""Compiled-by-default public model calls (`model(tokens)`, `model.forward(...)`, `model.forward_cached(...)`).

Called on concrete arrays, a decorated method runs as one XLA program: the module is split into (graphdef, state) at
every call, so the program always sees the model's current parameters, and a pure `(graphdef, state, args) -> out`
function is jitted with the graphdef, the method name and every non-array argument static (one compile per model
structure, shapes and flags; two models of one config share it). Called on traced arrays (inside jax.jit, nnx.jit,
grad, scan, shard_map: the train step, the decoders, the pipeline executor) the plain method body runs, so the
caller's trace is not nested. Under `jax.disable_jit()` the body runs eagerly, op by op: the way to debug.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx


class _Dynamic:
    """Hashable marker standing for an array leaf in the static part of the arguments."""

    def __eq__(self, other):
        return isinstance(other, _Dynamic)

    def __hash__(self):
        return 0


_ARRAY = _Dynamic()


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _apply(graphdef, state, method: str, treedef, static: tuple, arrays: tuple):
    """The method `method` of nnx.merge(graphdef, state) on the arguments rebuilt from (treedef, static, arrays)."""
    model = nnx.merge(graphdef, state)
    it = iter(arrays)
    leaves = [next(it) if s == _ARRAY else s for s in static]
    args, kwargs = jax.tree.unflatten(treedef, leaves)
    return getattr(type(model), method).__wrapped__(model, *args, **kwargs)


def compiled_method(fn):
    """Decorator: run a module method compiled when called on concrete arrays, as the plain body when traced."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if jax.config.jax_disable_jit:
            return fn(self, *args, **kwargs)
        leaves, treedef = jax.tree.flatten((args, kwargs))
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return fn(self, *args, **kwargs)
        graphdef, state = nnx.split(self)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state)):
            return fn(self, *args, **kwargs)
        static = tuple(_ARRAY if _is_array(x) else x for x in leaves)
        try:
            hash(static)
        except TypeError:  # an argument that cannot be a static argument (e.g. modules): run the plain body
            return fn(self, *args, **kwargs)
        arrays = tuple(x for x in leaves if _is_array(x))
        return _apply(graphdef, state, fn.__name__, treedef, static, arrays)

    return wrapper
