"""experiments/attention_variants.py --quick: results.json layout, the three arms and their metrics, the cache sizes
against the analytic formula and their order (MLA < GQA < MHA at this width), the plot and table, and --out refused
when not empty."""

import json
import math

import pytest

from experiments.attention_variants import ARMS, METRICS, main
from tests import background


background.quick_module("attention_variants", "experiments.attention_variants")


@pytest.fixture(scope="module")
def quick_run():
    return background.result("attention_variants")


def test_results_layout_and_values(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    assert set(results) >= {"arms", "settings", "seeds"}
    assert list(results["arms"]) == list(ARMS) == ["mla", "mha", "gqa"]
    for name, row in results["arms"].items():
        assert set(METRICS) <= set(row), name
        assert all(math.isfinite(row[k]) for k in METRICS), row
        assert 0 < row["val_loss"] < math.log(512), row  # below a uniform guess over tiny's vocabulary
        assert row["decode_tok_s_b1"] > 0 and row["decode_tok_s_b8"] > 0
        assert row["kv_bytes_per_token"] == row["kv_bytes_formula"]
    arms = results["arms"]
    # tiny with one layer: MLA (32 + 8) x 2 bytes; MHA 2 x 4 heads x 24 x 2; GQA 2 x 2 kv heads x 24 x 2
    assert [arms[a]["kv_bytes_per_token"] for a in ARMS] == [80, 384, 192]
    assert arms["mla"]["attn_params"] < arms["gqa"]["attn_params"] < arms["mha"]["attn_params"]
    assert results["settings"]["configs"]["gqa"]["kv_heads"] == 2
    assert {c["hidden_size"] for c in results["settings"]["configs"].values()} == {64}


def test_plot_and_table(quick_run):
    assert (quick_run / "attention_variants.png").stat().st_size > 0
    table = (quick_run / "results.md").read_text()
    assert all(f"| {a} |" in table for a in ARMS)


def test_non_empty_out_and_bad_kv_heads_are_refused(quick_run, tmp_path):
    with pytest.raises(SystemExit, match="not empty"):
        main(["--out", str(quick_run), "--quick"])
    with pytest.raises(ValueError, match="must divide"):
        main(["--out", str(tmp_path / "bad"), "--quick", "--kv-heads", "3"])
    assert not (tmp_path / "bad").exists()
