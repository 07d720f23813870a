"""experiments/fp8_vs_bf16.py: the paired relative gaps (against a NumPy-free restatement) and the --quick run's
results.json layout, arms, plausible metrics, plot and table."""

import json
import math

import pytest

from dsv3_jax.config import TINY, apply_overrides
from experiments.fp8_vs_bf16 import main, relative_gaps, width_overrides
from tests import background


background.quick_module("fp8_vs_bf16", "experiments.fp8_vs_bf16")


@pytest.fixture(scope="module")
def quick_run():
    return background.result("fp8_vs_bf16")


def test_width_ladder_and_gaps():
    assert apply_overrides(TINY, width_overrides(64)) == TINY  # the ladder's d=64 rung is tiny itself
    wide = apply_overrides(TINY, width_overrides(256))
    dims = (wide.hidden_size, wide.moe_intermediate_size, wide.kv_lora_rank, wide.qk_rope_head_dim)
    assert dims == (256, 128, 128, 32)
    assert (wide.num_hidden_layers, wide.n_routed_experts, wide.num_attention_heads) == (3, 8, 4)
    with pytest.raises(ValueError, match="multiple of 16"):
        width_overrides(40)
    final = {"fp32_d64": {0: 4.0, 1: 5.0}, "bf16_d64": {0: 4.04, 1: 5.0}, "fp8_d64": {0: 4.08, 1: 4.9}}
    gaps = relative_gaps(final, [64], ["fp32", "bf16", "fp8"])
    assert gaps["fp8_d64"][0]["rel_gap_vs_bf16"] == pytest.approx(0.04 / 4.04)
    assert gaps["fp8_d64"][1]["rel_gap_vs_bf16"] == pytest.approx(-0.02)
    assert gaps["fp8_d64"][0]["rel_gap_vs_fp32"] == pytest.approx(0.02)
    assert gaps["bf16_d64"][0] == {"rel_gap_vs_fp32": pytest.approx(0.01)}
    assert set(relative_gaps(final, [64], ["bf16", "fp8"])) == {"fp8_d64"}  # no fp32: no floor


def test_quick_results(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"bf16_d16", "fp8_d16", "bf16_d32", "fp8_d32"}
    for name, row in arms.items():
        assert 0 < row["final_loss"] < math.log(TINY.vocab_size) + 0.5, name
        assert row["train_seconds"] > 0
    for d in (16, 32):
        gap = arms[f"fp8_d{d}"]["rel_gap_vs_bf16"]
        assert math.isfinite(gap) and abs(gap) < 0.2  # same data and seed: the losses are close
        expect = arms[f"fp8_d{d}"]["final_loss"] / arms[f"bf16_d{d}"]["final_loss"] - 1  # one seed: mean = value
        assert gap == pytest.approx(expect)
        assert results["widths"][str(d)]["fp8_vs_bf16"]["mean"] == pytest.approx(gap)
    assert results["widths"]["32"]["params"] > results["widths"]["16"]["params"]
    assert results["settings"]["precisions"] == ["bf16", "fp8"]
    assert (quick_run / "rel_gap.png").stat().st_size > 0
    assert "| fp8_d32 |" in (quick_run / "results.md").read_text()


def test_merge_and_refusals(quick_run, tmp_path):
    assert main(["--out", str(tmp_path / "merged"), "--merge", str(quick_run)]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["arms"] == json.loads((quick_run / "results.json").read_text())["arms"]
    with pytest.raises(SystemExit, match="not empty"):
        main(["--out", str(quick_run), "--quick"])
    with pytest.raises(SystemExit, match="--widths"):
        main(["--out", str(tmp_path / "w"), "--quick", "--widths", "24"])
