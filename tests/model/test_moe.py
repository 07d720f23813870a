"""DeepSeekMoE against a plain per-token loop over experts (NumPy), the dropless property under adversarial
routing, and the grouped matmul against a per-group loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.experts import expert_layout, grouped_matmul
from dsv3_jax.model.moe import MoE

CFG = ModelConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, initializer_range=0.3)


def _silu(x):
    return x / (1 + np.exp(-x))


def _numpy_moe(x_TD, p, cfg):
    """Eqs. 12-16 token by token: choose on s + b within the best groups, weight by renormalised s."""
    router, bias = p["router"], p.get("expert_bias")
    out = np.zeros_like(x_TD, dtype=np.float64)
    counts = np.zeros(cfg.n_routed_experts, np.int64)
    g = cfg.n_group
    for t, x in enumerate(x_TD.astype(np.float64)):
        s = 1 / (1 + np.exp(-(x @ router)))
        c = s + (0 if bias is None else bias)
        groups = c.reshape(g, -1)
        gscore = np.sort(groups, axis=-1)[:, -2:].sum(-1)
        keep = np.argsort(-gscore)[: cfg.topk_group]
        masked = np.full_like(c, -np.inf)
        for gi in keep:
            masked[gi * groups.shape[1]:(gi + 1) * groups.shape[1]] = groups[gi]
        chosen = np.argsort(-masked)[: cfg.num_experts_per_tok]
        w = s[chosen] / s[chosen].sum() * cfg.routed_scaling_factor
        for e, we in zip(chosen, w):
            counts[e] += 1
            h = _silu(x @ p["w_gate"][e]) * (x @ p["w_up"][e])
            out[t] += we * (h @ p["w_down"][e])
        out[t] += (_silu(x @ p["sw_gate"]) * (x @ p["sw_up"])) @ p["sw_down"]
    return out, counts


def _params(moe):
    p = {k: np.asarray(getattr(moe, k)[...], np.float64) for k in ("router", "w_gate", "w_up", "w_down")}
    p["expert_bias"] = np.asarray(moe.expert_bias[...], np.float64)
    p.update(sw_gate=np.asarray(moe.shared.w_gate[...], np.float64), sw_up=np.asarray(moe.shared.w_up[...], np.float64),
             sw_down=np.asarray(moe.shared.w_down[...], np.float64))
    return p


@pytest.mark.parametrize("tile,capacity", [(0, 0), (1, 0), (4, 0), (64, 0), (1, 2), (4, 4)])  # 0: ragged_dot
def test_moe_equals_per_token_loop(tile, capacity, monkeypatch):
    monkeypatch.setattr("dsv3_jax.model.experts.default_tile", lambda *_: tile)
    monkeypatch.setattr("dsv3_jax.model.experts.default_capacity", lambda *_: capacity)
    moe = MoE(CFG, jnp.float32, nnx.Rngs(0))
    moe.expert_bias[...] = jnp.asarray(np.random.default_rng(1).uniform(-0.1, 0.1, CFG.n_routed_experts), jnp.float32)
    x = jax.random.normal(jax.random.key(2), (2, 7, CFG.hidden_size))
    y, aux = moe(x)
    ref, counts = _numpy_moe(np.asarray(x).reshape(-1, CFG.hidden_size), _params(moe), CFG)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, CFG.hidden_size), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux.counts_E), counts)


@pytest.mark.parametrize("tile,capacity", [(0, 0), (1, 0), (64, 0), (8, 64)])
def test_dropless_when_every_token_prefers_one_expert(tile, capacity, monkeypatch):
    monkeypatch.setattr("dsv3_jax.model.experts.default_tile", lambda *_: tile)
    monkeypatch.setattr("dsv3_jax.model.experts.default_capacity", lambda *_: capacity)
    cfg = CFG.replace(n_group=1, topk_group=1, num_experts_per_tok=2)
    moe = MoE(cfg, jnp.float32, nnx.Rngs(0))
    bias = np.zeros(cfg.n_routed_experts, np.float32)
    bias[5], bias[2] = 10.0, 9.0  # every token's top choices are experts 5 and 2
    moe.expert_bias[...] = jnp.asarray(bias)
    x = jax.random.normal(jax.random.key(3), (4, 33, cfg.hidden_size))
    y, aux = moe(x)
    n = 4 * 33
    counts = np.asarray(aux.counts_E)
    assert counts[5] == n and counts[2] == n and counts.sum() == 2 * n
    ref, _ = _numpy_moe(np.asarray(x).reshape(-1, cfg.hidden_size), _params(moe), cfg)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.hidden_size), ref, rtol=1e-5, atol=1e-5)


def _row_owner(padded_E, experts: int, capacity: int, rows: int) -> np.ndarray:
    """The expert each buffer row multiplies by (-1: none): C rows per expert, then the segments."""
    owner = np.concatenate([np.repeat(np.arange(experts), capacity), np.repeat(np.arange(experts), padded_E)])
    return np.concatenate([owner, np.full(rows - owner.size, -1)])


@pytest.mark.parametrize("tile,capacity", [(1, 0), (3, 0), (8, 0), (1, 2), (3, 3), (2, 2)])
def test_grouped_matmul_equals_per_group_loop(tile, capacity):
    rng = np.random.default_rng(0)
    e, d, f = 5, 6, 4
    experts = np.array([[3, 0], [3, 1], [4, 3], [0, 3], [3, 4], [1, 0]])  # expert 2 gets nothing
    layout = expert_layout(jnp.asarray(experts), e, tile, capacity)
    dest = np.asarray(layout.row_TK)
    assert len(set(dest.ravel())) == dest.size and dest.max() < layout.rows  # a distinct row for every pair
    np.testing.assert_array_equal(np.asarray(layout.counts_E), np.bincount(experts.ravel(), minlength=e))
    counts = np.bincount(experts.ravel(), minlength=e)
    # the segments hold what the capacity does not, padded to whole tiles
    np.testing.assert_array_equal(np.asarray(layout.padded_E), -(-np.maximum(counts - capacity, 0) // tile) * tile)
    if capacity:
        assert counts.max() > capacity  # rows of the batched product and of the tile loop
    x = rng.standard_normal((layout.rows, d)).astype(np.float32)
    w = rng.standard_normal((e, d, f)).astype(np.float32)
    out = np.asarray(grouped_matmul(jnp.asarray(x), jnp.asarray(w), layout.padded_E, tile, capacity))
    owner = _row_owner(np.asarray(layout.padded_E), e, capacity, layout.rows)
    for i, o in enumerate(owner):
        np.testing.assert_allclose(out[i], x[i] @ w[o] if o >= 0 else 0.0, rtol=1e-5, atol=1e-5)
    # each expert's pairs in token order: the first `capacity` in its capacity rows, the rest in its segment
    for ex in range(e):
        rows = dest[experts == ex]  # row-major: token order
        assert (owner[rows] == ex).all()
        assert (rows[:capacity] == ex * capacity + np.arange(min(capacity, rows.size))).all()
        assert (np.diff(rows) > 0).all()


def test_moe_gradients_flow_to_weights_not_bias():
    moe = MoE(CFG, jnp.float32, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (1, 5, CFG.hidden_size))
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss(p, r):
        y, aux = nnx.merge(graphdef, p, r)(x)
        return jnp.sum(y ** 2) + aux.balance

    g_params, g_rest = jax.grad(loss, argnums=(0, 1))(params, rest)
    assert float(jnp.abs(g_params["router"][...]).sum()) > 0  # the router learns through the gate values
    assert float(jnp.abs(g_params["w_down"][...]).sum()) > 0
    assert "expert_bias" not in params  # the bias is state, not a parameter
    assert float(jnp.abs(g_rest["expert_bias"][...]).sum()) == 0.0  # and selection is not differentiable


@pytest.mark.parametrize("tile,capacity,dtype", [(4, 0, jnp.float32), (8, 0, jnp.float32), (4, 4, jnp.float32),
                                                 (2, 4, jnp.float32), (2, 4, jnp.bfloat16)])
def test_grouped_matmul_gradients_match_autodiff_of_plain_products(tile, capacity, dtype):
    """Against float32 autodiff of row-by-row products; in bfloat16 (row-major operands on the CPU's bfloat16
    path, dsv3_jax.model.dense) of the same bfloat16 values, to bfloat16's precision."""
    rng = np.random.default_rng(1)
    e, d, f = 4, 5, 3
    experts = rng.integers(0, e, (9, 2))
    layout = expert_layout(jnp.asarray(experts), e, tile, capacity)
    x = jnp.asarray(rng.standard_normal((layout.rows, d)), dtype).astype(jnp.float32)
    w = jnp.asarray(rng.standard_normal((e, d, f)), dtype).astype(jnp.float32)
    r = jnp.asarray(rng.standard_normal((layout.rows, f)), dtype).astype(jnp.float32)
    owner = _row_owner(np.asarray(layout.padded_E), e, capacity, layout.rows)
    assert not capacity or np.asarray(layout.padded_E).any()  # some rows overflow to the tile loop

    def plain(x, w):  # row by row: x[i] @ w[owner[i]], zero past the groups
        rows = [x[i] @ w[o] if o >= 0 else jnp.zeros(f) for i, o in enumerate(owner)]
        return jnp.sum(jnp.stack(rows) * r)

    def tiled(x, w):
        y = grouped_matmul(x.astype(dtype), w.astype(dtype), layout.padded_E, tile, capacity)
        return jnp.sum(y.astype(jnp.float32) * r)

    gx, gw = jax.grad(tiled, argnums=(0, 1))(x, w)
    px, pw = jax.grad(plain, argnums=(0, 1))(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(gx), np.asarray(px), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(pw), rtol=tol, atol=tol)
