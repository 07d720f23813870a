"""AdamW with bf16 moments and the §4.2 schedules (dsv3_jax/train/optim.py; reference §7)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dsv3_jax
from dsv3_jax.train import optim

# Paper step positions restated from first principles: the ramp (3072 -> 15360 sequences, linear in steps) eats
# 469B tokens at a mean of 9216 x 4096 tokens a step, then 15360 x 4096 tokens a step.
RAMP_STEPS = 469e9 / (9216 * 4096)
TOKENS_PER_STEP = 15360 * 4096
N_EXACT = RAMP_STEPS + (14.8e12 - 469e9) / TOKENS_PER_STEP  # 240,209.37
N = round(N_EXACT)


def at(tokens, total=N):
    """The (fractional) step at which a run of `total` steps has seen the paper's `tokens` tokens."""
    return (RAMP_STEPS + (tokens - 469e9) / TOKENS_PER_STEP) / N_EXACT * total


def f(x):
    return float(np.asarray(x))


# -- schedules --------------------------------------------------------------------------------------------------------
def test_paper_step_count():
    assert optim.PAPER_STEPS == N == 240_209
    assert optim.warmup_steps(N) == 2000
    assert optim.warmup_steps(1000) == 8  # 2000 / 240209 of the run
    assert optim.warmup_steps(10) == 1  # floored to at least one step


def test_lr_paper_values():
    lr = optim.lr_schedule(2.2e-4, N)
    assert f(lr(0)) == 0.0
    np.testing.assert_allclose(f(lr(1000)), 1.1e-4, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(f(lr(2000)), 2.2e-4, rtol=1e-6)  # warmup end
    np.testing.assert_allclose(f(lr(math.floor(at(10e12)) - 1)), 2.2e-4, rtol=1e-6)  # just before 10T
    np.testing.assert_allclose(f(lr(at(12.15e12))), (2.2e-4 + 2.2e-5) / 2, rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose(f(lr(at(11.075e12))), 2.2e-5 + 0.5 * 1.98e-4 * (1 + math.cos(math.pi / 4)),
                               rtol=1e-5)  # a quarter into the cosine
    np.testing.assert_allclose(f(lr(math.ceil(at(14.3e12)))), 2.2e-5, rtol=1e-5)  # at 14.3T
    np.testing.assert_allclose(f(lr(at(14.5e12))), 2.2e-5, rtol=1e-6)  # between 14.3T and 14.633T
    np.testing.assert_allclose(f(lr(math.floor(at(14.633e12)) - 1)), 2.2e-5, rtol=1e-6)
    np.testing.assert_allclose(f(lr(math.ceil(at(14.633e12)))), 7.3e-6, rtol=1e-6)
    np.testing.assert_allclose(f(lr(N - 1)), 7.3e-6, rtol=1e-6)  # the end


def test_lr_is_monotone_after_warmup():
    lr = optim.lr_schedule(2.2e-4, N)
    values = np.asarray(jax.jit(lr)(jnp.arange(2000, N)))
    assert np.all(np.diff(values) <= 0)


def test_other_schedules_paper_values():
    mtp = optim.mtp_weight_schedule(N)
    gamma = optim.bias_update_speed_schedule(N)
    batch = optim.batch_size_schedule(15360, N)
    np.testing.assert_allclose(f(mtp(0)), 0.3, rtol=1e-7)
    np.testing.assert_allclose(f(mtp(math.floor(at(10e12)))), 0.3, rtol=1e-7)
    np.testing.assert_allclose(f(mtp(math.ceil(at(10e12)))), 0.1, rtol=1e-7)
    np.testing.assert_allclose(f(mtp(N - 1)), 0.1, rtol=1e-7)
    np.testing.assert_allclose(f(gamma(0)), 0.001, rtol=1e-7)
    np.testing.assert_allclose(f(gamma(math.floor(at(14.3e12)))), 0.001, rtol=1e-7)
    assert f(gamma(math.ceil(at(14.3e12)))) == 0.0
    assert f(gamma(N - 1)) == 0.0
    assert int(batch(0)) == 3072
    assert 3072 < int(batch(RAMP_STEPS / 2)) < 15360
    assert int(batch(math.ceil(at(469e9)))) == 15360
    assert int(batch(N - 1)) == 15360
    assert batch(0).dtype == jnp.int32


def test_batch_ramp_consumes_paper_tokens():
    """Summing the batch schedule over the paper's steps gives the paper's token counts at the breakpoints."""
    batch = np.asarray(jax.jit(optim.batch_size_schedule(15360, N))(jnp.arange(N)), np.int64)
    assert np.all(np.diff(batch) >= 0)
    tokens = np.cumsum(batch) * 4096
    for t in (469e9, 10e12, 14.3e12, 14.633e12):
        assert abs(np.searchsorted(tokens, t) - at(t)) < 2, t
    np.testing.assert_allclose(tokens[-1], 14.8e12, rtol=1e-5)


def test_schedules_scale_with_total_steps():
    total = 1000
    frac = np.array([0.3, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.985, 0.995])
    lr_paper = np.asarray(optim.lr_schedule(2.2e-4, N)(frac * N)) / 2.2e-4
    lr_small = np.asarray(optim.lr_schedule(1e-3, total)(frac * total)) / 1e-3
    np.testing.assert_allclose(lr_small, lr_paper, rtol=1e-5)
    # the breakpoints land at the same fractions: 10T, 14.3T, 14.633T, 469B
    lr_small_fn = optim.lr_schedule(1e-3, total)
    np.testing.assert_allclose(f(lr_small_fn(math.floor(at(10e12, total)) - 1)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(f(lr_small_fn(at(12.15e12, total))), 0.55e-3, rtol=1e-5)
    np.testing.assert_allclose(f(lr_small_fn(math.ceil(at(14.3e12, total)))), 1e-4, rtol=1e-3)
    np.testing.assert_allclose(f(lr_small_fn(total - 1)), 1e-3 * 7.3e-6 / 2.2e-4, rtol=1e-6)
    np.testing.assert_allclose(f(lr_small_fn(4)), 0.5e-3, rtol=1e-6)  # 4 of 8 warmup steps
    for sched in (optim.mtp_weight_schedule, optim.bias_update_speed_schedule):
        np.testing.assert_array_equal(np.asarray(sched(total)(frac * total)), np.asarray(sched(N)(frac * N)))
    b = optim.batch_size_schedule(64, total)
    assert int(b(0)) == round(64 * 3072 / 15360)
    assert int(b(math.ceil(at(469e9, total)))) == 64
    assert int(optim.batch_size_schedule(1, total)(0)) == 1  # at least one sequence


@pytest.mark.parametrize("make", [
    lambda: optim.lr_schedule(2.2e-4, N),
    lambda: optim.batch_size_schedule(15360, N),
    lambda: optim.mtp_weight_schedule(N),
    lambda: optim.bias_update_speed_schedule(N),
])
def test_schedules_under_jit(make):
    sched = make()
    steps = jnp.array([0, 1, 1999, 2000, 5000, 12424, 12425, 163_000, 200_000, 232_000, 236_000, 237_600, N - 1])
    jitted = jax.jit(sched)(steps)
    eager = np.array([np.asarray(sched(int(s))) for s in steps])
    assert jitted.dtype == eager.dtype
    np.testing.assert_allclose(np.asarray(jitted), eager, rtol=1e-6)  # XLA may fuse the cosine differently


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        optim.lr_schedule(1e-3, 0)
    with pytest.raises(ValueError, match="final_batch"):
        optim.batch_size_schedule(0, 10)
    tx = optim.adamw_bf16_moments(1e-3, mask={"a": True})
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="mask"):
        tx.update(params, tx.init(params), params)


# -- AdamW with bf16 moments -------------------------------------------------------------------------------------------
def _small_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(k1, (4, 3), jnp.float32), "norm": {"weight": 1.0 + 0.1 * jnp.arange(3.0)},
            "b_vec": jax.random.normal(k2, (5,), jnp.float32)}


def _bf16(x):
    return np.asarray(np.asarray(x, np.float32).astype(jnp.bfloat16), np.float32)


def _numpy_adamw(params, grads_seq, lrs, b1, b2, eps, wd, decay):
    """AdamW restated in NumPy float32, moments stored rounded to bfloat16 between steps."""
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    updates = []
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        u = {}
        for k in p:
            gk = np.asarray(g[k], np.float32)
            m = np.float32(b1) * mu[k] + np.float32(1 - b1) * gk
            v = np.float32(b2) * nu[k] + np.float32(1 - b2) * gk * gk
            m_hat = m / (np.float32(1) - np.float32(b1) ** np.float32(t))
            v_hat = v / (np.float32(1) - np.float32(b2) ** np.float32(t))
            step = m_hat / (np.sqrt(v_hat) + np.float32(eps))
            if decay[k]:
                step = step + np.float32(wd) * p[k]
            u[k] = -np.float32(lr) * step
            mu[k], nu[k] = _bf16(m), _bf16(v)
            p[k] = p[k] + u[k]
        updates.append(u)
    return updates, mu, nu


def test_adamw_matches_numpy_restatement():
    params = {k: v for k, v in _small_params().items() if k != "norm"}
    params["n"] = jnp.linspace(0.5, 1.5, 3)
    decay = {"w": True, "b_vec": False, "n": True}
    lrs = [1e-2, 3e-2, 2e-2]
    sched = lambda count: jnp.asarray(lrs)[count]
    tx = optim.adamw_bf16_moments(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decay)
    keys = jax.random.split(jax.random.key(1), len(lrs))
    grads_seq = [jax.tree.map(lambda p, i=i: jax.random.normal(keys[i], p.shape) * (1 + i), params)
                 for i in range(len(lrs))]
    want_updates, want_mu, want_nu = _numpy_adamw(params, grads_seq, lrs, 0.9, 0.95, 1e-8, 0.1, decay)
    state, p = tx.init(params), params
    step = jax.jit(tx.update)
    for g, want in zip(grads_seq, want_updates):
        u, state = step(g, state, p)
        for k in params:
            assert u[k].dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(u[k]), want[k], rtol=1e-6, atol=1e-12)
        p = optax.apply_updates(p, u)
    for k in params:
        assert state.mu[k].dtype == jnp.bfloat16 and state.nu[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(state.mu[k], np.float32), want_mu[k])
        np.testing.assert_array_equal(np.asarray(state.nu[k], np.float32), want_nu[k])
    assert int(state.count) == len(lrs)


def test_moments_are_bf16_after_update():
    params = _small_params()
    tx = optim.make_optimizer(params, 1e-3, 100)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    adam = [s for s in state if isinstance(s, optim.AdamBF16State)]
    assert len(adam) == 1
    moments = jax.tree.leaves((adam[0].mu, adam[0].nu))
    assert len(moments) == 2 * len(jax.tree.leaves(params))
    assert all(m.dtype == jnp.bfloat16 for m in moments)


def test_weight_decay_is_decoupled_and_masked():
    params = _small_params()
    mask = optim.decay_mask(params)
    assert mask == {"w": True, "norm": {"weight": False}, "b_vec": False}
    tx = optim.adamw_bf16_moments(0.5, weight_decay=0.1, mask=optim.decay_mask)  # callable mask
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    chex.assert_trees_all_close(u["w"], -0.5 * 0.1 * params["w"], rtol=1e-6)
    chex.assert_trees_all_equal(u["norm"]["weight"], jnp.zeros(3))
    chex.assert_trees_all_equal(u["b_vec"], jnp.zeros(5))
    # mask=None decays everything; weight_decay=0 none
    u_all, _ = jax.jit(optim.adamw_bf16_moments(0.5, weight_decay=0.1).update)(zeros, tx.init(params), params)
    chex.assert_trees_all_close(u_all, jax.tree.map(lambda p: -0.05 * p, params), rtol=1e-6)
    u_none, _ = jax.jit(optim.adamw_bf16_moments(0.5, weight_decay=0.0).update)(zeros, tx.init(params), None)
    chex.assert_trees_all_equal(u_none, zeros)


def test_clipping_scales_global_norm_10_to_1():
    params = {"w": jnp.zeros((4, 5)), "v": jnp.zeros((3, 3))}
    g = {"w": jnp.full((4, 5), 2.0), "v": jnp.zeros((3, 3)).at[0, 0].set(math.sqrt(20.0))}  # sqrt(80 + 20) = 10
    assert math.isclose(float(optax.tree.norm(g)), 10.0, rel_tol=1e-6)
    tx = optim.make_optimizer(params, 1e-3, 100)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(g, state, params)
    (adam,) = [s for s in state if isinstance(s, optim.AdamBF16State)]
    # first moment after one step is (1 - b1) * clipped gradient; the clipped gradient is g / 10
    clipped = jax.tree.map(lambda m: m.astype(jnp.float32) / 0.1, adam.mu)
    np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.0, rtol=1e-2)
    chex.assert_trees_all_close(clipped, jax.tree.map(lambda x: x / 10, g), rtol=1e-2)


def test_optimizer_state_bytes_matches_real_state():
    params = _small_params()
    n = sum(x.size for x in jax.tree.leaves(params))
    state = optim.make_optimizer(params, 1e-3, 10).init(params)
    real = sum(x.nbytes for x in jax.tree.leaves(state))
    assert optim.optimizer_state_bytes(params) == real == 2 * 2 * n + 4
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert optim.optimizer_state_bytes(abstract, jnp.float32) - optim.optimizer_state_bytes(abstract) == 2 * 2 * n


# -- on the tiny model -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return dsv3_jax.Transformer(dsv3_jax.get_preset("tiny"), nnx.Rngs(0))


def _flat(state):
    return {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def test_decay_mask_on_tiny_model(tiny):
    params = nnx.state(tiny, nnx.Param)
    mask = _flat(optim.decay_mask(params))
    shapes = {k: v.shape for k, v in _flat(params).items()}
    assert mask.keys() == shapes.keys()
    exempt = {k for k, m in mask.items() if not m.get_value()}
    assert exempt == {k for k in shapes if k.split("/")[-1] in ("q_norm", "kv_norm")
                      or k.endswith("norm/weight")}
    assert {"embed", "head", "norm/weight", "moe_layers/attn/kv_norm", "mtp/enorm/weight"} <= mask.keys()
    assert mask["embed"].get_value() and mask["head"].get_value() and mask["moe_layers/ffn/router"].get_value()
    assert len(shapes["moe_layers/attn_norm/weight"]) == 2  # stacked norms are 2-D: the name decides


def test_expert_bias_not_in_optimizer_state(tiny):
    params = nnx.state(tiny, nnx.Param)
    assert any("expert_bias" in k for k in _flat(nnx.state(tiny)))  # the model has one...
    tx = optim.make_optimizer(params, 1e-3, 100)
    state = jax.jit(tx.init)(params)
    paths = ["/".join(map(str, optim._path_names(p))) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths and not any("expert_bias" in p for p in paths)  # ...the optimizer does not
    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(params)) and all(m.dtype == jnp.bfloat16 for m in moments)

    # one step the way nnx.Optimizer takes it (mask from the Variable state, update on nnx.as_pure arrays): decay
    # moves the matrices, never the norms or the expert bias
    tx = optim.adamw_bf16_moments(0.5, weight_decay=0.1, mask=optim.decay_mask(params))

    @jax.jit
    def step(p):
        pure = nnx.as_pure(p)
        u, _ = tx.update(jax.tree.map(jnp.zeros_like, pure), tx.init(p), pure)
        return optax.apply_updates(pure, u)

    tiny.moe_layers.ffn.expert_bias[...] = jnp.ones_like(tiny.moe_layers.ffn.expert_bias[...])
    before = {k: np.asarray(v.get_value()) for k, v in _flat(nnx.state(tiny)).items()}
    nnx.update(tiny, step(params))
    after = {k: np.asarray(v.get_value()) for k, v in _flat(nnx.state(tiny)).items()}
    for k in ("moe_layers/ffn/expert_bias", "norm/weight", "moe_layers/attn/kv_norm", "mtp/hnorm/weight"):
        np.testing.assert_array_equal(after[k], before[k])
    for k in ("embed", "head", "moe_layers/ffn/w_up", "mtp/eh_proj"):
        np.testing.assert_allclose(after[k], 0.95 * before[k], rtol=1e-6)


def test_sft_cosine_schedule():
    """Paper §5.1: cosine from the peak (after an optional linear warmup) to min_lr at the last step."""
    total, warm, peak, low = 11, 2, 5e-6, 1e-6
    f = optim.cosine_lr_schedule(peak, low, total, warm)
    for s in range(total):
        want = (peak * (s + 1) / (warm + 1) if s < warm
                else low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (s - warm) / (total - 1 - warm))))
        assert float(f(s)) == pytest.approx(want, rel=1e-5)
    assert float(optim.cosine_lr_schedule(peak, low, 5)(0)) == pytest.approx(peak)
    assert float(optim.cosine_lr_schedule(peak, low, 5)(4)) == pytest.approx(low)
    with pytest.raises(ValueError, match="min_lr"):
        optim.cosine_lr_schedule(1e-6, 5e-6, 10)
    with pytest.raises(ValueError, match="warmup"):
        optim.cosine_lr_schedule(peak, low, 10, warmup=10)
    assert float(optim.constant_schedule(7.3e-6)(123)) == pytest.approx(7.3e-6)
