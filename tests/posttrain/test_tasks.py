"""Verifiable tasks: seeded generators, scorers (right, wrong, malformed), the countdown verifier, JSONL prompts and
the reward registry."""

import json
from fractions import Fraction

import pytest

from dsv3_jax.posttrain.rewards import compute_rewards, parse_reward_weights
from dsv3_jax.posttrain.tasks import (TASKS, Problem, countdown_value, load_problems, make_problems, score,
                                      well_formed)


@pytest.mark.parametrize("task", TASKS)
def test_generators_deterministic_per_seed(task):
    a = make_problems(task, 20, seed=3)
    assert a == make_problems(task, 20, seed=3)
    assert a != make_problems(task, 20, seed=4)
    assert make_problems(task, 5, seed=3) == a[:5]
    for p in a:  # each reference answer scores 1 (countdown's answer is the target, checked via meta)
        if task != "countdown":
            assert score(task, p.answer, p) == 1.0 and well_formed(task, p.answer)


def test_addition_and_sorting_content():
    for p in make_problems("addition", 50, seed=0, digits=1):
        a, b = p.meta["operands"]
        assert 0 <= a < 10 and 0 <= b < 10 and p.answer == str(a + b) and f"{a} + {b}" in p.prompt
    for p in make_problems("sorting", 20, seed=0, length=5, digits=2):
        xs = p.meta["numbers"]
        assert len(xs) == 5 and p.answer == " ".join(map(str, sorted(xs)))


def test_countdown_problems_are_solvable_by_brute_force():
    import itertools

    for p in make_problems("countdown", 10, seed=1):
        nums, target = p.meta["numbers"], p.meta["target"]
        assert p.answer == str(target) and target > 0
        found = False
        for r in range(2, len(nums) + 1):  # left-to-right chains, as the generator builds them
            for perm in itertools.permutations(nums, r):
                for ops in itertools.product("+-*/", repeat=r - 1):
                    expr = str(perm[0])
                    for op, x in zip(ops, perm[1:]):
                        expr = f"({expr}){op}{x}"
                    found = found or score("countdown", expr, p) == 1.0
        assert found, p


@pytest.mark.parametrize("task, completion, expected", [
    ("addition", "32", 1.0), ("addition", " 32 ", 1.0), ("addition", "33", 0.0), ("addition", "3 2", 0.0),
    ("addition", "32!", 0.0), ("addition", "", 0.0),
    ("sorting", "2 7 9", 1.0), ("sorting", "9 7 2", 0.0), ("sorting", "2 7", 0.0), ("sorting", "2,7,9", 0.0),
])
def test_scores(task, completion, expected):
    p = {"addition": Problem("What is 27 + 5?", "32", {}), "sorting": Problem("Sort ascending: 7 2 9", "2 7 9", {})}
    assert score(task, completion, p[task]) == expected


def test_countdown_verifier():
    p = Problem("Use 3 5 7 to make 22", "22", {"numbers": [3, 5, 7], "target": 22})
    assert score("countdown", "3*5+7", p) == 1.0
    assert score("countdown", " (7 + 5) * 3 - 14 ", p) == 0.0  # 14 is not given
    assert score("countdown", "3*5+7+0", p) == 0.0
    assert score("countdown", "5*5-3", p) == 0.0  # 5 used twice
    assert score("countdown", "7*3+1", p) == 0.0
    assert score("countdown", "22", p) == 0.0
    assert score("countdown", "", p) == 0.0
    assert countdown_value("7/(5-5)", [7, 5, 5]) is None  # division by zero
    assert countdown_value("7/2", [7, 2]) == Fraction(7, 2)  # exact, not float
    assert countdown_value("-3+5", [3, 5]) is None  # unary minus is not an operation the task allows
    for code in ["__import__('os').system('true')", "3**5", "[3, 5]", "abs(3)", "3 if 5 else 7", "3;5",
                 "(lambda: 3)()", "3.0+5", "True+5", "0x3+5"]:
        assert countdown_value(code, [3, 5, 7]) is None, code
    assert not well_formed("countdown", "abs(3)") and well_formed("countdown", "(3+5)*7")


def test_options_and_bad_arguments():
    assert make_problems("addition", 3, 0, digits=3) != make_problems("addition", 3, 0, digits=2)
    with pytest.raises(ValueError, match="unknown task"):
        make_problems("division", 1, 0)
    with pytest.raises(ValueError, match="unknown option"):
        make_problems("addition", 1, 0, length=3)
    with pytest.raises(ValueError, match="digits must be an integer"):
        make_problems("addition", 1, 0, digits=0)
    with pytest.raises(ValueError, match="unknown scorer"):
        score("division", "1", Problem("p", "1", {}))


def test_load_problems(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "Capital of France?", "answer": "Paris"},
            {"prompt": "Use 2 3 to make 6", "answer": "6", "task": "countdown", "meta": {"numbers": [2, 3]}}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    a, b = load_problems(path)
    assert a == Problem("Capital of France?", "Paris", {})
    assert score("exact", " Paris", a) == 1.0 and score("exact", "paris", a) == 0.0
    assert b.meta == {"numbers": [2, 3], "task": "countdown"} and score("countdown", "2*3", b) == 1.0


@pytest.mark.parametrize("line, match", [
    ("{not json", "not valid JSON"), ("[1]", "expected a JSON object"), ('{"prompt": "x"}', "'answer' must be"),
    ('{"prompt": "", "answer": "1"}', "'prompt' must be"), ('{"prompt": "x", "answer": "1", "extra": 1}',
                                                             "unknown key"),
    ('{"prompt": "x", "answer": "1", "task": "chess"}', "'task' must be"),
    ('{"prompt": "x", "answer": "1", "task": "countdown"}', "meta.numbers"),
    ('{"prompt": "x", "answer": "1", "meta": []}', "'meta' must be an object"),
])
def test_load_problems_errors(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{match}"):
        load_problems(path)


def test_load_problems_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no problems"):
        load_problems(tmp_path / "empty.jsonl")


def test_rewards():
    assert parse_reward_weights(None) == {"exact": 1.0, "format": 0.1}
    assert parse_reward_weights(["exact=2", "format=0.5"]) == {"exact": 2.0, "format": 0.5}
    for spec, match in [("exact", "NAME=WEIGHT"), ("speed=1", "unknown reward"), ("exact=x", "not a number"),
                        ("exact=nan", "finite"), ("exact=0", "every weight is 0")]:
        with pytest.raises(ValueError, match=match):
            parse_reward_weights([spec])
    with pytest.raises(ValueError, match="given twice"):
        parse_reward_weights(["exact=1", "exact=2"])
    p = Problem("What is 1 + 2?", "3", {})
    totals, parts = compute_rewards(["3", "3", "4", "x"], [True, False, True, True], [p] * 4, ["addition"] * 4,
                                    {"exact": 1.0, "format": 0.5})
    assert parts == {"exact": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0, 0.0]}
    assert totals == [1.5, 1.0, 0.5, 0.0]
