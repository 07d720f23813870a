"""`dsv3 sft` and friends: packing with sample masking, the masked loss against a per-conversation NumPy
restatement, bit-identical resume, logit distillation (KL vs NumPy; teacher == student gives 0), teacher-sampled
chat data, and a context-extension run from a run's weights with YaRN in its saved config."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from dsv3_jax.config import TINY
from dsv3_jax.losses import distill_kl
from dsv3_jax.posttrain.sft import (ChatBatches, Conversation, SFTArgs, encode_conversations, pack_conversations,
                                    read_chat_jsonl, sft)
from dsv3_jax.train.loop import RunArgs, flat_state, load_workdir, train
from dsv3_jax.train.step import split_model

CFG = TINY.replace(num_hidden_layers=2, first_k_dense_replace=1)
WORDS = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "print", "x", "y", "(", ")", ":"]


# -- packing (no model) -------------------------------------------------------------------------------------------


def _conv(where, n, trained_from, start=10):
    ids = list(range(start, start + n))
    return Conversation(where, ids, [0] * trained_from + [1] * (n - trained_from))


def test_packing_rows_segments_masks_nothing_dropped():
    convs = [_conv(f"c{i}", n, 2, start=20 * i) for i, n in enumerate([5, 9, 3, 11, 4, 6, 2, 7])]
    p = pack_conversations(convs, seq_len=10, seed=3)
    width = 11
    assert p.tokens.shape[1] == width and p.conversations == 8 and p.truncated == 0
    seen = []
    for r in range(p.tokens.shape[0]):
        seg = p.segment_ids[r]
        ids = [s for s in np.unique(seg) if s]
        assert ids == list(range(1, len(ids) + 1))  # 1, 2, ... in order, 0 only as trailing padding
        nonzero = np.flatnonzero(seg)
        assert np.all(np.diff(seg[nonzero]) >= 0) and np.all(seg[nonzero[-1] + 1:] == 0)
        assert np.all(p.tokens[r][seg == 0] == 0) and np.all(p.loss_mask[r][seg == 0] == 0)
        for s in ids:
            sel = seg == s
            seen.append((tuple(p.tokens[r][sel]), tuple(p.loss_mask[r][sel])))
    want = sorted((tuple(c.ids), tuple(map(float, c.mask))) for c in convs)
    assert sorted(seen) == want  # every conversation exactly once, whole, with its mask
    # greedy: a row is closed only when the next conversation does not fit
    order = np.random.default_rng(3).permutation(len(convs))
    lens = [len(convs[i].ids) for i in order]
    used, rows = width, 0
    for n in lens:
        if used + n > width:
            rows, used = rows + 1, 0
        used += n
    assert p.tokens.shape[0] == rows


def test_too_long_conversation_errors_or_truncates():
    convs = [_conv("a.jsonl:1", 5, 1), _conv("a.jsonl:7", 14, 3)]
    with pytest.raises(ValueError, match="a.jsonl:7.*14 tokens.*--truncate"):
        pack_conversations(convs, seq_len=10)
    p = pack_conversations(convs, seq_len=10, truncate=True)
    assert p.truncated == 1 and p.loss_mask.sum() == 4 + (11 - 3)


def test_chat_batches_epochs_reshuffle_and_positions():
    convs = [_conv(f"c{i}", 11, 1, start=20 * i) for i in range(5)]  # one per row
    src = ChatBatches(pack_conversations(convs, seq_len=10), seed=0)
    first, pos = src.batch(0, 5)
    second, pos2 = src.batch(pos, 5)
    assert pos == 5 and pos2 == 10
    assert sorted(map(tuple, first.tokens)) == sorted(map(tuple, second.tokens))  # each epoch sees every row
    assert not np.array_equal(first.tokens, second.tokens)  # in a new order
    again, _ = src.batch(3, 4)  # crosses the epoch boundary, reproducibly
    np.testing.assert_array_equal(again.tokens, np.concatenate([first.tokens[3:], second.tokens[:2]]))


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    for bad, match in [("{not json", "chat.jsonl:2: not valid JSON"), ('{"text": "x"}', "chat.jsonl:2: expected"),
                       ('{"messages": [{"role": "bot", "content": "x"}]}', "chat.jsonl:2: message 0 has role")]:
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=match):
            read_chat_jsonl([str(path)])
    with pytest.raises(FileNotFoundError):
        read_chat_jsonl([str(tmp_path / "missing.jsonl")])


# -- losses -------------------------------------------------------------------------------------------------------


def test_distill_kl_matches_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 7)).astype(np.float32), rng.normal(size=(2, 5, 7)).astype(np.float32) * 2
    mask = (rng.random((2, 5)) > 0.4).astype(np.float32)
    for tau in (1.0, 2.0):
        def logp(x):
            x = x / tau
            x = x - x.max(-1, keepdims=True)
            return x - np.log(np.exp(x).sum(-1, keepdims=True))

        kl = (np.exp(logp(t)) * (logp(t) - logp(s))).sum(-1)
        np.testing.assert_allclose(float(distill_kl(s, t, mask, tau)), (kl * mask).sum() / mask.sum(), rtol=1e-5)
        np.testing.assert_allclose(float(distill_kl(s, t, None, tau)), kl.mean(), rtol=1e-5)
    assert float(distill_kl(s, s, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_kl(s, t, np.zeros_like(mask))) == 0.0


# -- end to end on a tiny model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Shared by the module: a released-format tiny checkpoint (random weights, a BPE tokenizer trained on the
    corpus), the corpus and chat data."""
    from flax import nnx

    from dsv3_jax.hf import save_pretrained
    from dsv3_jax.model.transformer import Transformer
    from dsv3_jax.train.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("sft")
    rng = np.random.default_rng(0)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(2000)))
    save_pretrained(Transformer(CFG, nnx.Rngs(0)), d / "released")
    Tokenizer.train([str(corpus)], CFG.vocab_size).save(d / "released" / "tokenizer.json")
    chat = d / "chat.jsonl"
    with open(chat, "w") as f:
        for i in range(12):
            q, a = " ".join(rng.choice(WORDS, 1 + i % 2)), " ".join(rng.choice(WORDS, 1 + i % 3))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return d


@pytest.fixture(scope="module")
def tuned(base):
    """A 4-step `dsv3 sft` run through the CLI (its work directory)."""
    from dsv3_jax.cli import main

    full = base / "full"
    assert main(["sft", "--init", str(base / "released"), "--data", str(base / "chat.jsonl"), "--workdir", str(full),
                 "--steps", "4", "--batch", "2", "--seq-len", "32", "--save-every", "2", "--keep", "5",
                 "--lr", "1e-3", "--min-lr", "1e-4", "--no-progress"]) == 0
    return full


def _sft_args(base, workdir, **kw):
    a = dict(workdir=str(workdir), init=str(base / "released"), data=[str(base / "chat.jsonl")], steps=4, batch=2,
             seq_len=32, save_every=2, keep=5, progress=False, lr=1e-3, min_lr=1e-4)
    return SFTArgs(**{**a, **kw})


def _rows(workdir):
    return [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]


def test_sft_masked_loss_resume_and_cli(base, tuned, tmp_path):
    from dsv3_jax.cli import main
    from dsv3_jax.load import load_model_and_tokenizer

    full = tuned
    rows = _rows(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[-1]["lr"] == pytest.approx(1e-4)  # cosine, peak -> min
    assert rows[0]["gamma"] == 0.0 and rows[0]["mtp_weight"] == pytest.approx(0.1)

    # step 1's CE against a per-conversation restatement: each conversation alone through the initial model,
    # log-probs of its assistant tokens (and closing eos) only, averaged over the batch's trained tokens
    model, tok = load_model_and_tokenizer(base / "released")
    from dsv3_jax.posttrain.sft import sft_tokenizer

    tok = sft_tokenizer(tok, model.config.vocab_size, "test")
    packed = pack_conversations(encode_conversations(read_chat_jsonl([str(base / "chat.jsonl")]), tok), 32, 0)
    batch, _ = ChatBatches(packed, 0).batch(0, 2)
    nll = []
    for r in range(2):
        for s in set(batch.segment_ids[r].tolist()) - {0}:
            sel = batch.segment_ids[r] == s
            ids, mask = batch.tokens[r][sel], batch.loss_mask[r][sel]
            logits = np.asarray(model(ids[None, :-1].astype(np.int32))[0], np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            nll += [-logp[i, ids[i + 1]] for i in range(len(ids) - 1) if mask[i + 1]]
    assert rows[0]["ce"] == pytest.approx(np.mean(nll), rel=1e-4)

    # stop and resume: bit-identical metrics
    sft(_sft_args(base, tmp_path / "split", stop_at=2))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        sft(_sft_args(base, tmp_path / "split"))
    with pytest.raises(ValueError, match="the packed rows differ"):
        sft(_sft_args(base, tmp_path / "split", resume=True, seed=1))
    sft(_sft_args(base, tmp_path / "split", resume=True))
    key = [(r["step"], r["loss"], r["ce"], r["grad_norm"]) for r in _rows(tmp_path / "split")]
    assert key == [(r["step"], r["loss"], r["ce"], r["grad_norm"]) for r in rows]

    # the result loads like any work directory, with the chat tokenizer
    tuned, tuned_tok = load_workdir(full)
    assert tuned_tok.token_id("<|assistant|>") == 4
    assert main(["plot", str(full)]) == 0


def test_sft_bad_arguments(base, tmp_path):
    with pytest.raises(ValueError, match="--distill-weight needs --teacher"):
        sft(_sft_args(base, tmp_path / "x", distill_weight=0.5))
    with pytest.raises(ValueError, match="--steps or --epochs"):
        sft(_sft_args(base, tmp_path / "x", epochs=1.0))
    with pytest.raises(ValueError, match="chat.jsonl:.*tokens.*--truncate"):
        sft(_sft_args(base, tmp_path / "x", seq_len=8))
    from flax import nnx

    from dsv3_jax.hf import save_pretrained
    from dsv3_jax.model.transformer import Transformer
    from dsv3_jax.posttrain.sft import sft_tokenizer
    from dsv3_jax.train.tokenizer import ByteTokenizer, Tokenizer

    tok = Tokenizer.load(base / "released" / "tokenizer.json")
    save_pretrained(Transformer(CFG.replace(vocab_size=600), nnx.Rngs(0)), tmp_path / "other")
    tok.save(tmp_path / "other" / "tokenizer.json")
    with pytest.raises(ValueError, match="vocab_size 600 differs from the student's 512"):
        sft(_sft_args(base, tmp_path / "x", teacher=str(tmp_path / "other"), distill_weight=0.5))
    byte = ByteTokenizer()  # no role tokens: appending them needs ids past a byte-sized vocabulary
    with pytest.raises(ValueError, match="beyond the model.s vocab_size.*--resize-vocab"):
        sft_tokenizer(byte, byte.vocab_size, "test")


def test_distillation_with_teacher_equal_to_student_has_zero_kl(base, tmp_path):
    out = sft(_sft_args(base, tmp_path / "d", steps=1, teacher=str(base / "released"), distill_weight=0.5,
                        distill_temperature=2.0))
    (row,) = _rows(out["workdir"])
    assert row["distill_kl"] == pytest.approx(0.0, abs=1e-6)
    # loss = (1 - w) CE + w tau^2 KL + lambda MTP + balance, with KL = 0
    assert row["loss"] == pytest.approx(0.5 * row["ce"] + 0.1 * row["mtp_loss"] + row["balance_loss"], rel=1e-5)


def test_distill_data_writes_trainable_chat_jsonl(base, tmp_path):
    from dsv3_jax.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def x"}) + "\n\n"
                       + json.dumps({"messages": [{"role": "user", "content": "print y"}]}) + "\n")
    out = tmp_path / "answers.jsonl"
    assert main(["distill-data", "--teacher", str(base / "released"), "--prompts", str(prompts), "--out", str(out),
                 "--samples", "2", "--max-new-tokens", "6", "--batch", "3"]) == 0
    convs = read_chat_jsonl([str(out)])
    assert len(convs) == 4
    assert [c[1][0]["content"] for c in convs] == ["def x", "def x", "print y", "print y"]
    assert all(c[1][-1]["role"] == "assistant" for c in convs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                 "content": "b"}]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: the last message must be the user's"):
        from dsv3_jax.posttrain.distill import read_prompts

        read_prompts(str(bad))


def test_context_extension_starts_from_the_run_with_yarn(base, tuned, tmp_path):
    wd = tmp_path / "ext"
    train(RunArgs(workdir=str(wd), steps=1, preset=None, init=str(tuned), yarn_factor=2.0, seq_len=64,
                  batch=2, data=[str(base / "corpus.txt")], sample_tokens=0, progress=False))
    ext, _ = load_workdir(wd)
    cfg = ext.config
    # the original length defaults to the --init run's --seq-len (32)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position_embeddings) == ("yarn", 2.0, 32)
    assert (cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_mscale_all_dim) == (32.0, 1.0, 1.0)
    before, _ = load_workdir(tuned)
    a, b = flat_state(split_model(ext)[1]), flat_state(split_model(before)[1])
    # one AdamW step at the constant extension LR (the run's peak 1e-3 x 7.3e-6 / 2.2e-4 = 3.3e-5) moves each
    # weight by about that much, not more (a fresh initialisation would differ by O(0.01))
    lr = 1e-3 * 7.3e-6 / 2.2e-4
    diff = max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)
    assert 0 < diff < 3 * lr
    row = _rows(wd)[0]
    assert row["lr"] == pytest.approx(lr) and row["gamma"] == 0.0 and row["mtp_weight"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="needs --init"):
        train(RunArgs(workdir=str(tmp_path / "y"), steps=1, yarn_factor=2.0, sample_tokens=0, progress=False))
    with pytest.raises(ValueError, match="exceeds --yarn-original-len 32 x --yarn-factor 2"):
        train(RunArgs(workdir=str(tmp_path / "y"), steps=1, preset=None, init=str(tuned), yarn_factor=2.0,
                      seq_len=128, sample_tokens=0, progress=False))


def test_resize_vocab_appends_mean_rows():
    from flax import nnx

    from dsv3_jax.model.transformer import Transformer
    from dsv3_jax.posttrain.sft import resize_vocab

    cfg = CFG.replace(vocab_size=258)
    _, params, _ = split_model(Transformer(cfg, nnx.Rngs(0)))
    new_cfg, new = resize_vocab(cfg, params, 261)
    assert new_cfg.vocab_size == 261
    old, grown = flat_state(params), flat_state(new)
    emb, head = np.asarray(old["embed.value"]), np.asarray(old["head.value"])
    np.testing.assert_array_equal(grown["embed.value"][:258], emb)
    np.testing.assert_allclose(grown["embed.value"][258:], np.repeat(emb.mean(0, keepdims=True), 3, 0), rtol=1e-6)
    np.testing.assert_array_equal(grown["head.value"][:, :258], head)
    np.testing.assert_allclose(grown["head.value"][:, 258:], np.repeat(head.mean(1, keepdims=True), 3, 1), rtol=1e-6)
    assert all(np.array_equal(grown[k], old[k]) for k in old if k not in ("embed.value", "head.value"))
    # the grown parameters fit a model of the new config
    like = flat_state(split_model(nnx.eval_shape(lambda: Transformer(new_cfg, nnx.Rngs(0))))[1])
    assert {k: tuple(v.shape) for k, v in like.items()} == {k: tuple(np.shape(v)) for k, v in grown.items()}
    with pytest.raises(ValueError, match="cannot shrink"):
        resize_vocab(cfg, params, 100)
