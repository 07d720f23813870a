"""Pipelined training against the single-device computation, on 8 simulated CPU devices (paper §3.2.1; reference
§8.4): for meshes pp=2 x dp=2 x ep=2 and pp=4 x ep=2 and every schedule, the training loss, its parts, gradients
and expert counts of `pipeline_train_terms` against one `jax.value_and_grad` of step.py's loss on one device, and
the losses in metrics.jsonl of a few-step `train(--pipeline ...)` against a single-device `train()`.

    python tests/sharding/pipeline_matrix.py                 # the full matrix (slow: one compile per train run)
    python tests/sharding/pipeline_matrix.py --grads pp=2,dp=2,ep=2 --train pp=4,ep=2:dualpipe \\
        --corpus FILE --workdir DIR                           # a subset (tests/sharding/test_pipeline_train.py)

Prints one JSON line `RESULTS {...}`. `--single --corpus FILE --workdir DIR` runs the single-device reference
`train()` (without the simulated devices).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests.*

from tests.xla_flags import with_fast_compile  # noqa: E402

# numerical checks: compile time dominates; the single-device reference (--single) without the simulated devices
os.environ["XLA_FLAGS"] = with_fast_compile(*([] if "--single" in sys.argv else
                                               ["--xla_force_host_platform_device_count=8"]))

import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)  # tiny programs (the reference run too)

from dsv3_jax.config import get_preset  # noqa: E402
from tests.sharding.runs import metrics, write_corpus  # noqa: E402

# 4 dense + 8 MoE layers: 12 layers split over pp = 2 or 4 (mesh check), 8 MoE layers into 2 pp stages (DualPipeV)
CFG = get_preset("tiny").replace(num_hidden_layers=12, first_k_dense_replace=4)
MESHES = ("pp=2,dp=2,ep=2", "pp=4,ep=2")
SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")
STEPS, BATCH, SEQ = 3, 16, 32
MTP_WEIGHT, ALPHA = 0.3, 1e-2


def run_args(workdir, corpus, config, mesh=None, pipeline=None):
    """The RunArgs of the reference and of the pipelined runs: identical but for mesh and pipeline."""
    from dsv3_jax.train.loop import RunArgs

    return RunArgs(workdir=str(workdir), steps=STEPS, preset=None, config=str(config), batch=BATCH, seq_len=SEQ,
                   data=[str(corpus)], lr=3e-3, save_every=100, sample_tokens=0, progress=False, mesh=mesh,
                   pipeline=pipeline)


def write_config(path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.write_text(json.dumps(CFG.to_hf()))
    return path


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


def grad_checks(mesh_spec: str, schedules) -> list[dict]:
    """Loss, parts, gradients and counts of every schedule against the single-device value_and_grad."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dsv3_jax.losses import cross_entropy, mtp_loss
    from dsv3_jax.model.transformer import Transformer
    from dsv3_jax.train.step import split_model
    from sharding.mesh import build_mesh, parse_mesh_spec
    from sharding.pipeline import make_schedule
    from sharding.pipeline_exec import program_shape
    from sharding.pipeline_transformer import pipeline_train_terms
    from sharding.rules import batch_spec

    graphdef, params, bias = split_model(Transformer(CFG, nnx.Rngs(0)))
    sizes = parse_mesh_spec(mesh_spec)
    m = 2 * sizes["pp"]
    b = sizes["dp"] * sizes["ep"]
    windows_MBS = jax.random.randint(jax.random.key(1), (m, b, 9), 0, CFG.vocab_size)

    # step.py's loss of the whole batch on one device: every part is a mean over equal micro-batches
    @jax.jit
    def reference(params, window):
        def loss(params):
            o = nnx.merge(graphdef, params, bias).forward(window[:, :-1])
            ce, mtp = cross_entropy(o.logits, window[:, 1:]), mtp_loss(o.mtp_logits, window)
            bal = ALPHA * (o.balance + o.mtp_balance)
            return ce + MTP_WEIGHT * mtp + bal, (ce, mtp, bal, o.expert_counts, o.mtp_expert_counts)
        return jax.value_and_grad(loss, has_aux=True)(params)

    dev0 = jax.devices()[0]
    (ref_loss, ref_aux), ref_grads = reference(jax.device_put(params, dev0),
                                               jax.device_put(windows_MBS.reshape(m * b, -1), dev0))
    mesh = build_mesh(mesh_spec, CFG)
    params_r = jax.device_put(params, NamedSharding(mesh, P()))
    bias_r = jax.device_put(bias, NamedSharding(mesh, P()))
    windows = jax.device_put(windows_MBS, NamedSharding(mesh, batch_spec(3, batch_dim=1)))
    built = [make_schedule(name, sizes["pp"], m) for name in schedules]
    rows = []
    for s in built:
        same = [o for o in built if o.num_stages == s.num_stages]  # one compiled program per stage count
        pad = tuple(max(v) for v in zip(*(program_shape(o) for o in same)))
        t0 = time.time()
        with jax.set_mesh(mesh):
            loss, grads, parts, counts, mtp_counts = pipeline_train_terms(
                graphdef, params_r, bias_r, windows, s, mesh, mtp_weight=MTP_WEIGHT, balance_alpha=ALPHA, pad_to=pad)
            jax.block_until_ready(grads)
        errs = [float(np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-30))
                for g, r in zip(jax.device_get(jax.tree.leaves(grads)), jax.device_get(jax.tree.leaves(ref_grads)))
                if r.size]
        rows.append(dict(mesh=mesh_spec, schedule=s.name, stages=s.num_stages, microbatches=m,
                         loss_rel=rel(loss, ref_loss), parts_rel=max(rel(a, r) for a, r in zip(parts, ref_aux[:3])),
                         grad_rel_max=max(errs), n_grads=len(errs),
                         counts_equal=bool(np.array_equal(counts, ref_aux[3]))
                         and bool(np.array_equal(mtp_counts, ref_aux[4])),
                         seconds=round(time.time() - t0, 1)))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    with jax.set_mesh(mesh):  # the MoE inside the stages runs expert-parallel: its all-to-alls are in the program
        hlo = jax.jit(lambda p, w: pipeline_train_terms(graphdef, p, bias_r, w, built[0], mesh)[0]).lower(
            params_r, windows).as_text()
    for r in rows:
        r["ep_all_to_all"] = "all_to_all" in hlo if sizes["ep"] > 1 else None
    return rows


def train_check(mesh_spec: str, schedule: str, corpus, config, workdir) -> dict:
    from dsv3_jax.train.loop import train

    t0 = time.time()
    train(run_args(workdir, corpus, config, mesh=mesh_spec, pipeline=schedule))
    return dict(mesh=mesh_spec, schedule=schedule, workdir=str(workdir), seconds=round(time.time() - t0, 1),
                losses=[r["loss"] for r in metrics(workdir)], grad_norms=[r["grad_norm"] for r in metrics(workdir)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grads", nargs="*", help="meshes for the gradient checks (default: both)")
    ap.add_argument("--train", nargs="*", help="MESH:SCHEDULE train() runs (default: every pair)")
    ap.add_argument("--corpus")
    ap.add_argument("--workdir")
    ap.add_argument("--single", action="store_true")
    a = ap.parse_args()
    full = a.grads is None and a.train is None
    workdir = pathlib.Path(a.workdir or "/tmp/pipeline_matrix")
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = pathlib.Path(a.corpus) if a.corpus else write_corpus(workdir / "corpus.txt")
    config = write_config(workdir / "config.json")
    if a.single:
        from dsv3_jax.train.loop import train

        train(run_args(workdir / "single", corpus, config))
        return
    ref = None
    if full:  # the single-device reference runs alongside
        ref = subprocess.Popen([sys.executable, __file__, "--single", "--corpus", str(corpus), "--workdir",
                                str(workdir)], env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    out = {"grads": [], "train": [], "seconds": {}}
    t0 = time.time()
    for spec in (MESHES if a.grads is None else a.grads):
        out["grads"] += grad_checks(spec, SCHEDULES)
    out["seconds"]["grads"] = round(time.time() - t0, 1)
    pairs = [f"{m}:{s}" for m in MESHES for s in SCHEDULES] if a.train is None else a.train
    for pair in pairs:
        spec, schedule = pair.split(":")
        out["train"].append(train_check(spec, schedule, corpus, config, workdir / f"{spec}_{schedule}"))
        print(json.dumps(out["train"][-1]), file=sys.stderr, flush=True)
    out["seconds"]["total"] = round(time.time() - t0, 1)
    if ref is not None:
        assert ref.wait() == 0, "the single-device reference run failed"
        single = metrics(workdir / "single")
        for r in out["train"]:
            r["loss_rel_max"] = max(rel(y, x["loss"]) for x, y in zip(single, r["losses"]))
            r["single_losses"] = [x["loss"] for x in single]
    print("RESULTS " + json.dumps(out))


if __name__ == "__main__":
    main()
