"""Rule-based rewards for GRPO (paper §5.2.1): a registry of named rules, combined with weights.

A rule maps (completion text, problem, scorer name, finished) to a float; `finished` says whether the completion
ended with the EOS token within the generation budget. The total reward is sum_name weight * rule(...).

* ``exact``: the task's `score` (1.0 when the answer is right, else 0.0).
* ``format``: 1.0 when the completion is finished (ends with EOS) and has the task's answer shape
  (`tasks.well_formed`), else 0.0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from dsv3_jax.options import key_values
from dsv3_jax.posttrain.tasks import Problem, score, well_formed

RewardFn = Callable[[str, Problem, str, bool], float]


def exact_reward(completion: str, problem: Problem, scorer: str, finished: bool) -> float:
    """The task's score of the completion (1.0 correct, 0.0 not)."""
    return score(scorer, completion, problem)


def format_reward(completion: str, problem: Problem, scorer: str, finished: bool) -> float:
    """1.0 when the completion ended with EOS and has the task's answer shape."""
    return float(finished and well_formed(scorer, completion))


REWARDS: Mapping[str, RewardFn] = {"exact": exact_reward, "format": format_reward}
DEFAULT_WEIGHTS: Mapping[str, float] = {"exact": 1.0, "format": 0.1}


def parse_reward_weights(specs: Sequence[str] | None, known: Mapping[str, RewardFn] = REWARDS) -> dict[str, float]:
    """{"exact": 1.0, ...} from NAME=WEIGHT strings (None or empty: DEFAULT_WEIGHTS); ValueError on bad specs."""
    if not specs:
        return dict(DEFAULT_WEIGHTS)
    weights: dict[str, float] = {}
    for name, value in key_values(specs, "--reward", "NAME=WEIGHT (e.g. exact=1.0)").items():
        spec = f"{name}={value}"
        if name not in known:
            raise ValueError(f"--reward {spec!r}: unknown reward {name!r}; known: {', '.join(sorted(known))}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--reward {spec!r}: the weight {value!r} is not a number") from None
        if weights[name] != weights[name] or abs(weights[name]) == float("inf"):
            raise ValueError(f"--reward {spec!r}: the weight must be finite")
    if not any(weights.values()):
        raise ValueError("--reward: every weight is 0, so every reward (and advantage) would be 0")
    return weights


def compute_rewards(completions: Sequence[str], finished: Sequence[bool], problems: Sequence[Problem],
                    scorers: Sequence[str], weights: Mapping[str, float],
                    rules: Mapping[str, RewardFn] = REWARDS) -> tuple[list[float], dict[str, list[float]]]:
    """(total reward per completion, {rule name: its unweighted value per completion})."""
    if not len(completions) == len(finished) == len(problems) == len(scorers):
        raise ValueError("compute_rewards: completions, finished, problems and scorers differ in length")
    parts = {name: [float(rules[name](c, p, s, bool(f))) for c, f, p, s in zip(completions, finished, problems,
                                                                                 scorers)]
             for name in weights}
    totals = [sum(weights[name] * parts[name][i] for name in weights) for i in range(len(completions))]
    return totals, parts
