"""Research switches of `dsv3 train` (balance strategy and scope, MTP overrides, --set, FIM, held-out evaluation):
the balance terms against NumPy restatements of eqs. 17-20 and §4.5.3, one tiny aux-loss run (bias stays zero,
loss = CE + w MTP + alpha x balance term) with held-out evaluation."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import TINY, apply_overrides
from dsv3_jax.losses import batch_balance_terms, sequence_balance_terms
from dsv3_jax.model import moe as moe_mod
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.train import loop
from dsv3_jax.train.loop import RunArgs, balance_settings, load_workdir, train
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.train.step import Batch, StepConfig, batch_loss_terms, init_state, make_train_step, split_model
from dsv3_jax.train.tokenizer import FIM_TOKENS, ByteTokenizer, Tokenizer
from dsv3_jax.train.tokens import is_heldout, prepare_tokens

WORDS = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "print", "x", "y", "(", ")"]


def np_balance(scores_BTE, experts_BTK, scope):
    """sum_i f_i P_i: f_i = E/(K T) #hits, P_i = mean_t s'_i over one sequence (mean over sequences) or the batch."""
    s = np.asarray(scores_BTE, np.float64)
    x = np.asarray(experts_BTK)
    if scope == "batch":
        s, x = s.reshape(1, -1, s.shape[-1]), x.reshape(1, -1, x.shape[-1])
    b, t, e = s.shape
    k = x.shape[-1]
    terms = []
    for j in range(b):
        f = np.bincount(x[j].ravel(), minlength=e) * e / (k * t)
        p = (s[j] / s[j].sum(-1, keepdims=True)).mean(0)
        terms.append(np.sum(f * p))
    return float(np.mean(terms))


def test_balance_terms_against_numpy():
    rng = np.random.default_rng(0)
    scores = jax.nn.sigmoid(jnp.asarray(rng.normal(size=(3, 10, 8)), jnp.float32))
    experts = jnp.asarray(np.argsort(-rng.normal(size=(3, 10, 8)), -1)[..., :2], jnp.int32)
    seq = float(jnp.mean(sequence_balance_terms(scores, experts)))
    bat = float(batch_balance_terms(scores, experts))
    np.testing.assert_allclose(seq, np_balance(scores, experts, "sequence"), rtol=1e-5)
    np.testing.assert_allclose(bat, np_balance(scores, experts, "batch"), rtol=1e-5)
    assert abs(seq - bat) > 1e-3  # the scopes differ on this input


@pytest.fixture(scope="module")
def recorded_terms():
    """The step's loss terms (step.batch_loss_terms) per balance scope on the tiny model, alpha 1e-2, with every
    MoE layer's routing (scores, experts) recorded by a debug callback."""
    mp = pytest.MonkeyPatch()
    records = []
    route = moe_mod.route

    def recording_route(x_TD, router_DE, bias_E, cfg):
        r = route(x_TD, router_DE, bias_E, cfg)
        jax.debug.callback(lambda s, e: records.append((np.asarray(s), np.asarray(e))), r.scores_TE, r.experts_TK)
        return r

    mp.setattr(moe_mod, "route", recording_route)
    graphdef, params, bias = split_model(Transformer(TINY, nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, TINY.vocab_size)
    out = {}
    try:
        for scope in ("sequence", "batch"):
            records.clear()
            f = jax.jit(lambda p, b, t, scope=scope: batch_loss_terms(nnx.merge(graphdef, p, b), Batch(t), 0.3, 1e-2,
                                                                      balance_scope=scope)[:2])
            loss, (ce, mtp, bal) = jax.device_get(f(params, bias, tokens))
            out[scope] = (loss, ce, mtp, bal, list(records))
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_loss_adds_alpha_times_the_scopes_balance_term(recorded_terms, scope):
    loss, ce, mtp, bal, records = recorded_terms[scope]
    assert len(records) == TINY.num_hidden_layers - TINY.first_k_dense_replace + TINY.num_mtp_layers
    want = sum(np_balance(s.reshape(4, 16, -1), e.reshape(4, 16, -1), scope) for s, e in records)
    np.testing.assert_allclose(float(bal), 1e-2 * want, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(ce + 0.3 * mtp + bal), rtol=1e-6)


def test_balance_settings_and_validation():
    base = RunArgs(workdir="unused", steps=2)
    assert balance_settings(base) == (1e-4, None)  # today's default: the schedule and alpha 1e-4
    assert balance_settings(dataclasses.replace(base, balance="aux-loss")) == (1e-3, 0.0)
    assert balance_settings(dataclasses.replace(base, balance="none")) == (0.0, 0.0)
    assert balance_settings(dataclasses.replace(base, gamma=0.01, balance_alpha=0.0)) == (0.0, 0.01)
    bad = {"balance": "aux", "balance_scope": "token", "balance_alpha": -1.0, "mtp_depth": -1, "mtp_weight": -0.1,
           "fim_rate": 1.5, "eval_fraction": 1.0, "eval_every": -1, "eval_batches": 0, "eval_data": ["noequals"]}
    for name, value in bad.items():
        extra = {"eval_every": 2} if name == "eval_data" else {}
        with pytest.raises(ValueError, match=name.replace("_", "-")):
            loop._validate(dataclasses.replace(base, **{name: value}, **extra))
    with pytest.raises(ValueError, match="--gamma"):
        loop._validate(dataclasses.replace(base, balance="aux-loss", gamma=0.001))
    with pytest.raises(ValueError, match="--balance-alpha"):
        loop._validate(dataclasses.replace(base, balance="none", balance_alpha=1e-3))
    with pytest.raises(ValueError, match="--eval-every needs"):
        loop._validate(dataclasses.replace(base, eval_every=2, eval_fraction=0.0))


def test_set_and_mtp_depth_override_the_config():
    args = RunArgs(workdir="unused", steps=2, set=["n_group=1", "topk_group=1", "num_experts_per_tok=3",
                                                   "rope_mscale=None", "tie_word_embeddings=true"], mtp_depth=0)
    cfg = loop._switch_config(args, TINY)
    assert (cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.num_mtp_layers) == (1, 1, 3, 0)
    assert cfg.rope_mscale is None and cfg.tie_word_embeddings is True
    for items, match in ((["nope=1"], "no field 'nope'"), (["n_group=two"], "n_group=two: expected int"),
                         (["n_group"], "KEY=VALUE"), (["num_experts_per_tok=9"], "num_experts_per_tok"),
                         (["expert_bias=maybe"], "expected bool")):
        with pytest.raises(ValueError, match=match):
            apply_overrides(TINY, items)
    with pytest.raises(ValueError, match="no field 'nope'"):  # train() rejects it before any work
        train(RunArgs(workdir="unused", steps=2, set=["nope=1"]))


def test_heldout_split_is_whole_documents_disjoint_and_seed_free(tmp_path):
    docs = [f"document {i}: " + " ".join(WORDS[(i * j) % len(WORDS)] for j in range(30)) for i in range(300)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = ByteTokenizer()

    def split_docs(split):
        t = prepare_tokens([path], tok, tmp_path / "cache", 258, heldout_fraction=0.1, split=split)
        ids = np.asarray(t).tolist()
        out, cur = [], []
        for i in ids:
            if i == tok.eos_id:
                out.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
        assert not cur  # every document ends with EOS: whole documents only
        return out

    train_docs, held = split_docs("train"), split_docs("heldout")
    assert sorted(train_docs + held) == sorted(docs) and not set(train_docs) & set(held)
    assert held == [d for d in docs if is_heldout(d, 0.1)] and 10 <= len(held) <= 50
    # a pre-tokenized input: its tail
    arr = np.arange(1000, dtype=np.uint16) % 250
    np.save(tmp_path / "t.npy", arr)
    tail = prepare_tokens([tmp_path / "t.npy"], None, tmp_path / "cache", 258, heldout_fraction=0.05,
                          split="heldout")
    np.testing.assert_array_equal(tail, arr[950:])


@pytest.fixture(scope="module")
def aux_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("switches")
    rng = np.random.default_rng(0)
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, 40))}) + "\n" for _ in range(400)))
    other = d / "other.jsonl"
    other.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS[:4], 40))}) + "\n" for _ in range(40)))
    args = RunArgs(workdir=str(d / "run"), steps=4, batch=4, seq_len=32, data=[str(corpus)], sample_tokens=0,
                   progress=False, balance="aux-loss", balance_scope="batch", mtp_weight=0.2, eval_every=2,
                   eval_batches=1, eval_fraction=0.1, eval_data=[f"other={other}"])
    train(args)
    return args


def test_aux_loss_run_keeps_bias_zero_and_logs_switches(aux_run):
    model, _ = load_workdir(aux_run.workdir)
    biases = jax.tree.leaves(split_model(model)[2])
    assert len(biases) == 2 and all(np.all(np.asarray(b) == 0) for b in biases)  # main MoE stack and MTP block
    rows = [json.loads(line) for line in open(f"{aux_run.workdir}/metrics.jsonl")]
    assert len(rows) == 4
    for r in rows:
        assert (r["balance"], r["balance_scope"], r["balance_alpha"], r["gamma"]) == ("aux-loss", "batch", 1e-3, 0.0)
        assert r["mtp_weight"] == pytest.approx(0.2) and r["balance_loss"] > 0
        assert r["loss"] == pytest.approx(r["ce"] + 0.2 * r["mtp_loss"] + r["balance_loss"], rel=1e-5)


def test_eval_rows(aux_run):
    rows = [json.loads(line) for line in open(f"{aux_run.workdir}/eval.jsonl")]
    assert [r["step"] for r in rows] == [2, 4] and all(r["kind"] == "eval" for r in rows)
    n_moe = TINY.num_hidden_layers - TINY.first_k_dense_replace
    for r in rows:
        assert set(r["sets"]) == {"heldout", "other"}
        for s in r["sets"].values():
            load = np.asarray(s["load"])
            assert load.shape == (n_moe, TINY.n_routed_experts) and s["tokens"] == 4 * 32
            np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
            vio = load.max(-1) / load.mean(-1) - 1
            np.testing.assert_allclose(s["max_vio_layers"], vio, rtol=1e-5)
            assert s["max_vio"] == pytest.approx(vio.mean(), rel=1e-5) and 0 < s["ce"] < 10
    assert rows[0]["sets"]["heldout"]["ce"] != rows[1]["sets"]["heldout"]["ce"]


def test_heldout_windows_equal_across_seeds_and_fim_default(aux_run):
    cfg = TINY
    workdir = loop.pathlib.Path(aux_run.workdir)
    meta_tok = json.loads(next((workdir / "checkpoints").glob("*/meta/metadata")).read_text())["tokenizer"]
    tok = Tokenizer.from_json(meta_tok)
    a = loop._eval_sets(aux_run, cfg, workdir, tok, 4)
    b = loop._eval_sets(dataclasses.replace(aux_run, seed=7, balance="none", fim_rate=0.0), cfg, workdir, tok, 4)
    np.testing.assert_array_equal(a["heldout"], b["heldout"])
    begin = tok.token_id(FIM_TOKENS[0])
    assert RunArgs(workdir="x", steps=1).fim_rate == 0.1
    _, on = loop._tokenizer_and_tokens(aux_run, cfg, workdir, meta_tok)
    _, off = loop._tokenizer_and_tokens(dataclasses.replace(aux_run, fim_rate=0.0), cfg, workdir, meta_tok)
    assert np.sum(np.asarray(on) == begin) > 10 and not np.any(np.asarray(off) == begin)
    assert not np.any(a["heldout"] == begin)  # the held-out split is plain text


def test_resume_with_other_data_switches_is_refused(aux_run):
    with pytest.raises(ValueError, match="--fim-rate"):
        train(dataclasses.replace(aux_run, resume=True, steps=6, fim_rate=0.0))
    with pytest.raises(ValueError, match="--eval-fraction 0.0"):
        loop._check_resumed_data(aux_run, {"fim_rate": 0.1})  # saved before the switch existed: no held-out split


def test_cli_passes_the_switches(monkeypatch):
    from dsv3_jax import cli

    seen = []
    monkeypatch.setattr(loop, "train", lambda args: seen.append(args) or {"first_loss": None, "last_loss": None})
    assert cli.main(["train", "--workdir", "w", "--steps", "3", "--balance", "aux-loss", "--balance-scope", "batch",
                     "--balance-alpha", "0.01", "--mtp-depth", "0", "--mtp-weight", "0.5", "--set", "n_group=1",
                     "topk_group=1", "--fim-rate", "0", "--eval-every", "2", "--eval-fraction", "0.05",
                     "--eval-batches", "3", "--eval-data", "code=a.jsonl", "--gamma", "0"]) == 0
    a = seen[0]
    assert (a.balance, a.balance_scope, a.balance_alpha, a.gamma, a.mtp_depth, a.mtp_weight) == (
        "aux-loss", "batch", 0.01, 0.0, 0, 0.5)
    assert (a.set, a.fim_rate, a.eval_every, a.eval_fraction, a.eval_batches, a.eval_data) == (
        ["n_group=1", "topk_group=1"], 0.0, 2, 0.05, 3, ["code=a.jsonl"])
    assert cli.main(["train", "--workdir", "w", "--steps", "3"]) == 0
    assert (seen[1].balance, seen[1].fim_rate, seen[1].eval_fraction, seen[1].eval_every) == ("aux-free", 0.1, 0.01, 0)
    assert not seen[1].unroll_layers and loop.step_config(seen[1]) == StepConfig()
    assert cli.main(["train", "--workdir", "w", "--steps", "3", "--unroll-layers"]) == 0
    assert loop.step_config(seen[2]).unroll_layers
    from dsv3_jax.posttrain import sft

    monkeypatch.setattr(sft, "sft", lambda args: seen.append(args) or {"first_loss": None})
    assert cli.main(["sft", "--init", "i", "--data", "d", "--workdir", "w", "--unroll-layers"]) == 0
    assert seen[3].unroll_layers


def test_unrolled_layer_scans_step_like_the_scan():
    """StepConfig(unroll_layers=True) (`--unroll-layers`) unrolls the scans over the layer stacks: the compiled
    step has no 3-trip loop over the MoE stack left, and its loss, gradient norm and updated weights are the
    scanned step's (a different program for the same arithmetic, so up to float reassociation)."""
    cfg = TINY.replace(num_hidden_layers=4)  # 1 dense + 3 MoE layers: a stack the scan really loops over
    graphdef, params, bias = split_model(Transformer(cfg, nnx.Rngs(0)))
    opt = make_optimizer(params, 1e-2, 10)
    windows = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 2, 33)), jnp.int32)
    out = {}
    for unroll in (False, True):
        step = make_train_step(graphdef, opt, StepConfig(unroll_layers=unroll), donate=False)
        state = init_state(params, bias, opt)
        hlo = step.lower(state, windows, 0.3, 1e-3).compile().as_text()
        assert ('known_trip_count":{"n":"3"}' in hlo) != unroll  # the scan over the 3 MoE layers
        out[unroll] = step(state, windows, 0.3, 1e-3)
    (s0, m0), (s1, m1) = out[False], out[True]
    np.testing.assert_allclose([m1.loss, m1.grad_norm], [m0.loss, m0.grad_norm], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s0["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
