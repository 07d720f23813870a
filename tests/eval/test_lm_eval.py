"""The lm-evaluation-harness adapter: `lm_eval.simple_evaluate` with the registered "dsv3" model on a local JSONL
task, offline; its accuracies equal dsv3 eval's on the same items; the model built by name from a checkpoint."""

import json

import numpy as np
import pytest

from dsv3_jax.eval import EvalSettings, load_jsonl_task, loglikelihood, run_task
from dsv3_jax.train.tokenizer import ByteTokenizer

ITEMS = [
    {"context": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"context": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"context": "Water is", "choices": [" dry", " wet", " a cat"], "answer": 1},
    {"context": "Fire is", "choices": [" hot", " cold"], "answer": 0},
    {"context": "A dog says", "choices": [" meow", " woof", " moo", " quack"], "answer": 1},
]

TASK_YAML = """\
task: dsv3_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_simple_evaluate_offline_matches_dsv3_eval(byte_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import lm_eval  # the test extra installs it
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from dsv3_jax.eval.lm_eval_adapter import DSV3LM

    assert get_model("dsv3") is DSV3LM
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=data))
    model, tok = byte_model
    lm = DSV3LM(model=model, tokenizer=tok, batch_size=8)
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # not lm-eval's thousands of tasks
    out = lm_eval.simple_evaluate(model=lm, tasks=["dsv3_local_mc"], task_manager=tasks, bootstrap_iters=0,
                                  log_samples=True)
    theirs = out["results"]["dsv3_local_mc"]
    ours, records = run_task(model, tok, 0, load_jsonl_task(str(data)), EvalSettings(batch_size=8))
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    # the same per-choice log-likelihoods reached the harness
    for sample in out["samples"]["dsv3_local_mc"]:
        got = [r[0] for r in sample["filtered_resps"]]
        want = records[sample["doc_id"]]["choice_logliks"]
        assert got == pytest.approx(want, abs=1e-5)


def test_model_by_name_from_a_checkpoint(byte_checkpoint):
    """simple_evaluate(model="dsv3", model_args="checkpoint=DIR") builds the model this way."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import dsv3_jax.eval.lm_eval_adapter  # noqa: F401  (registers "dsv3")

    lm = get_model("dsv3").create_from_arg_string(f"checkpoint={byte_checkpoint}", {"batch_size": 8, "device": None})
    req = Instance("loglikelihood", {}, ("ab", "c"), 0)
    [(ll, _)] = lm.loglikelihood([req])
    want = loglikelihood(lm.model, [([0, ord("a") + 2, ord("b") + 2], [ord("c") + 2])])[0].logprob
    assert ll == pytest.approx(want) and ll < 0
    text = "The quick brown fox jumps"
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [0] + [b + 2 for b in text.encode()]
    assert rolling == pytest.approx(loglikelihood(lm.model, [(ids[:1], ids[1:])])[0].logprob, abs=1e-4)
    [gen] = lm.generate_until([Instance("generate_until", {}, (text, {"until": ["o"], "max_gen_toks": 6}), 0)])
    full = lm.model.generate(np.asarray([ids], np.int32), 6, stop_tokens=[1])[0, len(ids):].tolist()
    want = ByteTokenizer().decode(full[:full.index(1)] if 1 in full else full)  # up to EOS
    assert gen == want.split("o")[0]  # and up to the `until` string
