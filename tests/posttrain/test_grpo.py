"""The GRPO trainer on the tiny model: samples and masks, ratio 1 at the first update, the policy moves and the
reference does not, expert bias and MTP frozen by default, bias moving with gamma > 0, non-finite updates
skipped, Ctrl-C saving a checkpoint that `load_model_and_tokenizer` reads and a resumed run equal to an
uninterrupted one; flag validation."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

import dsv3_jax
from dsv3_jax.cli import main
from dsv3_jax.load import load_model_and_tokenizer
from dsv3_jax.posttrain.grpo import GRPOArgs, GRPOInterrupted, GRPOTrainer, run_grpo
from dsv3_jax.posttrain.rewards import REWARDS
from dsv3_jax.train.tokenizer import Tokenizer
from dsv3_jax.train.step import split_model

TEXTS = ["What is 1 + 2? 3", "What is 4 + 5? 9", "0 1 2 3 4 5 6 7 8 9 + = ?", "Sort ascending: 3 1 2"]


def chars_reward(completion, problem, scorer, finished):
    """A reward that varies between a random model's samples, so advantages are not all 0."""
    return float(len(set(completion)) % 3)


RULES = {**REWARDS, "chars": chars_reward}


def _args(init, workdir, **kw):
    base = dict(init=str(init), workdir=str(workdir), task="builtin:addition", task_options=(("digits", 1),),
                iterations=2, prompts_per_batch=2, group_size=4, updates_per_batch=2, lr=1e-2, max_new_tokens=6,
                rewards=("chars=1", "exact=1"), progress=False)
    return GRPOArgs(**{**base, **kw})


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_host(a), _host(b), strict=True))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo_init")
    dsv3_jax.save_pretrained(dsv3_jax.Transformer(dsv3_jax.get_preset("tiny"), nnx.Rngs(0)), path)
    Tokenizer.train(TEXTS, 300).save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def trained(init_dir, tmp_path_factory):
    model, tok = load_model_and_tokenizer(init_dir)
    _, params0, bias0 = split_model(model)
    params0, bias0 = jax.tree.map(np.array, (params0, bias0))
    trainer = GRPOTrainer(_args(init_dir, tmp_path_factory.mktemp("unused")), model, tok, RULES)
    rows = [trainer.iteration(0), trainer.iteration(1)]
    # one compiled program each for all iterations and for policy and reference alike
    assert trainer._update._cache_size() == 1 and trainer._logprobs._cache_size() == 1
    return trainer, rows, params0, bias0, jax.tree.map(np.array, trainer.state["params"])


def test_rollout_masks(trained):
    trainer, *_ = trained
    ro = trainer.rollout(5)
    eos, n = trainer.tokenizer.eos_id, trainer.args.max_new_tokens
    assert ro.seq_BS.shape == (8, trainer.prompt_len + n)
    for row in range(8):
        problem = trainer.pool[trainer.batch_indices(5)[row // 4]]
        start = len(trainer.prompts[trainer.pool.index(problem)])
        on = np.flatnonzero(ro.mask_BS[row])
        assert on[0] == start and np.all(np.diff(on) == 1) and len(on) == ro.lengths_B[row] <= n
        completion = ro.seq_BS[row, on]
        assert eos not in completion[:-1]
        assert (completion[-1] == eos) == (len(on) < n or completion[-1] == eos)
        assert ro.completions[row] == trainer.tokenizer.decode(completion[:-1] if completion[-1] == eos else
                                                               completion)
    np.testing.assert_allclose(ro.advantages_B.reshape(2, 4).mean(axis=1), 0, atol=1e-5)


def test_first_update_has_ratio_one_and_the_policy_moves(trained):
    trainer, rows, params0, *_ = trained
    for row in rows:
        assert row["ratio_dev_first"] < 1e-5  # the stored old log-probs are the policy's own
        assert row["reward_std"] > 0 and row["grad_norm"] > 0
    assert rows[1]["kl"] > 1e-6  # the policy has left the reference
    moved = [not np.array_equal(a, b) for a, b in zip(_host(trainer.state["params"]), _host(params0))]
    assert sum(moved) > len(moved) // 2


def test_reference_bias_and_mtp_frozen(trained):
    trainer, _, params0, bias0, _ = trained
    assert _same(trainer.ref_params, params0) and _same(trainer.ref_bias, bias0)
    assert _same(trainer.state["bias"], bias0)  # gamma 0
    assert _same(trainer.state["params"]["mtp"], params0["mtp"])  # mtp_weight 0


def test_gamma_moves_the_bias(trained):
    trainer, *_ = trained
    ro = trainer.rollout(2)
    old = trainer.logprobs(trainer.state["params"], trainer.state["bias"], ro.seq_BS)
    ref = trainer.logprobs(trainer.ref_params, trainer.ref_bias, ro.seq_BS)
    before = _host(trainer.state["bias"]["moe_layers"])[0]
    trainer.update(ro, old, ref, gamma=0.01)
    delta = _host(trainer.state["bias"]["moe_layers"])[0] - before
    assert np.any(delta != 0) and np.allclose(np.abs(delta[delta != 0]), 0.01)


def test_ctrl_c_saves_and_resume_equals_uninterrupted_run(init_dir, trained, tmp_path):
    _, want_rows, _, _, want_params = trained  # the fixture's two iterations, uninterrupted
    calls = []

    def ctrl_c_during_first_iteration(*a):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(1)
        return chars_reward(*a)

    with pytest.raises(GRPOInterrupted):
        run_grpo(_args(init_dir, tmp_path), {**RULES, "chars": ctrl_c_during_first_iteration})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])["event"] == "interrupted"
    with pytest.raises(ValueError, match="--resume"):
        run_grpo(_args(init_dir, tmp_path), RULES)
    summary = run_grpo(_args(init_dir, tmp_path, resume=True), RULES)
    assert summary["iterations_done"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for a, b in zip(rows, want_rows, strict=True):
        assert {k: v for k, v in a.items() if "time" not in k} == {k: v for k, v in b.items() if "time" not in k}
    model, tok = load_model_and_tokenizer(tmp_path)  # the `dsv3 train` work-directory layout
    _, params, _ = split_model(model)
    assert _same(params, want_params)
    assert tok.token_id("<|assistant|>") is not None


@pytest.mark.parametrize("flags, match", [
    (["--group-size", "1"], "--group-size must be >= 2"), (["--temperature", "0"], "--temperature must be > 0"),
    (["--clip-eps", "1.5"], "--clip-eps"), (["--task", "builtin:chess"], "unknown built-in task"),
    (["--task", "nope.jsonl"], "no such JSONL file"), (["--reward", "speed=1"], "unknown reward"),
    (["--task-option", "digits=x"], "not an integer"), (["--task-option", "length=3"], "unknown option"),
    (["--stop-at", "5", "--iterations", "2"], "--stop-at 5"),
])
def test_cli_flag_errors(tmp_path, capsys, flags, match):
    argv = ["grpo", "--init", str(tmp_path / "none"), "--workdir", str(tmp_path / "w"), *flags]
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_nonfinite_update_is_skipped(trained):
    trainer, *_ = trained
    ro = trainer.rollout(3)
    old = trainer.logprobs(trainer.state["params"], trainer.state["bias"], ro.seq_BS)
    before = jax.tree.map(np.array, trainer.state["params"])
    m = trainer.update(ro._replace(advantages_B=np.full_like(ro.advantages_B, np.nan)), old, old)
    assert bool(m["skipped"]) and _same(trainer.state["params"], before)
