"""JSON Lines inputs (chat data, prompts, problems, evaluation tasks): one object per line, blank lines skipped,
every error naming file:line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator


def read_objects(path: str | os.PathLike, what: str) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of the JSONL file `path` (a `what` file, for the errors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row
