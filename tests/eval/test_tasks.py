"""Evaluation tasks on a tiny random byte-level model: text multiple choice, generation exact match and perplexity
against direct computations from the model's logits; passkey prompts; bad task files."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from dsv3_jax.eval import EvalSettings, Task, load_jsonl_task, run_task
from dsv3_jax.eval.passkey import FILLER, NEEDLE, make_passkey_problems, passkey_prompt, passkey_score
from dsv3_jax.posttrain.chat import render_prompt

SETTINGS = EvalSettings(batch_size=8, max_new_tokens=6)


@pytest.fixture(scope="module")
def forward(byte_model):
    """The model's logits [8, 64, V] of up to 8 sequences right-padded to 64 tokens (causal: padding does not
    change earlier positions): one compile for the direct computations of this module."""
    fn = jax.jit(lambda x: byte_model[0](x))

    def run(sequences):
        batch = np.zeros((8, 64), np.int32)
        for r, ids in enumerate(sequences):
            batch[r, :len(ids)] = ids
        return np.asarray(fn(batch), np.float64)
    return run


def _summed_logprobs(forward, sequences, n_scored):
    """sum of log softmax(logits)[next token] over the last n_scored tokens of each sequence, in float64."""
    logits = forward(sequences)
    logz = logits.max(-1) + np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1))
    return [sum(logits[r, i, ids[i + 1]] - logz[r, i] for i in range(len(ids) - 1 - n, len(ids) - 1))
            for r, (ids, n) in enumerate(zip(sequences, n_scored))]


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_text_multiple_choice_equals_direct_scores(byte_model, forward, tmp_path):
    model, tok = byte_model
    rows = [{"context": "Q: colour of the sky?\nA: ", "choices": ["blue", "a much longer answer"], "answer": 1},
            {"context": "x", "choices": [" y", "yy", " zzz"], "answer": 2}]
    metrics, records = run_task(model, tok, 0, load_jsonl_task(_write(tmp_path, "mc.jsonl", rows)), SETTINGS)
    hits = hits_norm = 0
    for row, rec in zip(rows, records):
        ctx = row["context"].rstrip()  # its trailing space goes to the choice
        conts = [(row["context"][len(ctx):] + c).encode() for c in row["choices"]]
        seqs = [[0] + [b + 2 for b in ctx.encode() + cont] for cont in conts]  # byte b is id b + 2
        want = _summed_logprobs(forward, seqs, [len(c) for c in conts])
        np.testing.assert_allclose(rec["choice_logliks"], want, atol=1e-4)
        hits += int(np.argmax(want)) == row["answer"]
        hits_norm += int(np.argmax(np.array(want) / [len(c) for c in row["choices"]])) == row["answer"]
    assert metrics == {"acc": hits / 2, "acc_norm": hits_norm / 2, "n": 2, "truncated_requests": 0}


def test_generation_exact_match_equals_full_forward_greedy(byte_model, forward, tmp_path):
    model, tok = byte_model
    prompts = ["a", "hello there", "zz", "12+7=4+3-10", "The quick brown fox"]
    # reference: greedy decoding by full forwards without a cache
    seqs = [[0] + tok.encode(p) for p in prompts]
    for _ in range(6):
        logits = forward(seqs)
        for r, ids in enumerate(seqs):
            ids.append(int(np.argmax(logits[r, len(ids) - 1])))
    expected = []
    for p, ids in zip(prompts, seqs):
        new = ids[1 + len(tok.encode(p)):]
        expected.append(tok.decode(new[:new.index(1)] if 1 in new else new))  # cut at EOS
    rows = [{"prompt": p, "answer": e if i % 2 == 0 else e + "!"} for i, (p, e) in enumerate(zip(prompts, expected))]
    metrics, records = run_task(model, tok, 0, load_jsonl_task(_write(tmp_path, "gen.jsonl", rows)), SETTINGS)
    assert [r["completion"] for r in records] == expected
    assert metrics["exact_match"] == pytest.approx(3 / 5)
    # chat: the prompt as a user turn of the chat template
    chat_seqs = [render_prompt(p, tok) for p in prompts]
    n_prompt = [len(ids) for ids in chat_seqs]
    for _ in range(6):
        logits = forward(chat_seqs)
        for r, ids in enumerate(chat_seqs):
            ids.append(int(np.argmax(logits[r, len(ids) - 1])))
    chat_expected = []
    for n, ids in zip(n_prompt, chat_seqs):
        new = ids[n:]
        chat_expected.append(tok.decode(new[:new.index(1)] if 1 in new else new))
    _, records = run_task(model, tok, 0, load_jsonl_task(_write(tmp_path, "gen.jsonl", rows)),
                          dataclasses.replace(SETTINGS, chat=True))
    assert [r["completion"] for r in records] == chat_expected
    # a task's own scorer replaces exact match (the hook the built-in post-training tasks use)
    task = Task("custom", "generate", tuple(rows), scorer=lambda completion, ex: float(len(completion) == 6))
    metrics, _ = run_task(model, tok, 0, task, SETTINGS)
    assert metrics["exact_match"] == pytest.approx(np.mean([len(e) == 6 for e in expected]))


def test_perplexity_equals_direct_computation(byte_model, forward, tmp_path):
    model, tok = byte_model
    texts = ["def f(x):\n    return x + 1\n", "héllo wörld"]  # multi-byte characters: bytes != characters
    task = load_jsonl_task(_write(tmp_path, "ppl.jsonl", [{"text": t} for t in texts]))
    metrics, records = run_task(model, tok, 0, task, SETTINGS)
    seqs = [[0] + tok.encode(t) for t in texts]
    want = _summed_logprobs(forward, seqs, [len(ids) - 1 for ids in seqs])
    np.testing.assert_allclose([r["loglik"] for r in records], want, atol=1e-4)
    total, n = sum(want), sum(len(ids) - 1 for ids in seqs)
    assert metrics["tokens"] == n == metrics["bytes"]  # byte tokenizer: one token per byte
    assert metrics["token_perplexity"] == pytest.approx(np.exp(-total / n), rel=1e-5)
    assert metrics["byte_perplexity"] == pytest.approx(metrics["token_perplexity"], rel=1e-9)
    assert metrics["bits_per_byte"] == pytest.approx(-total / n / np.log(2), rel=1e-5)


def test_passkey_prompts_fill_the_length(byte_model):
    _, tok = byte_model
    for length in (150, 200, 255):
        for depth in (0.0, 0.5, 1.0):
            prompt, n = passkey_prompt(tok, length, depth, "12345")
            assert n == 1 + len(tok.encode(prompt)) <= length
            assert n + len(tok.encode(" " + FILLER)) > length  # no room for one more filler sentence
            needle = prompt.index(NEEDLE.format(key="12345"))
            before = prompt[:needle].count(FILLER)
            total = prompt.count(FILLER)
            assert before == round(depth * total)
    problems = make_passkey_problems(tok, [150, 200], [0.1, 0.9], trials=3, seed=1)
    assert len(problems) == 12 and len({p.answer for p in problems}) > 1
    assert all(len(p.answer) == 5 and p.answer.isdigit() and p.answer in p.prompt for p in problems)
    assert passkey_score(" 12345. Remember", "12345") == 1.0
    assert passkey_score(" 123456", "12345") == 0.0
    assert passkey_score("no digits", "12345") == 0.0


@pytest.mark.parametrize("rows, message", [
    ([{"context": "a", "choices": ["b", "c"]}], "missing field 'answer'"),
    ([{"context": "a", "choices": ["b", "c"], "answer": 2}], "answer index 2 out of range for 2 choices"),
    ([{"context": "a", "choices": ["b"], "answer": 0}], "at least 2 choices"),
    ([{"context_ids": [1], "choices_ids": [[2], "x"], "answer": 0}], "choices_ids\\[1\\]"),
    ([{"context_ids": [], "choices_ids": [[2], [3]], "answer": 0}], "'context_ids' is empty"),
    ([{"prompt": "p"}], "cannot tell the task kind"),
    ([{"prompt": "p", "answer": 3}], "field 'answer' must be"),
    ([{"text": "ok"}, {"txt": "typo"}], "ppl.jsonl:2: missing field 'text'"),
])
def test_bad_task_files(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        load_jsonl_task(_write(tmp_path, "ppl.jsonl", rows))


def test_bad_task_inputs(tmp_path, byte_model):
    with pytest.raises(FileNotFoundError, match="task file not found"):
        load_jsonl_task(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_jsonl_task(str(bad))
    with pytest.raises(ValueError, match="unknown task kind 'mcq'"):
        load_jsonl_task(_write(tmp_path, "t.jsonl", [{"text": "a"}]), kind="mcq")
    model, tok = byte_model
    text_mc = load_jsonl_task(_write(tmp_path, "mc.jsonl", [{"context": "a", "choices": ["b", "c"], "answer": 0}]))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        run_task(model, None, 0, text_mc, SETTINGS)
    with pytest.raises(ValueError, match="below the .* tokens of the prompt without filler"):
        passkey_prompt(tok, 40, 0.5, "12345")
    with pytest.raises(ValueError, match="depth must be in"):
        passkey_prompt(tok, 200, 1.5, "12345")
    ppl = load_jsonl_task(_write(tmp_path, "p.jsonl", [{"text": "abc"}]))
    with pytest.raises(ValueError, match="perplexity window must be in \\[1, 256\\]"):
        run_task(model, tok, 0, ppl, EvalSettings(ppl_window=300))
    with pytest.raises(ValueError, match="stride must be in"):
        run_task(model, tok, 0, ppl, EvalSettings(ppl_window=8, ppl_stride=9))
    long = load_jsonl_task(_write(tmp_path, "g.jsonl", [{"prompt": "x" * 252, "answer": "y"}]))
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        run_task(model, tok, 0, long, SETTINGS)


def test_code_pass_at_k_with_sampling(byte_model, tmp_path):
    model, tok = byte_model
    stop = ["\n", "\r", "\x00"]  # the sampled bytes stay inside the comment the prompt opens
    # prompts under 32 tokens: the generation test's compiled shapes
    rows = [{"prompt": "def f(a):\n    return a\n# ", "tests": "assert f(2) == 2", "stop": stop},
            {"prompt": "def f(a):\n    return 0\n# ", "tests": "assert f(2) == 2", "stop": stop},
            {"prompt": "def g(x):\n    return x+1\n# ", "tests": "def check(f):\n    assert f(1) == 2",
             "entry_point": "g", "stop": stop}]
    settings = EvalSettings(batch_size=8, max_new_tokens=6, code_samples=2, pass_ks=(1, 2, 5), code_timeout=10)
    metrics, records = run_task(model, tok, 0, load_jsonl_task(_write(tmp_path, "code.jsonl", rows)), settings)
    assert [r["statuses"] for r in records] == [["passed"] * 2, ["failed"] * 2, ["passed"] * 2]
    assert metrics == {"pass@1": 2 / 3, "pass@2": 2 / 3, "n": 3, "samples": 2, "temperature": 0.8}


def test_builtin_posttrain_task():
    """builtin:addition: the post-training task's problems, scored by its own checker."""
    from dsv3_jax.eval.cli import resolve_tasks
    from dsv3_jax.posttrain.tasks import make_problems

    [task] = resolve_tasks(["builtin:addition"], None, 3, 5)
    problems = make_problems("addition", 3, 5)
    assert (task.name, task.kind) == ("builtin:addition", "generate")
    assert [ex["prompt"] for ex in task.examples] == [p.prompt for p in problems]
    ex = task.examples[1]
    assert task.scorer(f" {ex['answer']} ", ex) == 1.0 and task.scorer(ex["answer"] + "1", ex) == 0.0
