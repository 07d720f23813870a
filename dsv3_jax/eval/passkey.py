"""Passkey retrieval (needle in a haystack), the probe of long-context extension (paper §4.3, YaRN; the NIAH test of
Figure 8): filler text with a random 5-digit key at a chosen depth and a question at the end, built to a given
token length; scored by greedy exact match of the key."""

from __future__ import annotations

import random
import re
from typing import NamedTuple, Sequence

INTRO = "Find the pass key in the text."
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it."
QUESTION = "What is the pass key? The pass key is"


class PasskeyProblem(NamedTuple):
    """A prompt (exactly `n_tokens` tokens or fewer, never more than the requested length), its key, and the cell."""

    prompt: str
    answer: str
    length: int
    depth: float
    n_tokens: int


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[str, int]:
    """The longest prompt (intro, filler with the needle at `depth` of the filler, question) whose token count,
    BOS included, is at most `length`; returns (prompt, token count)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")

    def build(n_fill: int) -> str:
        before = round(depth * n_fill)
        parts = [INTRO] + [FILLER] * before + [NEEDLE.format(key=key)] + [FILLER] * (n_fill - before) + [QUESTION]
        return " ".join(parts)

    def count(n_fill: int) -> int:
        return 1 + len(tokenizer.encode(build(n_fill)))

    if count(0) > length:
        raise ValueError(f"passkey length {length} is below the {count(0)} tokens of the prompt without filler")
    lo, hi = 0, 1
    while count(hi) <= length:  # token counts grow with the filler; bracket then bisect
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= length else (lo, mid)
    return build(lo), count(lo)


def make_passkey_problems(tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                          seed: int = 0) -> list[PasskeyProblem]:
    """`trials` problems per (length, depth) cell, each with its own random 5-digit key."""
    if trials < 1:
        raise ValueError(f"passkey trials must be >= 1, got {trials}")
    rng = random.Random(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                prompt, n = passkey_prompt(tokenizer, length, depth, key)
                out.append(PasskeyProblem(prompt, key, length, depth, n))
    return out


def passkey_score(completion: str, key: str) -> float:
    """1.0 when the first number in the completion is the key."""
    m = re.search(r"\d+", completion)
    return float(m is not None and m.group(0) == key)


def format_table(cells: dict[tuple[int, float], float], lengths: Sequence[int], depths: Sequence[float]) -> str:
    """Accuracy per length (rows) x depth (columns) as a text table."""
    lines = ["length \\ depth " + "".join(f"{d:>8.2f}" for d in depths)]
    for length in lengths:
        lines.append(f"{length:>15d}" + "".join(f"{cells[(length, d)]:>8.2f}" for d in depths))
    return "\n".join(lines)
