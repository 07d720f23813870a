"""A two-domain training corpus for the balancing and expert-specialisation experiments (paper §2.1.2, §4.5.3,
Fig. 9): Python code (the interpreter's standard-library source, `default_corpus_files`) and English prose (the
Python documentation texts in `pydoc_data.topics`, with their indented code examples and grammar blocks removed).

Written into a directory as
- ``code_train.jsonl``: the training stdlib files, each cut between top-level definitions into documents of at least
  ``CODE_CHUNK_CHARS`` characters (so that the run's held-out split, drawn by whole documents, holds code and prose
  in about the training proportions);
- ``prose_train.jsonl``: one document per prose paragraph of the training topics (goes into training);
- ``prose_eval.jsonl``: the paragraphs of every ``EVAL_TOPIC_EVERY``-th topic (sorted by name), once each; a paragraph
  that recurs in a training topic is left out of training;
- ``code_eval.jsonl``: whole standard-library files that follow the training files in path order (those that fit
  the byte budget), never trained on.
The training inputs are ``code_train.jsonl`` and ``prose_train.jsonl``; both evaluation files are disjoint from them.
"""

from __future__ import annotations

import json
import pathlib

from dsv3_jax.train.inputs import default_corpus_files

EVAL_TOPIC_EVERY = 5  # every 5th documentation topic is held out for evaluation
CODE_CHUNK_CHARS = 2000  # training code documents: pieces of stdlib files of at least this many characters
CODE_EVAL_SEARCH_BYTES = 4_000_000  # held-out code: files that fit the budget among this many bytes after training's


def prose_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of one documentation topic: blank-line separated blocks whose lines are not indented
    (indented blocks are code examples and grammar rules) and which hold at least one sentence-like line."""
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(line[0].isspace() for line in lines):
            continue
        if set(lines[-1].strip()) <= set("*=-"):  # a heading underline
            continue
        para = " ".join(line.strip() for line in lines)
        if len(para) >= 40:
            out.append(para)
    return out


def code_chunks(text: str, min_chars: int = CODE_CHUNK_CHARS) -> list[str]:
    """A source file cut at its top-level blank-line pairs (between definitions) into pieces of at least
    `min_chars` characters (the last may be shorter); joined back they give the file."""
    out, cur = [], ""
    for part in text.split("\n\n\n"):
        cur = part if not cur else cur + "\n\n\n" + part
        if len(cur) >= min_chars:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


def _write_jsonl(path: pathlib.Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def write_corpus(directory: str | pathlib.Path, code_bytes: int, code_eval_bytes: int) -> dict:
    """Write the two-domain corpus into `directory`; return {"train": [paths], "eval": {"code": path, "prose": path},
    "stats": {...}} with ``code_bytes`` of stdlib source for training and ``code_eval_bytes`` held out."""
    from pydoc_data.topics import topics

    if code_bytes <= 0 or code_eval_bytes <= 0:
        raise ValueError(f"code_bytes and code_eval_bytes must be positive, got {code_bytes}, {code_eval_bytes}")
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(topics)
    eval_names = names[EVAL_TOPIC_EVERY // 2::EVAL_TOPIC_EVERY]
    seen: set[str] = set()  # many paragraphs recur in several topics: each is evaluated once and never trained on
    eval_prose = [p for n in eval_names for p in prose_paragraphs(topics[n]) if not (p in seen or seen.add(p))]
    train_prose = [p for n in names if n not in eval_names for p in prose_paragraphs(topics[n]) if p not in seen]
    code_train = default_corpus_files(code_bytes)
    code_eval, room = [], code_eval_bytes
    for path in default_corpus_files(code_bytes + CODE_EVAL_SEARCH_BYTES)[len(code_train):]:
        if path.stat().st_size <= room:
            code_eval.append(path)
            room -= path.stat().st_size
    if not code_eval:
        raise ValueError(f"no standard-library files beyond the first {code_bytes} bytes for the code evaluation set")
    paths = {"code_train": d / "code_train.jsonl", "prose_train": d / "prose_train.jsonl",
             "prose_eval": d / "prose_eval.jsonl", "code_eval": d / "code_eval.jsonl"}
    train_code = [c for p in code_train for c in code_chunks(p.read_text(encoding="utf-8"))]
    _write_jsonl(paths["code_train"], train_code)
    _write_jsonl(paths["prose_train"], train_prose)
    _write_jsonl(paths["prose_eval"], eval_prose)
    _write_jsonl(paths["code_eval"], [p.read_text(encoding="utf-8") for p in code_eval])
    stats = {"code_train_files": len(code_train), "code_train_bytes": sum(p.stat().st_size for p in code_train),
             "code_train_chunks": len(train_code),
             "code_eval_files": len(code_eval), "code_eval_bytes": sum(p.stat().st_size for p in code_eval),
             "prose_train_paragraphs": len(train_prose), "prose_train_chars": sum(map(len, train_prose)),
             "prose_eval_topics": eval_names, "prose_eval_paragraphs": len(eval_prose),
             "prose_eval_chars": sum(map(len, eval_prose))}
    return {"train": [str(paths["code_train"]), str(paths["prose_train"])],
            "eval": {"code": str(paths["code_eval"]), "prose": str(paths["prose_eval"])}, "stats": stats}
