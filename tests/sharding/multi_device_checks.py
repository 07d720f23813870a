"""Run as a script on 8 simulated CPU devices (tests/sharding/test_sharded_training.py starts it): loss and
gradients of the tiny model under meshes dp=8, ep=8, dp=2 x ep=4 against the single-device computation, the
expert-parallel MoE under adversarial routing against the single-device MoE, the train step with a masked, packed
Batch over dp=2 x ep=4 against the single-device loss and gradients, and (given a corpus and a workdir) `train()`
over dp=2 x ep=4. Prints one JSON line after RESULTS."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from dsv3_jax.config import TINY  # noqa: E402
from dsv3_jax.losses import cross_entropy, mtp_loss  # noqa: E402
from dsv3_jax.model.moe import MoE  # noqa: E402
from dsv3_jax.model.transformer import Transformer  # noqa: E402
from dsv3_jax.train.loop import RunArgs, train  # noqa: E402
from dsv3_jax.train.optim import make_optimizer  # noqa: E402
from dsv3_jax.train.step import (Batch, StepConfig, batch_loss_terms, init_state, make_train_step,  # noqa: E402
                                 split_model)
from sharding.mesh import build_mesh  # noqa: E402
from sharding.rules import batch_spec, train_state_shardings  # noqa: E402

MESHES = ("dp=8", "ep=8", "dp=2,ep=4")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def gradient_checks(out):
    model = Transformer(TINY, nnx.Rngs(0))
    graphdef, params, bias = split_model(model)
    # a non-zero bias, so the bias enters the routing as it does after some training
    bias = jax.tree.map(lambda b: 0.05 * jax.random.normal(jax.random.key(3), b.shape), bias)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, TINY.vocab_size)

    def loss_fn(params, bias, window):
        m = nnx.merge(graphdef, params, bias)
        o = m.forward(window[:, :-1])
        loss = cross_entropy(o.logits, window[:, 1:]) + 0.3 * mtp_loss(o.mtp_logits, window) + 1e-4 * (
            o.balance + o.mtp_balance)
        return loss, (o.expert_counts, o.mtp_expert_counts, o.balance_batch + o.mtp_balance_batch)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss0, counts0), grads0 = jax.jit(grad_fn)(params, bias, tokens)
    state = init_state(params, bias, make_optimizer(params, 1e-3, 10))
    for spec in MESHES:
        mesh = build_mesh(spec, TINY, batch=8)
        sh = train_state_shardings(state, mesh)
        p_sh, b_sh = sh["params"], sh["bias"]
        t_sh = NamedSharding(mesh, batch_spec(2))
        f = jax.jit(grad_fn, in_shardings=(p_sh, b_sh, t_sh))
        with jax.set_mesh(mesh):
            (loss1, counts1), grads1 = f(jax.device_put(params, p_sh), jax.device_put(bias, b_sh),
                                         jax.device_put(tokens, t_sh))
        errs = [rel_err(g1, g0) for g1, g0 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0))]
        expert_sharded = any("ep" in str(s.spec) for s in jax.tree.leaves(p_sh))
        out[spec] = {"loss_rel": rel_err(loss1, loss0), "grad_rel_max": max(errs), "n_grads": len(errs),
                     "counts_equal": bool(np.array_equal(counts1[0], counts0[0])
                                          and np.array_equal(counts1[1], counts0[1])),
                     "balance_batch_rel": rel_err(counts1[2], counts0[2]),
                     "experts_sharded": expert_sharded}


def adversarial_moe_checks(out):
    """Every token prefers the same experts (a large bias on experts 0 and 1): all rows go to one or two ranks;
    the expert-parallel output must still equal the single-device one (nothing dropped)."""
    moe = MoE(TINY, jnp.float32, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (8, 16, TINY.hidden_size))
    f = nnx.jit(lambda m, x: m(x))
    cases = {"one_expert": jnp.zeros((8,)).at[0].set(10.0), "two_experts": jnp.zeros((8,)).at[:2].set(10.0)}
    for name, b in cases.items():
        moe.expert_bias[...] = b
        y0, aux0 = f(moe, x)
        for spec in ("ep=8", "dp=2,ep=4"):
            mesh = build_mesh(spec, TINY, batch=8)
            with jax.set_mesh(mesh):
                y1, aux1 = f(moe, jax.device_put(x, NamedSharding(mesh, P(("dp", "ep")))))
            out[f"adversarial_{name}_{spec}"] = {
                "max_abs_diff": float(jnp.max(jnp.abs(y1 - y0))), "max_abs": float(jnp.max(jnp.abs(y0))),
                "counts_equal": bool(np.array_equal(aux1.counts_E, aux0.counts_E)),
                "top_expert_load": int(aux0.counts_E[0])}


def masked_batch_checks(out):
    """make_train_step over dp=2 x ep=4 with a Batch (loss mask, segment ids, padding) against the single-device
    value and gradient of the same loss (read from the optimizer state of an optimizer that stores the gradient)."""
    model = Transformer(TINY, nnx.Rngs(0))
    graphdef, params, bias = split_model(model)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, TINY.vocab_size, (1, 8, 17)).astype(np.int32)
    seg = np.zeros((1, 8, 17), np.int32)
    for r, cuts in enumerate(rng.integers(3, 8, (8, 2))):
        seg[0, r, :cuts[0]], seg[0, r, cuts[0]:cuts[0] + cuts[1] + 4] = 1, 2  # two samples, a padding tail
    mask = (rng.random((1, 8, 17)) > 0.3).astype(np.float32)
    batch = Batch(tokens, mask, seg)
    sc = StepConfig()

    def loss_fn(params, bias):
        loss, parts, _ = batch_loss_terms(nnx.merge(graphdef, params, bias), jax.tree.map(lambda a: a[0], batch),
                                          0.3, sc.balance_alpha)
        return loss

    loss0, grads0 = jax.jit(jax.value_and_grad(loss_fn))(params, bias)
    keep_grads = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                              lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    state = init_state(params, bias, keep_grads)
    mesh = build_mesh("dp=2,ep=4", TINY, batch=8)
    sh = train_state_shardings(state, mesh)
    step = make_train_step(graphdef, keep_grads, sc, mesh=mesh, state_shardings=sh, donate=False)
    new, m = step(jax.device_put(state, sh), batch, 0.3, 0.0)
    errs = [rel_err(g1, g0) for g1, g0 in zip(jax.tree.leaves(new["opt"]), jax.tree.leaves(grads0))]
    out["masked_dp=2,ep=4"] = {"loss_rel": rel_err(m.loss, loss0), "grad_rel_max": max(errs), "n_grads": len(errs),
                               "skipped": bool(m.skipped)}


if __name__ == "__main__":
    results: dict = {}
    gradient_checks(results)
    adversarial_moe_checks(results)
    masked_batch_checks(results)
    if len(sys.argv) == 4:  # corpus, workdir, steps: the same run as the test's single-device reference
        train(RunArgs(workdir=sys.argv[2], steps=int(sys.argv[3]), preset="tiny", batch=8, seq_len=32,
                      data=[sys.argv[1]], save_every=100, sample_tokens=0, progress=False, mesh="dp=2,ep=4"))
    print("RESULTS " + json.dumps(results))
