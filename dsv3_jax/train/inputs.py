"""``--data`` inputs (paper §4.1's pretraining corpus, here any text): the default corpus, resolved input files
and their readers (text, JSONL, pre-tokenized .bin/.npy), and the file helpers the tokenizer and token caches share.

The default corpus is the standard library source shipped with the running interpreter: it exists on every
machine, is real text (code and docstrings) and needs no download.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

TEXT_KINDS = ("text", "jsonl")
TOKEN_KINDS = ("bin", "npy")
BIN_DTYPES = ("uint16", "uint32")
NPY_DTYPES = ("uint16", "uint32", "int32")

_READ_CHUNK_BYTES = 1 << 20  # text is read and tokenized in ~1 MB pieces cut at newlines
_CHECK_CHUNK_TOKENS = 1 << 22  # pre-tokenized files are scanned in chunks of this many tokens
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def default_corpus_files(max_bytes: int = 8_000_000) -> list[pathlib.Path]:
    """The interpreter's standard-library .py files (no tests, site-packages or non-UTF-8), sorted by path,
    up to ``max_bytes`` in total."""
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        # config-* holds build-machine specific files; so does _sysconfigdata*.py.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(("test_", "_sysconfigdata")):
                path = pathlib.Path(dirpath, name)
                candidates.append((path.relative_to(root).as_posix(), path))
    candidates.sort()
    chosen, total = [], 0
    for _, path in candidates:
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not data:
            continue
        if total + len(data) > max_bytes:
            break
        chosen.append(path)
        total += len(data)
    if not chosen:
        raise FileNotFoundError(f"no UTF-8 standard-library .py files of at most max_bytes={max_bytes} bytes found "
                                f"under {root} (is the interpreter's source installed?); pass --data instead")
    return chosen


@dataclasses.dataclass(frozen=True)
class DataInput:
    """One resolved input file: ``kind`` is "text", "jsonl", "bin" or "npy"."""

    path: pathlib.Path
    kind: str
    text_key: str = "text"  # jsonl: the field holding a document's text
    dtype: str = "uint16"  # bin: the little-endian token dtype

    def __post_init__(self):
        if self.kind not in TEXT_KINDS + TOKEN_KINDS:
            raise ValueError(f"DataInput.kind must be one of {TEXT_KINDS + TOKEN_KINDS}, got {self.kind!r}")
        if self.kind == "bin" and self.dtype not in BIN_DTYPES:
            raise ValueError(f"dtype for .bin token files must be one of {BIN_DTYPES}, got {self.dtype!r}")


def _kind_of(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".bin": "bin", ".npy": "npy"}.get(suffix, "text")


def resolve_inputs(specs: Iterable[str | os.PathLike | DataInput], *, text_key: str = "text",
                   bin_dtype: str = "uint16") -> list[DataInput]:
    """Expand ``--data`` paths and globs into files, typed by suffix (.jsonl, .bin, .npy, else text)."""
    if bin_dtype not in BIN_DTYPES:
        raise ValueError(f"bin_dtype must be one of {BIN_DTYPES}, got {bin_dtype!r}")
    if not isinstance(text_key, str) or not text_key:
        raise ValueError(f"text_key must be a non-empty string, got {text_key!r}")
    if isinstance(specs, (str, os.PathLike, DataInput)):
        specs = [specs]
    out = []
    for spec in specs:
        if isinstance(spec, DataInput):
            out.append(spec)
            continue
        s = os.fspath(spec)
        if os.path.exists(s):
            paths = [pathlib.Path(s)]
        elif glob.has_magic(s):
            paths = [pathlib.Path(p) for p in sorted(glob.glob(s, recursive=True)) if os.path.isfile(p)]
            if not paths:
                raise FileNotFoundError(f"data glob {s!r} matches no files")
        else:
            raise FileNotFoundError(f"data file not found: {s}")
        for path in paths:
            if path.is_dir():
                raise ValueError(f"data path {path} is a directory; pass its files or a glob such as {path}/*.txt")
            out.append(DataInput(path, _kind_of(path), text_key=text_key, dtype=bin_dtype))
    if not out:
        raise ValueError("no data inputs given")
    return out


def read_text_chunks(path: pathlib.Path) -> Iterator[str]:
    """UTF-8 text of ``path`` in ~1 MB pieces cut after a newline; ValueError naming the file if not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pending, offset = "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(_READ_CHUNK_BYTES)
            try:
                text = pending + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text (invalid byte near offset {offset + e.start}): "
                                 f"{e.reason}") from None
            offset += len(raw)
            if not raw:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut == 0 and len(text) < 16 * _READ_CHUNK_BYTES:
                pending = text  # no newline yet: keep reading (a 16M-character line is cut anyway)
                continue
            if cut == 0:
                cut = len(text)
            yield text[:cut]
            pending = text[cut:]


def _jsonl_documents(inp: DataInput) -> Iterator[str]:
    """The ``text_key`` field of each JSONL line; blank lines are skipped."""
    with open(inp.path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{inp.path}:{lineno} is not UTF-8: {e.reason}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{inp.path}:{lineno} is not valid JSON: {e.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{inp.path}:{lineno} must be a JSON object, got {type(record).__name__}")
            if inp.text_key not in record:
                raise ValueError(f"{inp.path}:{lineno} has no {inp.text_key!r} field "
                                 f"(fields: {sorted(record)[:10]}); set the text key")
            text = record[inp.text_key]
            if not isinstance(text, str):
                raise ValueError(f"{inp.path}:{lineno} field {inp.text_key!r} must be a string, "
                                 f"got {type(text).__name__}")
            yield text


def documents(inp: DataInput) -> Iterator[Iterator[str]]:
    """Each document of a text input as an iterator of text pieces (a text file is one document)."""
    if inp.path.stat().st_size == 0:
        raise ValueError(f"data file {inp.path} is empty")
    if inp.kind == "text":
        yield read_text_chunks(inp.path)
    else:
        for text in _jsonl_documents(inp):
            yield iter((text,))


def open_tokens(inp: DataInput, vocab_size: int) -> np.ndarray:
    """Memory-map a pre-tokenized file and check, chunk by chunk, that its ids lie in [0, vocab_size)."""
    path = inp.path
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"token file {path} is empty")
    if inp.kind == "bin":
        dtype = np.dtype(inp.dtype).newbyteorder("<")
        if size % dtype.itemsize:
            raise ValueError(f"token file {path} has {size} bytes, not a multiple of {dtype.itemsize} "
                             f"({inp.dtype}); is its dtype right?")
        tokens = np.memmap(path, dtype=dtype, mode="r")
    else:
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path} is not a readable .npy array: {e}") from None
        if tokens.ndim != 1:
            raise ValueError(f"token file {path} must hold a 1-D array, got shape {tokens.shape}")
        if tokens.dtype.name not in NPY_DTYPES or tokens.dtype.byteorder == ">":
            raise ValueError(f"token file {path} has dtype {tokens.dtype.str}; expected one of {NPY_DTYPES}")
    if tokens.size == 0:
        raise ValueError(f"token file {path} holds no tokens")
    for start in range(0, tokens.size, _CHECK_CHUNK_TOKENS):
        chunk = tokens[start:start + _CHECK_CHUNK_TOKENS]
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0:
            raise ValueError(f"token file {path} holds a negative token id {lo}")
        if hi >= vocab_size:
            raise ValueError(f"token file {path} holds token id {hi} (max in tokens {start}.."
                             f"{start + chunk.size - 1}) >= the model's vocab_size {vocab_size}")
    return tokens


def cache_digest(data: Any) -> str:
    """16 hex digits of the SHA-256 of ``data`` as sorted JSON: the name of a cache entry."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def input_fingerprint(inp: DataInput) -> dict[str, Any]:
    """What a cache entry built from ``inp`` depends on: resolved path, kind, size, mtime and reading options."""
    st = inp.path.stat()
    fp = {"path": str(inp.path.resolve()), "kind": inp.kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if inp.kind == "jsonl":
        fp["text_key"] = inp.text_key
    if inp.kind == "bin":
        fp["dtype"] = inp.dtype
    return fp


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
