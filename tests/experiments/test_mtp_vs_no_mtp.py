"""experiments/mtp_vs_no_mtp.py --quick: results.json layout, arms, plausible metrics, plot and table."""

import json
import math

import pytest

from dsv3_jax.config import TINY
from dsv3_jax.stats import model_stats
from experiments.mtp_vs_no_mtp import main
from tests import background


background.quick_module("mtp_vs_no_mtp", "experiments.mtp_vs_no_mtp")


@pytest.fixture(scope="module")
def quick_run():
    return background.result("mtp_vs_no_mtp")


def test_results_layout_and_metrics(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"mtp", "no_mtp"}
    for name, row in arms.items():
        for key in ("val_loss", "train_ce", "params_main", "params_total", "train_seconds"):
            assert math.isfinite(row[key]), (name, key)
        assert 0 < row["val_loss"] < math.log(TINY.vocab_size) + 0.5  # near or below the uniform guess
        assert 0 < row["train_ce"] < math.log(TINY.vocab_size) + 0.5
    # the same main model; the MTP module's parameters are counted apart (an independent count from the config)
    with_mtp, without = model_stats(TINY.replace(num_mtp_layers=1)), model_stats(TINY.replace(num_mtp_layers=0))
    assert arms["mtp"]["params_main"] == arms["no_mtp"]["params_main"] == without.total_params
    assert arms["no_mtp"]["params_total"] == without.total_params
    assert arms["mtp"]["params_total"] == without.total_params + with_mtp.mtp_params > without.total_params
    assert arms["mtp"]["delta_val_loss"] == pytest.approx(arms["mtp"]["val_loss"] - arms["no_mtp"]["val_loss"])
    assert "delta_val_loss" not in arms["no_mtp"]
    assert results["settings"]["quick"] is True and results["settings"]["depths"] == {"no_mtp": 0, "mtp": 1}
    # the arms trained what they say: MTP losses logged only with the module
    rows = [json.loads(line) for line in (quick_run / "mtp_s0" / "metrics.jsonl").read_text().splitlines()]
    rows_off = [json.loads(line) for line in (quick_run / "no_mtp_s0" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["mtp_loss"] > 0 and not rows_off[-1].get("mtp_loss")


def test_outputs_and_refusals(quick_run):
    assert (quick_run / "val_loss.png").stat().st_size > 0
    text = (quick_run / "results.md").read_text()
    assert "| mtp |" in text and "| no_mtp |" in text
    with pytest.raises(SystemExit, match="not empty"):
        main(["--out", str(quick_run), "--quick"])
    with pytest.raises(SystemExit, match="--mtp-weight"):
        main(["--out", str(quick_run / "new"), "--quick", "--mtp-weight", "0"])
