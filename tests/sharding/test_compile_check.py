"""The compile-only scale check (sharding/compile_check.py, `dsv3 plan --compile`) and the sharded initialisation
of train.loop.initial_state, in-process on the test session's 8 CPU devices (one CLI subprocess run)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import cli
from dsv3_jax.config import get_preset
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.precision import Precision
from dsv3_jax.train.loop import flat_state, initial_state
from dsv3_jax.train.optim import constant_schedule
from dsv3_jax.train.step import split_model
from sharding import compile_check
from sharding.compile_check import COMPILED_KEYS, compile_memory
from sharding.mesh import build_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = get_preset("tiny")
NO_MTP = CFG.replace(num_mtp_layers=0)  # a smaller program for the compiles


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of ShapeDtypeStructs with shardings: the shard shape of each leaf."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def compiled():
    return compile_memory(NO_MTP, "dp=2,ep=2", seq_len=16, microbatches=2, precision="bf16",
                          devices=jax.devices()[:4])


def test_compile_memory_figures(compiled):
    assert set(COMPILED_KEYS) <= set(compiled) and compiled["devices"] == 4
    assert all(compiled[k] > 0 for k in COMPILED_KEYS)
    assert compiled["peak_bytes"] == (compiled["argument_bytes"] + compiled["output_bytes"] + compiled["temp_bytes"]
                                      - compiled["alias_bytes"])
    assert (compiled["accumulated"], compiled["sequences_per_step"]) == (2, 8)
    # the arguments are the train state's shards on one device (ZeRO-1 moments split over dp x ep, experts over
    # ep) plus the batch [K=2, M/4=1, S=17] int32 and a few scalars; the donated state comes back aliased
    mesh = build_mesh("dp=2,ep=2", NO_MTP, devices=jax.devices()[:4])
    _, _, state, _ = initial_state(NO_MTP, Precision.named("bf16"), seed=0, lr=constant_schedule(1e-4), mesh=mesh,
                                   abstract=True)
    state_bytes = _per_device_bytes(state)
    batch_bytes = 2 * 1 * 17 * 4
    assert state_bytes < _per_device_bytes(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(
            jax.devices()[0])), state))  # something is sharded
    assert 0 <= compiled["argument_bytes"] - (state_bytes + batch_bytes) <= 64
    assert 0 <= state_bytes - compiled["alias_bytes"] <= 64


def test_cli_compile_uses_the_check_and_fits(compiled, monkeypatch, capsys):
    seen = {}

    def fake(cfg, mesh, **kw):
        seen.update(kw, mesh=mesh)
        return dict(compiled)

    monkeypatch.setattr(compile_check, "compile_in_subprocess", fake)
    rc = cli.main(["plan", "--preset", "tiny", "--mesh", "dp=2,ep=2", "--global-batch", "8", "--seq-len", "16",
                   "--precision", "bf16", "--compile"])
    out = capsys.readouterr().out
    assert rc == 0 and "compiled train step" in out and "fits" in out
    assert seen == dict(mesh="pp=1,dp=2,ep=2,tp=1", seq_len=16, micro_batch=1, microbatches=2, pipeline=None,
                        precision="bf16", remat="paper")
    rc = cli.main(["plan", "--preset", "tiny", "--mesh", "dp=2,ep=2", "--global-batch", "8", "--seq-len", "16",
                   "--precision", "bf16", "--compile", "--memory-gb", str(compiled["peak_bytes"] / 2e9)])
    assert rc == 3 and "more than the" in capsys.readouterr().err


def test_cli_compile_json_subprocess_exceeds_memory():
    """One real `dsv3 plan --compile --json` (the child sets the device-count flag), with a device memory below the
    compiled peak: the JSON has the compiled figures and the exit code is 3."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "plan", "--preset", "tiny", "--set",
                           "num_mtp_layers=0", "--mesh", "dp=2", "--global-batch", "2", "--seq-len", "16",
                           "--precision", "bf16", "--compile", "--json", "--memory-gb", "0.0001"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    c = out["compiled"]
    assert c["devices"] == 2 and all(c[k] > 0 for k in COMPILED_KEYS)
    assert c["peak_bytes"] == c["argument_bytes"] + c["output_bytes"] + c["temp_bytes"] - c["alias_bytes"]
    assert c["peak_bytes"] > 0.0001e9 and "0.0001 GB" in proc.stderr
    assert out["gpus"] == 2 and out["total_bytes"] > 0  # the plan's own keys are still there


def test_child_reports_errors_as_one_message(capsys):
    request = json.dumps({"config": CFG.to_hf(), "mesh": "ep=3", "seq_len": 16})
    assert compile_check._child(request) == 2
    line = capsys.readouterr().out.strip()
    assert line.startswith("DSV3_COMPILE_RESULT ")
    assert "ep" in json.loads(line.split(" ", 1)[1])["error"]


def test_sharded_init_equals_unsharded_init():
    mesh = build_mesh("dp=2,ep=2", CFG, devices=jax.devices()[:4])
    _, _, state, shardings = initial_state(CFG, Precision.named("fp32"), seed=3, lr=constant_schedule(1e-3),
                                           mesh=mesh)
    _, params, bias = split_model(Transformer(CFG, nnx.Rngs(3), Precision.named("fp32")))  # eager, one device
    want, got = flat_state({"params": params, "bias": bias}), flat_state(state)
    for name, w in want.items():
        g = got[name]
        assert g.sharding == flat_state(shardings)[name]
        # the same random stream; the truncated normal's transcendentals may round differently when fused (the
        # test flags' elemental emitters, tests/xla_flags.py) than op by op: a few ulp, where another stream or
        # a misplaced shard would differ everywhere
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=0, err_msg=name)
    experts = got["params.moe_layers.ffn.w_gate.value"]
    assert experts.addressable_shards[0].data.shape[1] == CFG.n_routed_experts // 2  # built split over ep
    assert all(np.all(np.asarray(v) == 0) for k, v in got.items() if k.startswith("opt.") and "mu" in k)


@pytest.mark.parametrize("spec", ["dp=2,ep=2", "ep=4"])
def test_planner_state_matches_the_sharded_train_state(spec):
    """With master_weights='whole' (this code's ZeRO-1), the planner's persistent state per device is the real
    train state's shards (train_state_shardings), counted from the abstract state."""
    from sharding.mesh import parse_mesh_spec
    from sharding.planner import TrainSettings, plan

    mesh = build_mesh(spec, CFG, devices=jax.devices()[:4])
    _, _, state, _ = initial_state(CFG, Precision.named("bf16"), seed=0, lr=constant_schedule(1e-4), mesh=mesh,
                                   abstract=True)
    p = plan(CFG, parse_mesh_spec(spec), settings=TrainSettings(global_batch=8, seq_len=32, precision="bf16",
                                                                 master_weights="whole"))
    assert p["state_bytes"] == pytest.approx(_per_device_bytes(state), rel=0.01)
    paper = plan(CFG, parse_mesh_spec(spec), settings=TrainSettings(global_batch=8, seq_len=32, precision="bf16"))
    assert paper["param_bytes"] == p["param_bytes"] / 2  # BF16 working weights instead of FP32


def test_planner_state_matches_the_pipeline_train_state():
    """Under pp the train state keeps the MoE stack sharded over pp and the edges (embedding, dense layers, MTP,
    head) on every pp rank: the planner with edges='replicated' (and master_weights='whole') counts its bytes per
    device; with the paper's edges ('own'), each rank counts fewer. (5 layers, no MTP: the code's cost-balanced
    stage layout is then the planner's split, 2 MoE layers per stage; the 3-layer `tiny` puts both MoE layers on
    the first stage and stores zero padding slots on the second, which the planner does not model.)"""
    from dsv3_jax.train.loop import RunArgs, pipeline_schedule
    from sharding.mesh import parse_mesh_spec
    from sharding.planner import TrainSettings, plan

    cfg = dataclasses.replace(CFG, num_hidden_layers=5, num_mtp_layers=0)
    spec = "pp=2,ep=2"
    args = RunArgs(workdir="unused", steps=1, preset="tiny", mesh=spec, pipeline="1f1b", batch=8, seq_len=32)
    _, layout = pipeline_schedule(args, cfg)
    mesh = build_mesh(spec, cfg, devices=jax.devices()[:4])
    _, _, state, _ = initial_state(cfg, Precision.named("bf16"), seed=0, lr=constant_schedule(1e-4), mesh=mesh,
                                   abstract=True, pipeline=layout)
    settings = TrainSettings(global_batch=8, seq_len=32, precision="bf16", schedule="1f1b", master_weights="whole")
    p = plan(cfg, parse_mesh_spec(spec), settings=dataclasses.replace(settings, edges="replicated"))
    assert p["state_bytes"] == pytest.approx(_per_device_bytes(state), rel=0.01)
    own = plan(cfg, parse_mesh_spec(spec), settings=settings)
    assert own["state_bytes"] < p["state_bytes"]
