"""Multi-device checks of sharding/pipeline_exec.py, run as a script in its own process (8 simulated CPU devices).

Prints one JSON object: for each (model, schedule, pp) the pipelined loss next to the sequential single-device
loss and the largest per-leaf gradient error max|g - g_ref| / max|g_ref| (the transformer also with packed,
masked micro-batches under DualPipe); plus the messages of the bad-input checks. tests/sharding/test_pipeline_exec.py runs it and asserts on the numbers.
"""

import os

from tests.xla_flags import with_fast_compile  # noqa: E402

# the checks are numerical: cheaper code generation halves the compile time
os.environ["XLA_FLAGS"] = with_fast_compile("--xla_force_host_platform_device_count=8")

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)  # tiny programs: compile time dominates
from flax import nnx  # noqa: E402

from dsv3_jax.config import get_preset  # noqa: E402
from dsv3_jax.losses import cross_entropy, mtp_loss  # noqa: E402
from dsv3_jax.model.transformer import Transformer  # noqa: E402
from dsv3_jax.train.step import Batch, batch_loss_terms, split_model  # noqa: E402
from sharding.pipeline import make_schedule  # noqa: E402
from sharding.pipeline_exec import PipelineModel, pipeline_value_and_grad, program_shape  # noqa: E402
from sharding.pipeline_transformer import pipeline_train_loss_and_grads  # noqa: E402


def grad_error(got, want) -> float:
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
               for a, b in zip(got, want) if b.size)


def mesh_of(pp):
    return jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp])


def shared_pad(schedules):
    return tuple(max(v) for v in zip(*(program_shape(s) for s in schedules)))


# ---- §8.4-style: a stack of 2-layer GELU MLP stages, fp32, MSE
D, H, B_MLP, IN, OUT = 16, 64, 3, 5, 4


def mlp_embed(e, inp):
    return inp[0] @ e["w_in"]


def mlp_stage(p, h, inp=None):
    return h + jax.nn.gelu(h @ p["w1"]) @ p["w2"], 1e-3 * jnp.sum(p["w1"] ** 2), ()


def mlp_head(e, h, inp):
    return jnp.mean((h @ e["w_out"] - inp[1]) ** 2), ()


MLP = PipelineModel(mlp_embed, mlp_stage, mlp_head)


def mlp_reference(sp, ep, inputs, stages, m):
    """The micro-batches one after another on one device, each through all stages."""

    def loss(sp, ep):
        total = 0.0
        for i in range(m):
            inp = jax.tree.map(lambda a: a[i], inputs)
            h, terms = mlp_embed(ep, inp), 0.0
            for s in range(stages):
                h, t, _ = mlp_stage(jax.tree.map(lambda a: a[s], sp), h)
                terms += t
            total += terms + mlp_head(ep, h, inp)[0]
        return total / m

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(sp, ep)


def mlp_checks(out):
    m = 8
    k = jax.random.split(jax.random.key(0), 6)
    inputs = (jax.random.normal(k[0], (m, B_MLP, IN)), jax.random.normal(k[1], (m, B_MLP, OUT)))
    ep = {"w_in": jax.random.normal(k[2], (IN, D)) * 0.5, "w_out": jax.random.normal(k[3], (D, OUT)) * 0.3}
    params = {s: {"w1": jax.random.normal(k[4], (s, D, H)) * 0.2, "w2": jax.random.normal(k[5], (s, H, D)) * 0.2}
              for s in (2, 4)}
    refs = {s: mlp_reference(params[s], ep, inputs, s, m) for s in (2, 4)}
    runs = [[("gpipe", 2), ("1f1b", 2), ("zb1p", 2), ("dualpipe", 2)], [("dualpipev", 2)],
            [("gpipe", 4), ("1f1b", 4), ("zb1p", 4), ("dualpipe", 4)]]
    for group in runs:
        schedules = [make_schedule(name, pp, m) for name, pp in group]
        pad = shared_pad(schedules)
        for s in schedules:
            loss, grads, _ = pipeline_value_and_grad(MLP, s, mesh_of(s.ranks), params[s.num_stages], ep, inputs,
                                                  pad_to=pad)
            ref_loss, ref_grads = refs[s.num_stages]
            out["mlp"].append(dict(schedule=s.name, pp=s.ranks, stages=s.num_stages, loss=float(loss),
                                   ref_loss=float(ref_loss), grad_err=grad_error(grads, ref_grads)))


# ---- the tiny transformer: CE + lambda MTP + alpha Bal against jax.value_and_grad on one device
def transformer_checks(out):
    cfg = get_preset("tiny").replace(num_hidden_layers=5, first_k_dense_replace=1)  # 1 dense + 4 MoE layers
    graphdef, params, bias = split_model(Transformer(cfg, nnx.Rngs(0)))
    m, mtp_weight, alpha = 8, 0.3, 1e-2
    windows = jax.random.randint(jax.random.key(1), (m, 2, 9), 0, cfg.vocab_size)

    @jax.jit
    @functools.partial(jax.value_and_grad, has_aux=True)
    def one(params, window):
        o = nnx.merge(graphdef, params, bias).forward(window[:, :-1])
        return (cross_entropy(o.logits, window[:, 1:]) + mtp_weight * mtp_loss(o.mtp_logits, window)
                + alpha * (o.balance + o.mtp_balance)), (o.expert_counts, o.mtp_expert_counts)

    per_mb = [one(params, w) for w in windows]
    ref_loss = sum(v for (v, _), _ in per_mb) / m
    ref_grads = jax.tree.map(lambda *g: sum(g) / m, *[g for _, g in per_mb])
    ref_counts = [sum(c[i] for (_, c), _ in per_mb) for i in (0, 1)]
    for pp in (2, 4):
        schedules = [make_schedule(name, pp, m) for name in ("1f1b", "zb1p", "dualpipe")]
        pad = shared_pad(schedules)
        for s in schedules:
            loss, grads, counts, mtp_counts = pipeline_train_loss_and_grads(
                graphdef, params, bias, windows, s, mesh_of(pp), mtp_weight=mtp_weight, balance_alpha=alpha,
                pad_to=pad)
            out["transformer"].append(dict(
                schedule=s.name, pp=pp, loss=float(loss), ref_loss=float(ref_loss),
                grad_err=grad_error(grads, ref_grads), counts=counts.tolist(), ref_counts=ref_counts[0].tolist(),
                mtp_counts=mtp_counts.tolist(), ref_mtp_counts=ref_counts[1].tolist()))
    masked_pipeline_check(out, cfg, graphdef, params, bias, windows, mtp_weight, alpha)


def masked_pipeline_check(out, cfg, graphdef, params, bias, windows, mtp_weight, alpha):
    """Packed micro-batches with loss masks and segment ids through DualPipe on pp=2 against the training step's
    loss (train.step.batch_loss_terms) of each micro-batch on one device."""
    m, b, s = windows.shape
    rng = np.random.default_rng(3)
    seg = np.zeros((m, b, s), np.int32)
    for i, j in np.ndindex(m, b):
        cut = rng.integers(2, 6)
        seg[i, j, :cut], seg[i, j, cut:s - 1] = 1, 2  # two samples, one padding token
    batch = Batch(windows, jnp.asarray((rng.random((m, b, s)) > 0.3).astype(np.float32)), jnp.asarray(seg))

    @jax.jit
    @functools.partial(jax.value_and_grad, has_aux=True)
    def one(params, mb):
        loss, _, o = batch_loss_terms(nnx.merge(graphdef, params, bias), mb, mtp_weight, alpha)
        return loss, (o.expert_counts, o.mtp_expert_counts)

    per_mb = [one(params, jax.tree.map(lambda a: a[i], batch)) for i in range(m)]
    ref_loss = sum(v for (v, _), _ in per_mb) / m
    ref_grads = jax.tree.map(lambda *g: sum(g) / m, *[g for _, g in per_mb])
    ref_counts = [sum(c[i] for (_, c), _ in per_mb) for i in (0, 1)]
    loss, grads, counts, mtp_counts = pipeline_train_loss_and_grads(
        graphdef, params, bias, batch, make_schedule("dualpipe", 2, m), mesh_of(2), mtp_weight=mtp_weight,
        balance_alpha=alpha)
    out["transformer_masked"] = dict(
        schedule="DualPipe", pp=2, loss=float(loss), ref_loss=float(ref_loss), grad_err=grad_error(grads, ref_grads),
        counts_equal=bool(np.array_equal(counts, ref_counts[0]) and np.array_equal(mtp_counts, ref_counts[1])))


def error_checks(out):
    s = make_schedule("1f1b", 2, 4)
    sp = {"w1": jnp.zeros((2, D, H)), "w2": jnp.zeros((2, H, D))}
    ep = {"w_in": jnp.zeros((IN, D)), "w_out": jnp.zeros((D, OUT))}
    inputs = (jnp.zeros((4, B_MLP, IN)), jnp.zeros((4, B_MLP, OUT)))
    cases = {"mesh_size": (mesh_of(4), sp, inputs), "stage_axis": (mesh_of(2), jax.tree.map(lambda a: a[:1], sp),
                                                                   inputs),
             "microbatch_axis": (mesh_of(2), sp, jax.tree.map(lambda a: a[:3], inputs))}
    for name, (mesh, sp_, inputs_) in cases.items():
        try:
            pipeline_value_and_grad(MLP, s, mesh, sp_, ep, inputs_)
        except ValueError as e:
            out["errors"][name] = str(e)
    try:
        pipeline_value_and_grad(MLP, s, mesh_of(2), sp, ep, inputs, pad_to=(1, 1, 1))
    except ValueError as e:
        out["errors"]["pad_to"] = str(e)


def main():
    out = {"mlp": [], "transformer": [], "transformer_masked": {}, "errors": {}, "seconds": {}}
    for name, fn in (("errors", error_checks), ("mlp", mlp_checks), ("transformer", transformer_checks)):
        if len(sys.argv) > 1 and name not in sys.argv[1:]:
            continue
        t0 = time.time()
        fn(out)
        out["seconds"][name] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
