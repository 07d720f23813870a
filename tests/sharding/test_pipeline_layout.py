"""Uneven pipeline stages and the pipeline layout of the train state (sharding/stage_layout.py; paper §3.2.1):
the cost-balanced default against a brute-force minimax, --stage-layers validation, the model-tree <-> pipeline
layout round trip with padding, the state sharded over pp, and `train()` under pipeline schedules on 8 simulated
devices giving the single-device losses (also across a checkpoint restore)."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import TINY, get_preset
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.train.loop import RunArgs, _place, load_workdir, train
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.train.step import split_model
from sharding.mesh import build_mesh
from sharding.pipeline import make_schedule
from sharding.pipeline_exec import stage_homes
from sharding.pipeline_transformer import pipeline_state
from sharding.rules import train_state_shardings
from sharding.stage_layout import (StageLayout, balanced_layout, from_pipeline, parse_stage_layers, stage_costs,
                                   to_pipeline, tree_from_pipeline, tree_to_pipeline)
from tests import background
from tests.sharding.runs import metrics, write_corpus
from tests.xla_flags import with_fast_compile

ROOT = pathlib.Path(__file__).parents[2]
V3 = get_preset("deepseek-v3")
TINY5 = TINY.replace(num_hidden_layers=5)  # 1 dense + 4 MoE layers


def _stage_cost(cfg, counts, c):
    cost = [n * c.moe for n in counts]
    cost[0] += c.embed + cfg.num_dense_layers * c.dense
    cost[-1] += c.head
    return cost


def _brute_force_best(cfg, stages, c):
    """The smallest possible most-expensive-stage cost over every split of the MoE layers (compositions)."""
    best = float("inf")
    for cuts in itertools.combinations_with_replacement(range(cfg.num_moe_layers + 1), stages - 1):
        counts = np.diff((0,) + cuts + (cfg.num_moe_layers,))
        best = min(best, max(_stage_cost(cfg, list(counts), c)))
    return best


def test_balanced_layout_v3_and_tiny():
    lay = balanced_layout(V3, 16)
    # 3 dense + 1 MoE with the embedding, 4 MoE layers on each middle stage, 1 with the head and MTP module
    assert lay.stage_layers() == (4,) + (4,) * 14 + (1,) and lay.num_moe == 58 and lay.slots == 4
    c = stage_costs(V3)
    assert 3.5 < c.head / c.moe < 4.5  # head + MTP ~ 4 layers (vocab 129280 x 7168 twice, an MoE block)
    assert max(_stage_cost(V3, lay.moe_counts, c)) <= 1.25 * sum(_stage_cost(V3, lay.moe_counts, c)) / 16
    for cfg, stages in ((TINY, 2), (TINY, 4), (TINY5, 4), (TINY5, 3), (V3.replace(num_hidden_layers=13), 4)):
        lay, c = balanced_layout(cfg, stages, seq_len=16), stage_costs(cfg, 16)
        assert lay.num_moe == cfg.num_moe_layers and lay.num_stages == stages
        assert max(_stage_cost(cfg, lay.moe_counts, c)) == pytest.approx(_brute_force_best(cfg, stages, c))


@pytest.mark.parametrize("spec,stages,message", [
    ("4,4", 3, "gives 2 stages; the schedule has 3"),
    ("2,x", 2, "expected comma-separated layer counts"),
    ("2,2", 2, "sums to 4 layers; the model has 3"),
    ("0,3", 2, "its count must be at least 1"),
    ("4,-1", 2, "must be >= 0"),
])
def test_stage_layers_are_validated(spec, stages, message):
    with pytest.raises(ValueError, match=message):
        parse_stage_layers(spec, TINY, stages)


def test_stage_layers_override_and_impossible_layouts():
    assert parse_stage_layers("1,0,2", TINY, 3) == StageLayout((0, 0, 2), 1)
    assert parse_stage_layers("2,1,2,0", TINY5, 4).moe_counts == (1, 1, 2, 0)
    with pytest.raises(ValueError, match="no MoE layer"):
        balanced_layout(TINY.replace(first_k_dense_replace=3), 2)
    with pytest.raises(ValueError, match="no MoE layer"):
        StageLayout((0, 0))


def test_round_trip_with_padding():
    layout = StageLayout((1, 0, 2, 1))  # 4 stages, 2 slots: padding in stages 0, 1 and 3
    homes = stage_homes(make_schedule("dualpipev", 2, 4))
    assert homes.tolist() == [[0, 3], [1, 2]]
    stack = np.arange(4 * 3, dtype=np.float32).reshape(4, 3) + 1
    piped = to_pipeline(stack, layout, homes)
    assert piped.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(piped[0, 0], [stack[0], np.zeros(3)])  # stage 0: layer 0 + padding
    np.testing.assert_array_equal(piped[0, 1], [stack[3], np.zeros(3)])  # stage 3: layer 3 + padding
    np.testing.assert_array_equal(piped[1, 0], np.zeros((2, 3)))  # stage 1: empty
    np.testing.assert_array_equal(piped[1, 1], stack[1:3])  # stage 2: layers 1, 2
    np.testing.assert_array_equal(from_pipeline(piped, layout, homes), stack)
    np.testing.assert_array_equal(from_pipeline(to_pipeline(jnp.asarray(stack), layout, homes), layout, homes),
                                  stack)
    # the model tree: moe_layers leaves change layout and logical axes, the rest is untouched
    _, params, bias = split_model(Transformer(TINY5, nnx.Rngs(0)))
    lay5 = StageLayout((1, 1, 2, 0), 1)
    homes5 = stage_homes(make_schedule("1f1b", 4, 8))
    piped = tree_to_pipeline(params, lay5, homes5)
    w = piped["moe_layers"]["attn"]["wkv_a"]
    assert w.shape == (4, 1, 2) + params["moe_layers"]["attn"]["wkv_a"].shape[1:]
    assert w.get_metadata()["out_sharding"][:3] == ("stages", None, "layers")
    back = tree_from_pipeline(piped, lay5, homes5)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert nnx.get_partition_spec(back) == nnx.get_partition_spec(params)
    b = tree_to_pipeline(bias, lay5, homes5)["moe_layers"]["ffn"]["expert_bias"]
    assert b.shape == (4, 1, 2, TINY5.n_routed_experts)


def test_state_is_sharded_over_pp():
    """The MoE stack, its gradients' shape and the optimizer moments on a pp=2 x dp=2 x ep=2 mesh: each pp rank
    holds half the stack (the moments also split over dp x ep: ZeRO-1); abstract construction allocates nothing."""
    mesh = build_mesh("pp=2,dp=2,ep=2", TINY)
    schedule = make_schedule("1f1b", 2, 4)
    layout, homes = StageLayout((1, 1), 1), stage_homes(schedule)
    _, params, bias = split_model(Transformer(TINY, nnx.Rngs(0)))
    opt = make_optimizer(params, 1e-3, 10)
    abstract = jax.eval_shape(lambda p, b: pipeline_state(p, b, opt, layout, homes), params, bias)
    shardings = train_state_shardings(abstract, mesh)
    state = _place(pipeline_state(params, bias, opt, layout, homes), shardings)
    w = state["params"]["moe_layers"]["attn"]["wq_b"]
    assert w.shape[:3] == (2, 1, 1)
    assert {s.data.shape for s in w.addressable_shards} == {(1,) + w.shape[1:]}  # half the stack per device
    for s in w.addressable_shards:
        rank = s.index[0].start
        np.testing.assert_array_equal(s.data[0, 0, 0], params["moe_layers"]["attn"]["wq_b"][rank])
    experts = state["params"]["moe_layers"]["ffn"]["w_gate"]  # [2, 1, 1, E, ...]: also split over ep
    assert experts.addressable_shards[0].data.shape[:4] == (1, 1, 1, TINY.n_routed_experts // 2)
    mu = [x for x in jax.tree.leaves(state["opt"]) if x.shape == w.shape]
    assert mu and all(x.addressable_shards[0].data.size * 8 == x.size for x in mu)  # pp x dp x ep
    edge = state["params"]["embed"]
    assert edge.addressable_shards[0].data.shape == edge.shape  # the edges stay replicated over pp


# ---- train(): pipelined runs against the single-device run ------------------------------------------------------

STEPS = 2
BASE = dict(steps=STEPS, batch=16, seq_len=16, lr=3e-3, save_every=1, sample_tokens=0, progress=False)


# The 8-device runs go to a child process: there `dsv3_jax.cpu_collective_threads` gives XLA:CPU the threads their
# concurrent collectives need (a DualPipe step aborted about one time in three without), and this process keeps
# its own small thread pool, which its many small single-device programs run faster on.
_CHILD = "import json, sys\nfrom dsv3_jax.train.loop import RunArgs, train\n" \
         "for workdir, kw in json.loads(sys.argv[1]):\n    train(RunArgs(workdir=workdir, **kw))\n"


EVALUATION = dict(eval_every=STEPS, eval_batches=1, eval_fraction=0.0)


@background.job("pipeline_layout")
def _piped(d):
    corpus = write_corpus(d / "corpus.txt")
    base = BASE | dict(data=[str(corpus)])
    evaluation = EVALUATION | dict(eval_data=[f"corpus={corpus}"])
    mesh = dict(mesh="pp=2,dp=2,ep=2")
    piped = [("1f1b", mesh | dict(pipeline="1f1b")), ("dualpipev", mesh | dict(pipeline="dualpipev")),
             # DualPipe stopped after step 1 and resumed from its checkpoint (the pipeline layout saved, restored)
             ("dualpipe", mesh | dict(pipeline="dualpipe", stop_at=1)),
             ("dualpipe", mesh | dict(pipeline="dualpipe", resume=True)),
             # 5 layers on pp=4 x ep=2 with a user layout: stages of 1, 1, 2 and 0 MoE layers (padding in 3 of 4)
             ("pp4", dict(mesh="pp=4,ep=2", pipeline="1f1b", set=["num_hidden_layers=5"], stage_layers="2,1,2,0",
                          **evaluation))]
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": with_fast_compile("--xla_force_host_platform_device_count=8")}
    child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([(str(d / n), base | kw) for n, kw in piped])],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=1800)
    assert child.returncode == 0, child.stdout[-4000:]
    return {n: d / n for n in ("1f1b", "dualpipev", "dualpipe", "pp4")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-device references, trained here on the same corpus, and the pipelined runs of the background
    job."""
    d = tmp_path_factory.mktemp("pplayout")
    corpus = write_corpus(d / "corpus.txt")
    base = BASE | dict(data=[str(corpus)])
    train(RunArgs(workdir=str(d / "single"), **base))  # on one device (DSV3_DEVICES=1)
    train(RunArgs(workdir=str(d / "single5"), set=["num_hidden_layers=5"], **base,
                  **EVALUATION | dict(eval_data=[f"corpus={corpus}"])))
    return {"single": d / "single", "single5": d / "single5"} | background.result("pipeline_layout")


@pytest.mark.parametrize("name,ref", [("1f1b", "single"), ("dualpipev", "single"), ("dualpipe", "single"),
                                      ("pp4", "single5")])
def test_pipelined_train_gives_the_single_device_losses(runs, name, ref):
    piped, single = metrics(runs[name]), metrics(runs[ref])
    assert [r["step"] for r in piped] == list(range(1, STEPS + 1)) and len(single) == STEPS
    for a, b in zip(piped, single):
        for key in ("loss", "ce", "mtp_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]), (key, a, b)
        assert a["balance_loss"] == pytest.approx(b["balance_loss"], rel=1e-4, abs=1e-9)
        assert a["max_vio"] == pytest.approx(b["max_vio"], abs=1e-5)  # padding slots are not layers


def test_held_out_evaluation_reads_the_pipeline_state_as_the_model(runs):
    piped, single = (json.loads((runs[n] / "eval.jsonl").read_text().splitlines()[-1]) for n in ("pp4", "single5"))
    assert piped["step"] == single["step"] == STEPS
    a, b = piped["sets"]["corpus"], single["sets"]["corpus"]
    assert a["ce"] == pytest.approx(b["ce"], rel=1e-4) and len(a["load"]) == TINY5.num_moe_layers
    np.testing.assert_allclose(a["load"], b["load"], atol=1e-6)  # per-layer expert loads, model order, no padding


def test_pipeline_checkpoint_holds_the_layout_and_loads_as_the_model(runs):
    meta = json.loads((runs["dualpipe"] / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
    assert meta["stage_layout"]["homes"] == [[0], [1]]
    piped, _ = load_workdir(runs["pp4"])
    single, _ = load_workdir(runs["single5"])
    a, b = nnx.state(piped), nnx.state(single)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-5)  # two Adam steps of the same gradients
    with pytest.raises(ValueError, match="pipeline layout"):  # resumed with another layout: refused up front
        train(RunArgs(workdir=str(runs["pp4"]), data=None, steps=STEPS + 1, resume=True, preset="tiny",
                      set=["num_hidden_layers=5"], mesh="pp=4,ep=2", pipeline="1f1b", batch=16, seq_len=16))
