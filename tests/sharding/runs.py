"""What the multi-device training tests share: the word corpus they train on and a run's metrics.jsonl."""

import json
import pathlib

import numpy as np

WORDS = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "print", "x", "y", "(", ")"]


def write_corpus(path) -> pathlib.Path:
    """3000 lines of 12 random code-like words (seed 0) at `path`."""
    rng = np.random.default_rng(0)
    path = pathlib.Path(path)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(3000)))
    return path


def metrics(workdir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
