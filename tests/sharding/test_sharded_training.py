"""Data and expert parallel training equals the single-device computation: loss and gradients on 8 simulated CPU
devices (dp=8, ep=8, dp=2 x ep=4), a masked packed Batch through the step on dp=2 x ep=4, the expert-parallel MoE
under adversarial routing (nothing dropped), `train()` over a mesh and `dsv3 train --mesh` in two processes on
localhost, against a single-device run.

The multi-device work runs in subprocesses, a background job (tests/background.py) started when collection ends."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from dsv3_jax.train.loop import RunArgs, train
from tests import background
from tests.sharding.runs import metrics, write_corpus
from tests.xla_flags import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 5


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = FAST_COMPILE  # as tests/conftest.py: tiny programs, fast compiles
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@background.job("sharded_training")
def _multi(d):
    """The 8-device checks and the two-process training, started together."""
    corpus = write_corpus(d / "corpus.txt")
    checks = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "sharding" / "multi_device_checks.py"), str(corpus), str(d / "mesh8"),
         str(STEPS)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = _free_port()
    cmd = [sys.executable, "-m", "dsv3_jax.cli", "train", "--workdir", str(d / "two_proc"), "--steps", str(STEPS),
           "--preset", "tiny", "--batch", "8", "--seq-len", "32", "--data", str(corpus), "--save-every", "100",
           "--sample-tokens", "0", "--no-progress", "--mesh", "dp=2,ep=2"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i),
                                       XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"))
             for i in range(2)]
    try:
        out, _ = checks.communicate(timeout=1200)
        proc_out = [p.communicate(timeout=1200)[0] for p in procs]
    finally:
        for p in (checks, *procs):
            if p.poll() is None:
                p.kill()
    return {"mesh8": d / "mesh8", "two_proc": d / "two_proc", "checks_rc": checks.returncode, "checks_out": out,
            "procs": [(p.returncode, o) for p, o in zip(procs, proc_out)]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-device reference, trained here on the same corpus, and the background job's runs."""
    d = tmp_path_factory.mktemp("sharded")
    corpus = write_corpus(d / "corpus.txt")
    train(RunArgs(workdir=str(d / "single"), steps=STEPS, preset="tiny", batch=8, seq_len=32, data=[str(corpus)],
                  save_every=100, sample_tokens=0, progress=False))
    return {"single": d / "single"} | background.result("sharded_training")


def _results(runs):
    assert runs["checks_rc"] == 0, runs["checks_out"][-3000:]
    line = [ln for ln in runs["checks_out"].splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("spec", ["dp=8", "ep=8", "dp=2,ep=4"])
def test_loss_and_gradients_equal_single_device(runs, spec):
    r = _results(runs)[spec]
    assert r["loss_rel"] <= 1e-6
    assert r["grad_rel_max"] <= 1e-5, r  # every parameter's gradient, relative to its norm
    assert r["n_grads"] > 40 and r["counts_equal"]
    assert r["balance_batch_rel"] <= 1e-6, r  # batch-wise balance term: global f and P under expert parallelism
    assert r["experts_sharded"] == ("ep" in spec)


def test_masked_packed_batch_step_equals_single_device(runs):
    r = _results(runs)["masked_dp=2,ep=4"]
    assert not r["skipped"] and r["n_grads"] > 40
    assert r["loss_rel"] <= 1e-6 and r["grad_rel_max"] <= 1e-5, r


def test_adversarial_routing_drops_nothing_under_expert_parallelism(runs):
    res = _results(runs)
    cases = [k for k in res if k.startswith("adversarial_")]
    assert len(cases) == 4
    for k in cases:
        r = res[k]
        assert r["top_expert_load"] == 8 * 16  # every token chose expert 0
        assert r["counts_equal"] and r["max_abs_diff"] <= 1e-5 * r["max_abs"], (k, r)


def test_train_over_a_mesh_logs_the_single_device_losses(runs):
    _results(runs)
    single, mesh = metrics(runs["single"]), metrics(runs["mesh8"])
    assert [r["step"] for r in mesh] == list(range(1, STEPS + 1))
    for a, b in zip(mesh, single):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(b["grad_norm"]), (a, b)
        assert a["max_vio"] == pytest.approx(b["max_vio"], abs=1e-6)  # global expert counts
    assert (runs["mesh8"] / "checkpoints" / str(STEPS)).is_dir()


def test_two_processes_log_the_single_process_losses(runs):
    for rc, out in runs["procs"]:
        assert rc == 0, out[-3000:]
    single, multi = metrics(runs["single"]), metrics(runs["two_proc"])
    assert [r["step"] for r in multi] == list(range(1, STEPS + 1))  # process 0 alone writes the metrics
    for a, b in zip(multi, single):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
    assert (runs["two_proc"] / "checkpoints" / str(STEPS)).is_dir()
