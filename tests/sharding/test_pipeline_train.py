"""`dsv3 train --pipeline`: pipelined training equals the single-device computation (paper §3.2.1).

On 8 simulated CPU devices (tests/sharding/pipeline_matrix.py, in a subprocess): every schedule's loss, loss parts,
gradients and expert counts on a pp=2 x dp=2 x ep=2 mesh against one device's value_and_grad, and the losses of a
3-step `train()` with DualPipe on pp=4 x ep=2 against a single-device `train()` (its own subprocess, alongside).
The full matrix (both meshes x every schedule, train runs included) is `python tests/sharding/pipeline_matrix.py`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from dsv3_jax.cli import main
from tests import background
from tests.sharding.runs import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "sharding" / "pipeline_matrix.py"


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def runs():
    return background.result("pipeline_train")


@background.job("pipeline_train")
def _runs(d):
    common = ["--workdir", str(d)]
    single = subprocess.Popen([sys.executable, str(SCRIPT), "--single"] + common, cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checks = subprocess.Popen([sys.executable, str(SCRIPT), "--grads", "pp=2,dp=2,ep=2", "--train",
                               "pp=4,ep=2:dualpipe"] + common, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        single_out, _ = single.communicate(timeout=1200)
        out, err = checks.communicate(timeout=1200)
    finally:
        for p in (single, checks):
            if p.poll() is None:
                p.kill()
    assert single.returncode == 0, single_out[-3000:]
    assert checks.returncode == 0, err[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("RESULTS ")][-1]
    return {"dir": d, "results": json.loads(line[len("RESULTS "):])}


def test_every_schedule_matches_single_device_gradients_on_pp_dp_ep(runs):
    rows = {r["schedule"]: r for r in runs["results"]["grads"]}
    assert set(rows) == {"GPipe", "1F1B", "ZB1P", "DualPipe", "DualPipeV"}
    assert rows["DualPipeV"]["stages"] == 4 and rows["GPipe"]["stages"] == 2
    for name, r in rows.items():
        assert r["loss_rel"] <= 1e-6 and r["parts_rel"] <= 1e-5, r  # ce, mtp, balance each
        assert r["grad_rel_max"] <= 1e-5, r  # every parameter's gradient, relative to its largest entry
        assert r["n_grads"] > 40 and r["counts_equal"], r  # expert counts for the bias update, summed
        assert r["ep_all_to_all"], r  # the stages' MoE ran expert-parallel (nested shard_map over dp, ep)


def test_pipelined_train_logs_the_single_device_losses(runs):
    single = metrics(runs["dir"] / "single")
    (r,) = runs["results"]["train"]
    piped = metrics(r["workdir"])
    assert [x["step"] for x in piped] == [1, 2, 3] and len(single) == 3
    for a, b in zip(piped, single):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(b["grad_norm"]), (a, b)
        assert a["max_vio"] == pytest.approx(b["max_vio"], abs=1e-6)
    assert (pathlib.Path(r["workdir"]) / "checkpoints" / "3").is_dir()


@pytest.mark.parametrize("flags,message", [
    (["--mesh", "pp=2"], "choose its schedule with --pipeline"),
    (["--pipeline", "1f1b"], "needs a mesh with a pp axis > 1"),
    (["--mesh", "dp=2", "--microbatches", "2"], "it needs --pipeline"),
    (["--mesh", "pp=2", "--pipeline", "dualpipe", "--microbatches", "3", "--batch", "12"], "even number of micro-b"),
    (["--mesh", "pp=2", "--pipeline", "1f1b", "--microbatches", "1"], "microbatches >= ranks"),
    (["--mesh", "pp=2,dp=2,ep=2", "--pipeline", "gpipe", "--batch", "12"], "multiple of 4 * 4 = 16"),
    (["--mesh", "pp=2", "--pipeline", "zb1p", "--microbatches", "0"], "positive integer"),
    (["--mesh", "pp=2", "--pipeline", "1f1b", "--stage-layers", "1,1,1"], "gives 3 stages; the schedule has 2"),
    (["--mesh", "pp=2", "--pipeline", "1f1b", "--stage-layers", "0,3"], "its count must be at least 1"),
    (["--mesh", "dp=2", "--stage-layers", "1,2"], "it needs --pipeline"),
])
def test_cli_refuses_bad_pipeline_flags(tmp_path, capsys, flags, message):
    assert main(["train", "--workdir", str(tmp_path), "--steps", "1", "--preset", "tiny"] + flags) == 2
    assert message in capsys.readouterr().err
