"""`dsv3 eval` end to end on a saved checkpoint with its tokenizer.json: several tasks in one run, --json metrics
consistent with the --dump-scores rows, the passkey table, and clear errors for bad input."""

import json

import numpy as np
import pytest

from dsv3_jax.cli import main
from dsv3_jax.eval.passkey import format_table


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    mc = [{"context": "The sky is", "choices": [" blue", " green", " made of cheese"], "answer": i % 3}
          for i in range(4)]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "ids.jsonl").write_text(json.dumps({"context_ids": [0, 70, 71], "choices_ids": [[72], [73, 74]],
                                             "answer": 1}) + "\n")
    (d / "ppl.jsonl").write_text(json.dumps({"text": "print('hello')\n"}) + "\n")
    return d


def test_eval_json_and_dump(byte_checkpoint, task_files, tmp_path, capsys):
    dump = tmp_path / "scores.jsonl"
    rc = main(["eval", "--checkpoint", str(byte_checkpoint), "--task", str(task_files / "mc.jsonl"),
               "--task", str(task_files / "ids.jsonl"), "--task", str(task_files / "ppl.jsonl"), "--limit", "3",
               "--task", "builtin:passkey", "--lengths", "150,240", "--depths", "0,1", "--trials", "1",
               "--json", "--dump-scores", str(dump)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)["tasks"]
    assert set(out) == {"mc", "ids", "ppl", "builtin:passkey"}
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    mc = [r for r in rows if r["task"] == "mc"]
    assert len(mc) == 3  # --limit
    assert out["mc"]["acc"] == pytest.approx(np.mean([int(np.argmax(r["choice_logliks"])) == r["answer"] for r in mc]))
    assert out["mc"]["kind"] == "multiple_choice" and len(mc[0]["choice_logliks"]) == 3
    assert [r["answer"] for r in rows if r["task"] == "ids"] == [1]
    ppl = [r for r in rows if r["task"] == "ppl"]
    assert out["ppl"]["token_perplexity"] == pytest.approx(np.exp(-ppl[0]["loglik"] / ppl[0]["tokens"]))
    passkey = [r for r in rows if r["task"] == "builtin:passkey"]
    assert sorted(out["builtin:passkey"]["grid"]) == ["150@0.0", "150@1.0", "240@0.0", "240@1.0"]
    assert all(r["prompt_tokens"] <= r["length"] for r in passkey) and len(passkey) == 4
    assert out["builtin:passkey"]["accuracy"] == pytest.approx(np.mean([r["score"] for r in passkey]))


def test_eval_text_output(byte_checkpoint, task_files, capsys):
    assert main(["eval", "--checkpoint", str(byte_checkpoint), "--task", str(task_files / "ids.jsonl")]) == 0
    assert capsys.readouterr().out.startswith("ids (multiple_choice): acc ")


def test_passkey_table():
    table = format_table({(64, 0.1): 1.0, (64, 0.9): 0.5, (128, 0.1): 0.0, (128, 0.9): 0.25}, [64, 128], [0.1, 0.9])
    assert table.splitlines() == ["length \\ depth     0.10    0.90",
                                  "             64    1.00    0.50",
                                  "            128    0.00    0.25"]


@pytest.mark.parametrize("extra, message", [
    (["--task", "builtin:nope"], "unknown built-in task 'builtin:nope'"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["--task", "missing.jsonl"], "task file not found: missing.jsonl"),
    (["--task", "builtin:passkey", "--batch-size", "0"], "batch_size must be >= 1"),
    (["--task", "builtin:passkey", "--limit", "0"], "--limit must be >= 1"),
    (["--task", "builtin:passkey", "--task", "passkey"], "'builtin:passkey' given twice"),
])
def test_eval_bad_arguments(byte_checkpoint, capsys, extra, message):
    assert main(["eval", "--checkpoint", str(byte_checkpoint)] + extra) == 2
    assert message in capsys.readouterr().err


def test_eval_ids_only_checkpoint(byte_checkpoint, task_files, tmp_path, capsys):
    """A checkpoint without tokenizer.json scores id tasks and refuses text ones by name."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in byte_checkpoint.iterdir():
        if f.name != "tokenizer.json":
            (bare / f.name).symlink_to(f)
    assert main(["eval", "--checkpoint", str(bare), "--task", str(task_files / "ids.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["ids"]["n"] == 1
    assert main(["eval", "--checkpoint", str(bare), "--task", str(task_files / "mc.jsonl")]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err
