"""experiments/posttrain_demo.py --quick: pretraining, SFT and GRPO chained through their public entry points, with
exact match measured after each stage on problems none of the stages saw."""

import importlib.util
import json
import pathlib

import pytest

from tests import background

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _demo():
    spec = importlib.util.spec_from_file_location("posttrain_demo", ROOT / "experiments" / "posttrain_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


background.quick_module("posttrain_demo", "experiments.posttrain_demo", out="demo")


def test_quick_demo_runs_every_stage():
    demo = _demo()
    out = background.result("posttrain_demo")
    results = json.loads((out / "results.json").read_text())
    stages = results["exact_match"]
    assert list(stages) == ["pretrained (plain text prompt)", "pretrained (chat prompt)", "after SFT", "after GRPO"]
    assert all(0.0 <= v <= 1.0 for v in stages.values())
    for stage in ("pretrain", "sft", "grpo"):
        assert (out / stage / "metrics.jsonl").is_file() and (out / stage / "checkpoints").is_dir()
    assert (out / "results.md").read_text().startswith("| stage | exact match |")
    with pytest.raises(SystemExit, match="not empty"):
        demo.main(["--out", str(out), "--quick"])


def test_evaluation_problems_are_held_out():
    demo = _demo()
    held_out = demo.eval_problems(50, 2)
    assert len({p.prompt for p in held_out}) == 50
    excluded = frozenset(p.prompt for p in held_out)
    for stage in ("pretrain", "sft", "grpo"):
        assert not excluded & {p.prompt for p in demo.problems(stage, 3000, 2, excluded)}
