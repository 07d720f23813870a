"""Residuals kept as bits (dsv3_jax/residuals.py) and the checkpointed layer that saves them so
(model.params.checkpointed): exact round trips, and gradients equal to plain autodiff, closed-over values included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.params import _saving_bits_fwd, checkpointed
from dsv3_jax.residuals import as_bits, from_bits


def test_bits_round_trip_every_dtype():
    x = jnp.linspace(-3.0, 3.0, 24).reshape(4, 6)
    tree = {"bf16": x.astype(jnp.bfloat16), "f16": x.astype(jnp.float16), "e4m3": x.astype(jnp.float8_e4m3fn),
            "f32": x, "i32": jnp.arange(5), "mask": x > 0}
    bits, dtypes = as_bits(tree)
    assert {k: v.dtype for k, v in bits.items()} == {"bf16": jnp.uint16, "f16": jnp.uint16, "e4m3": jnp.uint8,
                                                     "f32": jnp.float32, "i32": jnp.int32, "mask": jnp.bool_}
    back = from_bits(bits, dtypes)
    for k, v in tree.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(back[k]).view(np.uint8), np.asarray(v).view(np.uint8))


@pytest.mark.parametrize("remat", ["paper", "full"])
def test_checkpointed_layer_scan_gradients_equal_plain_autodiff(remat):
    """A scanned BF16 layer closing over a differentiated value (scale) and a non-differentiated one (mask)."""
    k = jax.random.split(jax.random.key(0), 3)
    ws = jax.random.normal(k[0], (3, 16, 16)) / 4
    h0 = jax.random.normal(k[1], (8, 16))
    mask = jax.random.bernoulli(k[2], 0.7, (8, 16))

    def loss(ws, h0, scale, wrap):
        def layer(h, w):
            y = jnp.dot(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
            return jnp.where(mask, jnp.tanh(y * scale), h), None

        h, _ = jax.lax.scan(wrap(layer), h0, ws)
        return jnp.sum(h ** 2)

    plain = jax.grad(loss, argnums=(0, 1, 2))(ws, h0, 1.5, lambda f: f)
    saved = jax.grad(loss, argnums=(0, 1, 2))(ws, h0, 1.5, lambda f: checkpointed(f, remat))
    for a, b in zip(plain, saved):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_checkpointed_residuals_hold_no_16_bit_floats():
    def layer(h, w):
        return jnp.tanh(jnp.dot(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).astype(jnp.float32))

    h, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    _, (bits, dtypes) = _saving_bits_fwd(jax.checkpoint(layer, policy=jax.checkpoint_policies.everything_saveable),
                                         h, w)
    saved = [a.dtype for a in jax.tree.leaves(bits)]
    assert jnp.uint16 in saved and jnp.bfloat16 not in saved  # the BF16 activations, as their bits
    assert jnp.bfloat16 in [a.dtype for a in jax.tree.leaves(dtypes)]
