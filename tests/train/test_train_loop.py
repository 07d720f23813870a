"""The training step and loop: resume is bit-identical, the expert bias moves by the sign rule and gets no
gradient, the spike guard skips and restores, remat policies do not change gradients, bad input is refused, and a
Batch of packed samples with loss masks gives the loss and gradients of the samples computed one by one."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv3_jax.balance import update_expert_bias
from dsv3_jax.config import TINY
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.train.loop import RunArgs, train
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.losses import token_logprobs
from dsv3_jax.train.step import Batch, StepConfig, init_state, make_train_step, split_model

CFG = TINY.replace(num_hidden_layers=2, first_k_dense_replace=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "print", "x", "y", "(", ")", ":"]
    text = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(3000))
    path = d / "corpus.txt"
    path.write_text(text)
    return str(path)


def _args(workdir, corpus, **kw):
    base = dict(workdir=str(workdir), steps=6, preset="tiny", batch=4, seq_len=32, data=[corpus], save_every=2,
                keep=5, sample_tokens=0, progress=False)
    return RunArgs(**{**base, **kw})


def _losses(workdir):
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


def test_stop_at_and_resume_give_bit_identical_losses(tmp_path, corpus):
    full = train(_args(tmp_path / "full", corpus))
    assert full["steps_done"] == 6
    train(_args(tmp_path / "split", corpus, stop_at=3))
    assert [s for s, _, _ in _losses(tmp_path / "split")] == [1, 2, 3]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_args(tmp_path / "split", corpus))  # nothing overwritten without --resume
    train(_args(tmp_path / "split", corpus, resume=True))
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")  # exact float equality, every step


def test_resume_without_checkpoint_is_an_error(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_args(tmp_path / "empty", corpus, resume=True))


@pytest.mark.parametrize("kw,match", [
    (dict(seq_len=4096), "seq_len 4096 exceeds ModelConfig.max_position_embeddings 512"),
    (dict(data=["/nonexistent/corpus.txt"]), "/nonexistent/corpus.txt"),
    (dict(micro_batch=3), "--micro-batch 3 must be positive and divide --batch 4"),
    (dict(stop_at=9), r"--stop-at 9 must be in \[1, --steps 6\]"),
    (dict(steps=0), "--steps must be a positive integer"),
])
def test_bad_run_arguments(tmp_path, corpus, kw, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train(_args(tmp_path / "bad", corpus, **kw))


def test_empty_data_file(tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        train(_args(tmp_path / "run", corpus, data=[str(empty)]))


def test_token_ids_past_vocab(tmp_path, corpus):
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.arange(1000, dtype=np.uint16))
    with pytest.raises(ValueError, match="tokens.npy"):
        train(_args(tmp_path / "run", corpus, data=[str(tokens)]))


def test_spike_guard_skips_and_restores(tmp_path, corpus):
    # from step 3 on every loss is a "spike" (factor 0.01): updates are skipped, and after 2 skips the last
    # checkpoint (step 2) is restored
    train(_args(tmp_path / "spiky", corpus, spike_factor=0.01, spike_warmup=2, max_spikes=2))
    events = [json.loads(line) for line in open(tmp_path / "spiky" / "events.jsonl")]
    kinds = [e["event"] for e in events]
    assert kinds.count("skipped_update") == 4
    restores = [e for e in events if e["event"] == "restored_checkpoint"]
    assert restores and restores[0]["step"] == 4 and restores[0]["from_step"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "spiky" / "metrics.jsonl")]
    assert [r["skipped"] for r in rows] == [False, False, True, True, True, True]


# ----- the step function itself -----


@pytest.fixture(scope="module")
def step_setup():
    model = Transformer(CFG, nnx.Rngs(0))
    graphdef, params, bias = split_model(model)
    bias = jax.tree.map(lambda b: b + 0.01 * jnp.arange(b.shape[-1], dtype=b.dtype), bias)
    opt = make_optimizer(params, 1e-3, 10)
    windows = jax.random.randint(jax.random.key(0), (2, 2, 17), 0, CFG.vocab_size)
    return graphdef, params, bias, opt, windows


def test_bias_moves_by_sign_rule_and_gets_no_gradient(step_setup):
    graphdef, params, bias, opt, windows = step_setup
    step = make_train_step(graphdef, opt, StepConfig(), donate=False)  # stepped twice from the same state
    state, metrics = step(init_state(params, bias, opt), windows, 0.3, 0.001)
    assert not bool(metrics.skipped)
    # independent count: the forward over the same windows with the old state
    model = nnx.merge(graphdef, params, bias)
    counts = sum(model.forward(windows[k, :, :-1]).expert_counts for k in range(windows.shape[0]))
    old = bias["moe_layers"]["ffn"]["expert_bias"][...]
    new = state["bias"]["moe_layers"]["ffn"]["expert_bias"][...]
    np.testing.assert_allclose(np.asarray(new), np.asarray(update_expert_bias(old, counts, 0.001)), atol=1e-7)
    assert set(np.round(np.unique(np.asarray(new - old)) / 0.001).astype(int)) <= {-1, 0, 1}
    # the optimizer never sees it
    assert "expert_bias" not in str(jax.tree_util.tree_structure(state["opt"]))
    # gamma = 0 (the last 500B tokens of the paper): the bias stays put
    state0, _ = step(init_state(params, bias, opt), windows, 0.3, 0.0)
    np.testing.assert_array_equal(np.asarray(state0["bias"]["moe_layers"]["ffn"]["expert_bias"][...]),
                                  np.asarray(old))


def test_the_step_updates_its_state_in_place(step_setup):
    """The state is donated: XLA writes the new state into the old one's buffers (issue 10: no second copy)."""
    graphdef, params, bias, opt, windows = step_setup
    state0 = jax.tree.map(jnp.copy, init_state(params, bias, opt))
    state, _ = make_train_step(graphdef, opt, StepConfig())(state0, windows, 0.3, 0.001)
    assert all(a.is_deleted() for a in jax.tree.leaves(state0))
    assert not any(a.is_deleted() for a in jax.tree.leaves(state))


def test_nonfinite_loss_skips_the_update(step_setup):
    graphdef, params, bias, opt, windows = step_setup
    step = make_train_step(graphdef, opt, StepConfig(), donate=False)
    bad = jax.tree.map(lambda p: p, params)
    bad["norm"]["weight"].set_value(jnp.full_like(bad["norm"]["weight"][...], jnp.nan))
    state, metrics = step(init_state(bad, bias, opt), windows, 0.3, 0.001)
    assert bool(metrics.skipped) and bool(metrics.nonfinite)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(bad)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(state["bias"]["moe_layers"]["ffn"]["expert_bias"][...]),
                                  np.asarray(bias["moe_layers"]["ffn"]["expert_bias"][...]))


def test_remat_policies_give_the_same_gradients(step_setup):
    graphdef, params, bias, opt, windows = step_setup
    sgd = optax.sgd(1.0)
    results = {}
    for policy in ("none", "paper", "full"):
        step = make_train_step(graphdef, sgd, StepConfig(remat=policy), donate=False)
        state, m = step(init_state(params, bias, sgd), windows, 0.3, 0.001)
        results[policy] = (float(m.loss), jax.tree.leaves(state["params"]))
    for policy in ("paper", "full"):
        assert results[policy][0] == pytest.approx(results["none"][0], rel=1e-6)
        for a, b in zip(results[policy][1], results["none"][1]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_accumulation_equals_one_big_batch(step_setup):
    graphdef, params, bias, opt, windows = step_setup
    sgd = optax.sgd(1.0)
    step = make_train_step(graphdef, sgd, StepConfig(), donate=False)
    two, m2 = step(init_state(params, bias, sgd), windows, 0.3, 0.0)
    one, m1 = step(init_state(params, bias, sgd), windows.reshape(1, 4, 17), 0.3, 0.0)
    # the CE and MTP terms are means over equal-size micro-batches; the balance term is per micro-batch
    assert float(m2.ce) == pytest.approx(float(m1.ce), rel=1e-6)
    for a, b in zip(jax.tree.leaves(two["params"]), jax.tree.leaves(one["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ----- Batch: loss masks and segment ids -----


@pytest.fixture(scope="module")
def masked_step(step_setup):
    """One step function for the windows and for Batches with both fields (two compiles): no balance term, so that
    packed rows and lone samples share every loss term; its optimizer keeps the gradient as its state."""
    graphdef, params, bias, _, windows = step_setup
    keep_grads = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                              lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    return (make_train_step(graphdef, keep_grads, StepConfig(balance_alpha=0.0), donate=False),
            init_state(params, bias, keep_grads))


def _assert_grads_close(actual, expected, rel=1e-5):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= rel * np.linalg.norm(b), (np.linalg.norm(a - b), np.linalg.norm(b))


def _packed_batch(seed=0):
    """K=2 micro-batches of M=2 rows, S=17: 2-3 samples per row (prompt then response), a padding tail; the loss
    mask is 0 on prompts and 1 on responses and on the padding (segment id 0 must exclude it by itself)."""
    rng = np.random.default_rng(seed)
    layout = [[(6, 2), (5, 3)], [(4, 1), (7, 3), (3, 1)], [(16, 5)], [(9, 4), (6, 2)]]  # (length, prompt) per row
    tokens = rng.integers(0, CFG.vocab_size, (4, 17)).astype(np.int32)
    mask, seg, samples = np.ones((4, 17), np.float32), np.zeros((4, 17), np.int32), []
    for r, row in enumerate(layout):
        at = 0
        for i, (n, prompt) in enumerate(row):
            seg[r, at:at + n] = i + 1
            mask[r, at:at + prompt] = 0
            samples.append((r // 2, tokens[r, at:at + n], mask[r, at:at + n]))
            at += n
    return Batch(tokens.reshape(2, 2, 17), mask.reshape(2, 2, 17), seg.reshape(2, 2, 17)), samples


def _one_by_one_loss(graphdef, samples, mtp_weight):
    """loss(params, bias): mean over micro-batches of CE + mtp_weight * L_MTP restated over the samples run alone
    (right-padded to 16 inputs, one forward): loss-weighted sums of -log p over the micro-batch's weighted main
    target count (eq. 24's normaliser), module k predicting t_{i+1+k}."""
    t, d = 16, CFG.num_mtp_layers
    inputs = np.stack([np.pad(x[:-1], (0, t - len(x) + 1)) for _, x, _ in samples])
    micro = np.array([k for k, _, _ in samples])

    def targets_and_weights(shift):
        tgt = np.zeros((len(samples), t), np.int32)
        w = np.zeros((len(samples), t), np.float32)
        for i, (_, x, m) in enumerate(samples):
            n = len(x) - shift
            tgt[i, :n], w[i, :n] = x[shift:], m[shift:]
        return jnp.asarray(tgt), jnp.asarray(w)

    heads = [targets_and_weights(1 + k) for k in range(d + 1)]
    member = jnp.asarray((micro[None, :] == np.arange(2)[:, None]).astype(np.float32))  # [K, samples]

    def loss(params, bias):
        out = nnx.merge(graphdef, params, bias).forward(jnp.asarray(inputs))
        count = member @ jnp.sum(heads[0][1], 1)
        ce = member @ jnp.sum(-token_logprobs(out.logits, heads[0][0]) * heads[0][1], 1) / count
        mtp = sum(member @ jnp.sum(-token_logprobs(out.mtp_logits[k - 1], heads[k][0]) * heads[k][1], 1) / count
                  for k in range(1, d + 1)) / d
        return jnp.mean(ce + mtp_weight * mtp), (jnp.mean(ce), jnp.mean(mtp))

    return loss


def test_packed_batch_equals_samples_one_by_one(step_setup, masked_step):
    """The acceptance test through the step: the loss, its CE and MTP parts and the gradients of a packed, masked
    Batch equal the per-sample computation."""
    graphdef, params, bias, _, _ = step_setup
    step, state0 = masked_step
    batch, samples = _packed_batch()
    state, m = step(state0, batch, 0.3, 0.0)
    ref = jax.jit(jax.value_and_grad(_one_by_one_loss(graphdef, samples, 0.3), has_aux=True))
    (loss, (ce, mtp)), grads = ref(params, bias)
    assert not bool(m.skipped)
    assert float(m.ce) == pytest.approx(float(ce), rel=1e-5)
    assert float(m.mtp_loss) == pytest.approx(float(mtp), rel=1e-5)
    assert float(m.loss) == pytest.approx(float(loss), rel=1e-5)
    _assert_grads_close(state["opt"], grads)


def test_all_ones_mask_and_one_segment_give_todays_step(step_setup, masked_step):
    """The regression guard: loss mask all ones and segment ids all 1 give the plain windows' loss and gradients."""
    windows = step_setup[4]
    step, state0 = masked_step
    plain, m0 = step(state0, windows, 0.3, 0.0)
    ones = Batch(windows, jnp.ones(windows.shape, jnp.float32), jnp.ones(windows.shape, jnp.int32))
    masked, m1 = step(state0, ones, 0.3, 0.0)
    for a, b in ((m1.loss, m0.loss), (m1.ce, m0.ce), (m1.mtp_loss, m0.mtp_loss)):
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    _assert_grads_close(masked["opt"], plain["opt"], rel=1e-6)


def test_batch_fields_must_match_the_tokens(step_setup, masked_step):
    step, state0 = masked_step
    windows = step_setup[4]
    with pytest.raises(ValueError, match="Batch.segment_ids has shape"):
        step(state0, Batch(windows, None, jnp.ones(windows.shape[:2] + (16,), jnp.int32)), 0.3, 0.0)


def test_generate_from_a_training_workdir(tmp_path, corpus, capsys):
    from dsv3_jax.cli import main
    from dsv3_jax.train.loop import load_workdir

    train(_args(tmp_path / "run", corpus))
    capsys.readouterr()
    model, tokenizer = load_workdir(tmp_path / "run")
    ids = np.array([[tokenizer.bos_id] + tokenizer.encode("def x")], np.int32)
    plain = model.generate(ids, 5)
    np.testing.assert_array_equal(model.generate(ids, 5, speculative=True), plain)
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def x",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def x")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_workdir(tmp_path / "nothing")
