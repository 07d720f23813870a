"""Evaluation tasks (paper §5.1's benchmark formats): multiple choice by log-likelihood, generation exact match,
code pass@k and perplexity, read from JSONL files (the kind from each file's fields or given), and the built-in
synthetic tasks (`builtin:passkey`, and the post-training tasks `builtin:addition|sorting|countdown`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from dsv3_jax.jsonl import read_objects

KINDS = ("multiple_choice", "generate", "code", "perplexity")
POSTTRAIN_TASKS = ("addition", "sorting", "countdown")


@dataclasses.dataclass(frozen=True)
class Task:
    """A named list of examples of one kind; `scorer(completion, example) -> float` overrides exact match for
    generation tasks (built-in tasks carry their own)."""

    name: str
    kind: str
    examples: tuple[dict, ...]
    scorer: Callable[[str, dict], float] | None = None


def infer_kind(row: dict) -> str:
    """The task kind a JSONL row's fields describe."""
    if "choices" in row or "choices_ids" in row:
        return "multiple_choice"
    if "tests" in row:
        return "code"
    if "prompt" in row and "answer" in row:
        return "generate"
    if "text" in row:
        return "perplexity"
    raise ValueError(f"cannot tell the task kind from the fields {sorted(row)}: expected context/choices/answer, "
                     "context_ids/choices_ids/answer, prompt/answer, prompt/tests or text")


def _need(row: dict, where: str, field: str, types) -> Any:
    if field not in row:
        raise ValueError(f"{where}: missing field {field!r}")
    value = row[field]
    if not isinstance(value, types) or isinstance(value, bool):
        raise ValueError(f"{where}: field {field!r} must be {types}, got {type(value).__name__}")
    return value


def _ids(value, where: str, field: str, allow_empty: bool = False) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"{where}: field {field!r} must be a list of token ids (integers)")
    if not value and not allow_empty:
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def _check_stop(row: dict, where: str) -> None:
    stop = row.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"{where}: field 'stop' must be a list of non-empty strings")


def validate_example(row: dict, kind: str, where: str) -> dict:
    """Check one example of `kind`; raises ValueError naming the field and the row."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if kind == "multiple_choice":
        if "choices_ids" in row:
            _ids(_need(row, where, "context_ids", list), where, "context_ids")
            choices = _need(row, where, "choices_ids", list)
            for j, c in enumerate(choices):
                _ids(c, where, f"choices_ids[{j}]")
        else:
            _need(row, where, "context", str)
            choices = _need(row, where, "choices", list)
            for j, c in enumerate(choices):
                if not isinstance(c, str) or not c:
                    raise ValueError(f"{where}: choices[{j}] must be a non-empty string")
        if len(choices) < 2:
            raise ValueError(f"{where}: a multiple-choice example needs at least 2 choices, got {len(choices)}")
        answer = _need(row, where, "answer", int)
        if not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer index {answer} out of range for {len(choices)} choices")
    elif kind == "generate":
        _need(row, where, "prompt", str)
        _need(row, where, "answer", str)
        _check_stop(row, where)
    elif kind == "code":
        _need(row, where, "prompt", str)
        _need(row, where, "tests", str)
        if "entry_point" in row:
            _need(row, where, "entry_point", str)
        _check_stop(row, where)
    elif kind == "perplexity":
        if not _need(row, where, "text", str):
            raise ValueError(f"{where}: field 'text' is empty")
    else:
        raise ValueError(f"unknown task kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return row


def load_jsonl_task(path: str, kind: str | None = None, limit: int | None = None) -> Task:
    """A task from a JSONL file (one example per line), its kind inferred from the first row unless given."""
    rows = []
    for where, row in read_objects(path, "task"):
        rows.append((where, row))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no examples")
    kind = infer_kind(rows[0][1]) if kind is None else kind
    examples = tuple(validate_example(row, kind, where) for where, row in rows)
    name = os.path.splitext(os.path.basename(path))[0]
    return Task(name, kind, examples)


def posttrain_task(name: str, n: int, seed: int) -> Task:
    """A built-in post-training task (dsv3_jax.posttrain.tasks) as a generation task scored by its own checker."""
    from dsv3_jax.posttrain import tasks as posttrain

    problems = posttrain.make_problems(name, n, seed)
    examples = tuple({"prompt": p.prompt, "answer": p.answer, "problem": p} for p in problems)
    return Task(f"builtin:{name}", "generate", examples,
                scorer=lambda completion, ex: float(posttrain.score(name, completion, ex["problem"])))
