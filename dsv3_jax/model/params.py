"""Parameter creation with logical-axis metadata (DESIGN principle 2) and the expert-bias state variable."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Iterator

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.residuals import as_bits, from_bits


class ExpertBias(nnx.Variable):
    """The aux-loss-free routing bias b_i (paper §2.1.2): state, not a parameter.

    It is a separate Variable type so `nnx.split(model, nnx.Param, ExpertBias, ...)` keeps it away from
    gradients, the optimizer and weight decay; `dsv3_jax.balance.update_expert_bias` moves it.
    """


_DEFERRED = contextvars.ContextVar("dsv3_deferred_init", default=False)


@contextlib.contextmanager
def deferred_init() -> Iterator[None]:
    """Inside, `param` makes normal-initialised parameters as zeros tagged with their std; `randomize` then draws
    them all from one flat normal. One compiled random draw instead of one per parameter shape: creating a model
    goes from tens of seconds of XLA compiles to about one on the CPU."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def randomize(module: nnx.Module, key: jax.Array) -> None:
    """Fill every parameter created under `deferred_init` with std * N(0, 1), all from one draw of `key`."""
    flat = [(path, var) for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))
            if var.get_metadata().get("init_std")]
    if not flat:
        return
    shapes = [var.shape for _, var in flat]
    stds = [var.get_metadata()["init_std"] for _, var in flat]
    dtypes = [var.dtype for _, var in flat]

    @jax.jit
    def draw(k):
        z = jax.random.normal(k, (sum(math.prod(s) for s in shapes),), jnp.float32)
        out, start = [], 0
        for shape, std, dtype in zip(shapes, stds, dtypes):
            n = math.prod(shape)
            out.append((std * jax.lax.dynamic_slice_in_dim(z, start, n)).reshape(shape).astype(dtype))
            start += n
        return out

    for (_, var), value in zip(flat, draw(key)):
        var.set_value(value)


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init: str = "normal",
          std: float = 0.006) -> nnx.Param:
    """An nnx.Param of `shape` whose metadata names its logical axes (mapped to a mesh by sharding/rules.py)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    if init == "normal" and _DEFERRED.get():
        return nnx.Param(jnp.zeros(shape, dtype), out_sharding=tuple(axes), eager_sharding=False, init_std=std)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes), eager_sharding=False)


def values(module: nnx.Module) -> dict[str, jax.Array]:
    """The module's own (non-nested) variables as a plain dict of arrays, for the pure block functions."""
    return {name: v.get_value() for name, v in vars(module).items() if isinstance(v, nnx.Variable)}


def stacked(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module | None:
    """`n` copies of make(rngs) with parameters stacked on a leading 'layers' axis (scanned in the forward)."""
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def _make(r):
        return make(r)

    return _make(rngs)


REMAT_POLICIES = ("none", "paper", "full")


def remat_policy(name: str):
    """jax.checkpoint policy for a block: 'paper' recomputes RMSNorm, the MLA up-projections and SwiGLU (paper
    §3.2.3) and keeps everything else; 'full' keeps only the block input; 'none' keeps everything."""
    if name == "paper":
        return jax.checkpoint_policies.save_anything_except_these_names("rmsnorm", "mla_up", "swiglu")
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "none":
        return None
    raise ValueError(f"unknown remat policy {name!r}; expected one of {REMAT_POLICIES}")


def checkpointed(fn: Callable, remat: str) -> Callable:
    """jax.checkpoint(fn) under the named policy, for a layer scanned by lax.scan, with its saved residuals held
    as raw bits between the forward and the backward pass (dsv3_jax/residuals.py: on the CPU, XLA would otherwise
    keep an FP32 copy of every BF16 activation the stack saved, through the whole backward pass)."""
    inner = jax.checkpoint(fn, policy=remat_policy(remat), prevent_cse=False)

    def layer(*args):
        # every value fn closes over (arrays, tracers of the enclosing transformations) becomes an explicit
        # argument of the custom VJP, which cannot differentiate or stage a closed-over tracer
        closed, out_shape = jax.make_jaxpr(inner, return_shape=True)(*args)
        jaxpr = closed.jaxpr.replace(constvars=[], invars=closed.jaxpr.constvars + closed.jaxpr.invars)
        f = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(jaxpr, []))
        out = _saving_bits(f, *closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return layer


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _saving_bits(f, *args):
    return f(*args)


def _saving_bits_fwd(f, *args):
    out, vjp = jax.vjp(f, *args)
    return out, as_bits(vjp)


def _saving_bits_bwd(f, res, cotangent):
    return from_bits(*res)(cotangent)


_saving_bits.defvjp(_saving_bits_fwd, _saving_bits_bwd)


def scan_layers(layers: nnx.Module | None, body: Callable, carry, *xs, remat: str = "none", unroll: bool = False):
    """lax.scan `body(layer, carry, *x_slices) -> (carry, out)` over a stacked module; outputs stacked.
    `remat` names the recomputation policy applied to each layer. `unroll` unrolls the scan: the same result,
    and on the CPU a faster step (XLA then neither zero-fills the stacked residual and gradient buffers nor
    slices every layer's weights in a loop), at a compile time that grows with the depth."""
    if layers is None:
        return carry, None
    graphdef, state = nnx.split(layers)

    def step(c, sliced):
        layer_state, rest = sliced
        return body(nnx.merge(graphdef, layer_state), c, *rest)

    if remat != "none":
        step = checkpointed(step, remat)

    return jax.lax.scan(step, carry, (state, xs), unroll=unroll)
