"""The balancing experiments (paper Table 5, §4.5.3, Fig. 9) at --quick size: results.json layout, arm names,
finite and plausible metrics, plots and tables; expert_specialisation --from on the aux-free/aux-loss run; the
two-domain corpus keeps its evaluation files out of training."""

import json
import math

import numpy as np
import pytest

from experiments import balance_aux_free_vs_aux_loss as aux_exp
from experiments import balance_batch_vs_sequence as scope_exp
from experiments import domains
from experiments import expert_specialisation as spec_exp
from tests import background

LN_VOCAB = math.log(512)  # tiny preset


background.quick_module("balance_aux_free_vs_aux_loss", "experiments.balance_aux_free_vs_aux_loss")
background.quick_module("balance_batch_vs_sequence", "experiments.balance_batch_vs_sequence")


@pytest.fixture(scope="module")
def aux_run():
    return background.result("balance_aux_free_vs_aux_loss")


def check_results(out, arms, metrics):
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == arms and set(results["seeds"]) == set(arms)
    for name in arms:
        row = results["arms"][name]
        for key in metrics:
            assert math.isfinite(row[key]), (name, key)
        assert 0 < row["val_loss"] < LN_VOCAB and 0 < row["train_loss"] < LN_VOCAB
        assert 0 <= row["max_vio_global"] <= row["max_vio_batch"] + 1e-9 <= 7 + 1e-9  # 8 experts: at most E - 1
    assert results["settings"]["arms"][arms[0]]["balance"] in ("aux-free", "aux-loss")
    assert (out / "curves.png").stat().st_size > 1000 and "| arm |" in (out / "results.md").read_text()
    return results


def test_aux_free_vs_aux_loss_quick(aux_run):
    results = check_results(aux_run, ["aux_free", "aux_loss"], aux_exp.METRICS)
    assert results["settings"]["arms"] == {"aux_free": {"balance": "aux-free", "balance_alpha": 0.0},
                                           "aux_loss": {"balance": "aux-loss", "balance_alpha": 1e-3}}
    diff = results["paired"]["differences"]["aux_free"]["val_loss"]["per_seed"]["0"]
    assert results["paired"]["reference"] == "aux_loss" and diff == pytest.approx(
        results["seeds"]["aux_free"]["0"]["val_loss"] - results["seeds"]["aux_loss"]["0"]["val_loss"])
    assert "Paired differences from aux_loss" in (aux_run / "results.md").read_text()
    rows = [json.loads(line) for line in (aux_run / "aux_loss" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["balance_loss"] > 0 for r in rows)  # the aux-loss arm trains with its loss
    with pytest.raises(SystemExit, match="not empty"):
        aux_exp.main(["--out", str(aux_run), "--quick"])


def test_batch_vs_sequence_quick():
    out = background.result("balance_batch_vs_sequence")
    results = check_results(out, ["aux_loss_sequence", "aux_loss_batch", "aux_free"], aux_exp.METRICS)
    arms = results["settings"]["arms"]
    assert [arms[a]["balance_scope"] for a in ("aux_loss_sequence", "aux_loss_batch")] == ["sequence", "batch"]
    assert arms["aux_loss_sequence"]["balance_alpha"] == arms["aux_loss_batch"]["balance_alpha"] > 0
    assert set(results["paired"]["differences"]) == {"aux_loss_batch", "aux_free"}
    with pytest.raises(SystemExit, match="not empty"):
        scope_exp.main(["--out", str(out), "--quick"])


def test_expert_specialisation_from_run(aux_run, tmp_path):
    out = tmp_path / "spec"
    assert spec_exp.main(["--out", str(out), "--quick", "--from", str(aux_run)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ["aux_free", "aux_loss"] and "--from" in results["settings"]["models"]
    assert results["settings"]["from_settings"]["eval_documents_found_in_training_and_left_out"] == {"code": 0,
                                                                                                    "prose": 0}
    for arm, row in results["arms"].items():
        loads = {d: np.asarray(results["loads"][arm][d]["0"]) for d in ("code", "prose")}
        assert loads["code"].shape == (2, 8)
        np.testing.assert_allclose(loads["code"].sum(-1), 1.0, rtol=1e-6)
        tv = np.mean(0.5 * np.abs(loads["code"] - loads["prose"]).sum(-1))  # NumPy restatement
        assert row["tv_code_prose"] == pytest.approx(tv, abs=1e-9) and 0 <= tv <= 1
        assert row["max_rel_load"] == pytest.approx(8 * max(loads["code"].max(), loads["prose"].max()))
        assert 1 <= row["max_rel_load"] <= 4 and 0 < row["ce_code"] < LN_VOCAB and 0 < row["ce_prose"] < LN_VOCAB
    assert (out / "load_heatmaps.png").stat().st_size > 1000 and (out / "results.md").is_file()
    with pytest.raises(SystemExit, match="not empty"):
        spec_exp.main(["--out", str(out), "--quick", "--from", str(aux_run)])
    with pytest.raises(FileNotFoundError, match="results.json"):
        spec_exp.main(["--out", str(tmp_path / "x"), "--quick", "--from", str(tmp_path)])


def test_corpus_evaluation_files_are_held_out(tmp_path):
    corpus = domains.write_corpus(tmp_path, 60_000, 20_000)
    read = lambda p: [json.loads(line)["text"] for line in open(p)]  # noqa: E731
    train_code, train_prose = read(corpus["train"][0]), read(corpus["train"][1])
    eval_code, eval_prose = read(corpus["eval"]["code"]), read(corpus["eval"]["prose"])
    assert eval_code and eval_prose and not set(eval_prose) & set(train_prose)
    joined = "\n".join(train_code)
    assert not any(doc in joined for doc in eval_code)
    assert sum(map(len, eval_code)) <= 20_000 and sum(map(len, train_code)) <= 60_000 + 2 * len(train_code)
    assert all(not p.startswith(" ") and len(p) >= 40 for p in train_prose)
    with pytest.raises(ValueError, match="positive"):
        domains.write_corpus(tmp_path, 0, 10)
