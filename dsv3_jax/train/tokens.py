"""The token stream: documents tokenized once, each followed by EOS, packed back to back (paper §4.1; reference §7)
and cached as a memory-mapped file keyed by the inputs, tokenizer and settings. With a ``fim_rate`` (the paper: 0.1)
documents become Prefix-Suffix-Middle fill-in-the-middle examples. A held-out fraction of whole documents (chosen by
a hash of each document's opening text, so independent of the run's seed and settings) can be split off into a
separate stream for validation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from dsv3_jax.train.inputs import (BIN_DTYPES, TEXT_KINDS, TOKEN_KINDS, DataInput, atomic_write_text, cache_digest,
                                   documents, input_fingerprint, open_tokens, resolve_inputs)
from dsv3_jax.train.tokenizer import FIM_TOKENS, Tokenizer

_ENCODE_BATCH_CHARS = 4 << 20  # characters handed to one parallel encode_batch call
_COPY_CHUNK_TOKENS = 1 << 22  # pre-tokenized inputs are copied into the cache in chunks of this many tokens
_CACHE_FORMAT = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _read_sidecar(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_vocab(tokenizer: Tokenizer | None, vocab_size: int, needs_tokenizer: bool) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if not needs_tokenizer:
        return
    if tokenizer is None:
        raise ValueError("text or .jsonl data needs a tokenizer, got tokenizer=None")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's vocab_size {vocab_size}")


def fim_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """Ids of <|fim_begin|>, <|fim_hole|>, <|fim_end|>, or ValueError when the tokenizer lacks them."""
    ids = tuple(tokenizer.token_id(t) for t in FIM_TOKENS)
    if None in ids:
        raise ValueError(f"fill-in-the-middle needs the special tokens {', '.join(FIM_TOKENS)}, which this tokenizer "
                         "lacks (a tokenizer trained before they were reserved); pass fim_rate=0 (--fim-rate 0)")
    return ids  # type: ignore[return-value]


def fim_document(text: str, tokenizer: Tokenizer, rng: np.random.Generator) -> list[int]:
    """Prefix-Suffix-Middle (paper §4.1): <|fim_begin|> pre <|fim_hole|> suf <|fim_end|> middle, cut at two
    uniformly drawn character positions; the caller appends EOS."""
    begin, hole, end = fim_ids(tokenizer)
    i, j = sorted(int(c) for c in rng.integers(0, len(text) + 1, size=2))
    pre, middle, suf = tokenizer.encode_batch([text[:i], text[i:j], text[j:]])
    return [begin] + pre + [hole] + suf + [end] + middle


SPLITS = ("train", "heldout")


def is_heldout(first_piece: str, fraction: float) -> bool:
    """Whether a text document whose first non-empty piece is ``first_piece`` belongs to the held-out split: a
    64-bit BLAKE2b hash of that text, as a fraction of 2^64, below ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(first_piece.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h / 2.0 ** 64 < fraction


def heldout_token_count(n: int, fraction: float) -> int:
    """Tokens of a pre-tokenized input of ``n`` tokens that go to the held-out split: its last floor(n * fraction)."""
    return int(n * fraction)


def _split_tokens(tokens: np.ndarray, fraction: float, split: str) -> np.ndarray:
    h = heldout_token_count(int(tokens.size), fraction)
    return tokens[tokens.size - h:] if split == "heldout" else tokens[:tokens.size - h]


def prepare_tokens(inputs: Iterable[str | os.PathLike | DataInput], tokenizer: Tokenizer | None,
                   cache_dir: str | os.PathLike, vocab_size: int, *, text_key: str = "text",
                   bin_dtype: str = "uint16", fim_rate: float = 0.0, fim_seed: int = 0,
                   heldout_fraction: float = 0.0, split: str = "train") -> np.ndarray:
    """The token stream of ``inputs`` as a read-only 1-D uint16/uint32 memmap, cached in ``cache_dir``.

    With ``fim_rate`` > 0 each text document is, with that probability, rewritten as a fill-in-the-middle example
    (``fim_document``; draws seeded by ``fim_seed`` and the input's index); pre-tokenized inputs stay as they are.
    With ``heldout_fraction`` > 0 the stream holds only the documents of ``split``: "heldout" the text documents
    for which ``is_heldout`` holds and the last ``heldout_token_count`` tokens of each pre-tokenized input,
    "train" the rest (the two streams are disjoint). ValueError when the chosen split is empty."""
    resolved = resolve_inputs(inputs, text_key=text_key, bin_dtype=bin_dtype)
    has_text = any(inp.kind in TEXT_KINDS for inp in resolved)
    _check_vocab(tokenizer, vocab_size, has_text)
    if not 0.0 <= fim_rate <= 1.0:
        raise ValueError(f"fim_rate must be in [0, 1], got {fim_rate!r}")
    if fim_rate > 0 and has_text:
        fim_ids(tokenizer)
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "heldout" and heldout_fraction == 0:
        raise ValueError("split='heldout' needs heldout_fraction > 0")
    token_inputs = {i: open_tokens(inp, vocab_size) for i, inp in enumerate(resolved) if inp.kind in TOKEN_KINDS}
    if len(resolved) == 1 and 0 in token_inputs and token_inputs[0].dtype.name in BIN_DTYPES:
        # one pre-tokenized file: used in place
        out = _split_tokens(token_inputs[0], heldout_fraction, split)
        if out.size == 0:
            raise ValueError(f"the {split} split of {resolved[0].path} holds no tokens (heldout_fraction "
                             f"{heldout_fraction:g} of {token_inputs[0].size} tokens)")
        return out
    select = None
    if heldout_fraction > 0:
        want = split == "heldout"

        def select(first_piece: str) -> bool:
            return is_heldout(first_piece, heldout_fraction) == want

    dtype = token_dtype(vocab_size)
    key = {"format": _CACHE_FORMAT, "dtype": dtype.name, "vocab_size": vocab_size,
           "inputs": [input_fingerprint(inp) for inp in resolved],
           "tokenizer": hashlib.sha256(tokenizer.to_json().encode()).hexdigest() if has_text else None,
           "fim": [fim_rate, fim_seed] if fim_rate > 0 and has_text else None}
    if heldout_fraction > 0:
        key["split"] = [split, heldout_fraction]
    digest = cache_digest(key)
    cache_dir = pathlib.Path(cache_dir)
    bin_path, meta_path = cache_dir / f"tokens-{digest}.bin", cache_dir / f"tokens-{digest}.json"
    meta = _read_sidecar(meta_path)
    if (meta is not None and meta.get("hash") == digest and meta.get("dtype") == dtype.name
            and isinstance(meta.get("count"), int) and meta["count"] > 0 and bin_path.is_file()
            and bin_path.stat().st_size == meta["count"] * dtype.itemsize):
        return np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["count"],))

    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".tokens-{digest}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            count = 0
            for i, inp in enumerate(resolved):
                if i in token_inputs:
                    n = _copy_tokens(_split_tokens(token_inputs[i], heldout_fraction, split), dtype, f)
                else:
                    n = _write_documents(inp, tokenizer, dtype, f, fim_rate, np.random.default_rng([fim_seed, i]),
                                         select)
                    if n == 0 and select is None:
                        raise ValueError(f"data file {inp.path} holds no text (no tokens)")
                count += n
            if count == 0:
                raise ValueError(f"the {split} split (heldout_fraction {heldout_fraction:g}) of the data holds no "
                                 f"documents: {', '.join(str(inp.path) for inp in resolved)}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, bin_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    meta = {"format": _CACHE_FORMAT, "hash": digest, "dtype": dtype.name, "count": count,
            "vocab_size": vocab_size, "inputs": [str(inp.path) for inp in resolved]}
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(count,))


def _copy_tokens(tokens: np.ndarray, dtype: np.dtype, f) -> int:
    for start in range(0, tokens.size, _COPY_CHUNK_TOKENS):
        np.asarray(tokens[start:start + _COPY_CHUNK_TOKENS]).astype(dtype.newbyteorder("<")).tofile(f)
    return int(tokens.size)


def _write_documents(inp: DataInput, tokenizer: Tokenizer, dtype: np.dtype, f, fim_rate: float = 0.0,
                     rng: np.random.Generator | None = None, select=None) -> int:
    """Tokenize each document of ``inp`` (a fraction ``fim_rate`` of them as FIM examples, drawn from ``rng``;
    only those whose first non-empty piece passes ``select`` when given), append EOS after each, write; return the
    token count."""
    out_dtype = dtype.newbyteorder("<")
    count = 0
    batch: list[str] = []
    ends: list[bool] = []  # ends[j]: batch[j] is a document's last piece, so EOS follows it
    chars = 0

    def flush() -> int:
        pieces = tokenizer.encode_batch(batch)
        arrays = []
        for ids, end in zip(pieces, ends):
            arrays.append(np.asarray(ids, dtype=out_dtype))
            if end:
                arrays.append(np.asarray([tokenizer.eos_id], dtype=out_dtype))
        flat = np.concatenate(arrays) if arrays else np.zeros(0, out_dtype)
        flat.tofile(f)
        batch.clear()
        ends.clear()
        return int(flat.size)

    for doc in documents(inp):
        if select is not None:
            first = next((piece for piece in doc if piece), None)
            if first is None or not select(first):
                continue
            doc = itertools.chain((first,), doc)
        if fim_rate > 0 and rng.random() < fim_rate:
            count += flush()
            chars = 0
            ids = fim_document("".join(doc), tokenizer, rng) + [tokenizer.eos_id]
            np.asarray(ids, dtype=out_dtype).tofile(f)
            count += len(ids)
            continue
        previous = None  # one piece of look-ahead tells which piece ends the document
        for piece in doc:
            if not piece:
                continue
            if previous is not None:
                batch.append(previous)
                ends.append(False)
                chars += len(previous)
            previous = piece
            if chars >= _ENCODE_BATCH_CHARS:
                count += flush()
                chars = 0
        if previous is not None:
            batch.append(previous)
            ends.append(True)
            chars += len(previous)
    if batch:
        count += flush()
    return count
