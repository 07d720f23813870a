"""The scoring core: per-choice summed log-likelihoods of `dsv3 eval` (ids task) equal transformers' on a checkpoint
saved by transformers; bucketing, truncation and rolling windows against direct computations; bad requests."""

import json

import numpy as np
import pytest
import torch

import dsv3_jax
from dsv3_jax.cli import main
from dsv3_jax.eval import loglikelihood, rolling_windows
from tests import hf_reference as ref


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = ref.build_hf_model()
    path = tmp_path_factory.mktemp("hf")
    ref.save_hf(hf, str(path))
    return hf, dsv3_jax.from_pretrained(path), path


def _hf_loglik(hf, ctx, cont):
    """Summed log-softmax of the continuation under transformers, in float64."""
    full = np.asarray([list(ctx) + list(cont)])
    logp = torch.log_softmax(torch.as_tensor(ref.hf_logits(hf, full)[0, :-1], dtype=torch.float64), -1).numpy()
    return sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)), all(
        int(np.argmax(logp[len(ctx) - 1 + j])) == t for j, t in enumerate(cont))


def test_ids_task_logliks_match_transformers(models, tmp_path, capsys):
    """`dsv3 eval` on the transformers checkpoint (no tokenizer.json: an ids task) dumps transformers' scores."""
    hf, _, ckpt = models
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):  # contexts of 3..40 tokens: several length buckets and a partial last batch
        ctx = rng.integers(0, 96, int(rng.integers(3, 41))).tolist()
        choices = [rng.integers(0, 96, int(rng.integers(1, 6))).tolist() for _ in range(int(rng.integers(2, 5)))]
        rows.append({"context_ids": ctx, "choices_ids": choices, "answer": int(rng.integers(0, len(choices)))})
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dump = tmp_path / "scores.jsonl"
    assert main(["eval", "--checkpoint", str(ckpt), "--task", str(path), "--json", "--dump-scores", str(dump)]) == 0
    metrics = json.loads(capsys.readouterr().out)["tasks"]["ids"]
    assert metrics["kind"] == "multiple_choice"
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    hits = hits_norm = 0
    for row, rec in zip(rows, records):
        want = np.array([_hf_loglik(hf, row["context_ids"], c)[0] for c in row["choices_ids"]])
        np.testing.assert_allclose(rec["choice_logliks"], want, atol=1e-4, rtol=0)
        lens = np.array([len(c) for c in row["choices_ids"]])
        hits += int(np.argmax(want)) == row["answer"]
        hits_norm += int(np.argmax(want / lens)) == row["answer"]
    assert metrics["acc"] == hits / len(rows) and metrics["acc_norm"] == hits_norm / len(rows)


def test_is_greedy_and_batch_independence(models):
    hf, m, _ = models
    ctx = [5, 17, 33, 2]
    greedy = []
    for _ in range(3):  # the model's own argmax continuation
        greedy.append(int(np.argmax(ref.hf_logits(hf, np.asarray([ctx + greedy]))[0, -1])))
    reqs = [(ctx, greedy), (ctx, [(greedy[0] + 1) % 96]), ([1, 2], [3, 4, 5])]
    alone = [loglikelihood(m, [r])[0] for r in reqs]  # each padded with empty rows
    together = loglikelihood(m, reqs)
    assert [r.is_greedy for r in together] == [True, False, _hf_loglik(hf, [1, 2], [3, 4, 5])[1]]
    np.testing.assert_allclose([r.logprob for r in together], [r.logprob for r in alone], atol=1e-5)


def test_left_truncation_counts_and_scores_the_last_window(models):
    m = models[1]
    ids = np.random.default_rng(2).integers(0, 96, 150).tolist()  # max_position_embeddings is 128
    r = loglikelihood(m, [(ids[:-4], ids[-4:])])[0]
    assert r.truncated == 150 - 1 - 128 and r.n_tokens == 4
    direct = loglikelihood(m, [(ids[150 - 129:-4], ids[-4:])])[0]
    assert direct.truncated == 0
    assert r.logprob == pytest.approx(direct.logprob, abs=1e-5)


def test_rolling_windows_predict_every_token_once():
    ids = list(range(100, 131))  # 31 tokens: 30 predictions
    for window, stride in [(8, None), (8, 3), (8, 8), (40, None), (1, 1)]:
        pairs = rolling_windows(ids, window, stride)
        predicted = [t for _, cont in pairs for t in cont]
        assert predicted == ids[1:]
        for ctx, cont in pairs:
            assert 1 <= len(ctx) and len(ctx) + len(cont) - 1 <= window  # model input fits the window
            assert ctx + cont == ids[ids.index(ctx[0]):ids.index(cont[-1]) + 1]  # contiguous
        if stride is not None and window > stride:  # sliding: every later window keeps window - stride context
            assert all(len(ctx) == window - stride + 1 for ctx, _ in pairs[1:-1])


def test_rolling_sum_equals_full_sequence_when_it_fits(models):
    hf, m, _ = models
    ids = np.random.default_rng(3).integers(0, 96, 60).tolist()
    whole = loglikelihood(m, rolling_windows(ids, 128))
    assert len(whole) == 1
    want = _hf_loglik(hf, ids[:1], ids[1:])[0]
    assert whole[0].logprob == pytest.approx(want, abs=1e-4)
    chunked = loglikelihood(m, rolling_windows(ids, 16, 8))  # less context: a different but complete score
    assert sum(r.n_tokens for r in chunked) == 59


@pytest.mark.parametrize("request_, message", [
    (([], [1]), "empty context"),
    (([1], []), "empty continuation"),
    (([1], list(range(129))), "exceeds the model's context"),
    (([1, 96], [2]), "outside the vocabulary"),
])
def test_bad_requests(models, request_, message):
    with pytest.raises(ValueError, match=message):
        loglikelihood(models[1], [request_])
