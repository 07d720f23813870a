"""Training data: a byte-level BPE tokenizer, the embedded default corpus, ``--data`` inputs and packed batches.

Documents are tokenized once, each followed by EOS, and packed back to back into one token stream that is cut
into non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets). As in the paper's document
packing (paper §4.1; reference §7) there is no cross-document attention mask; with a ``fim_rate`` (the paper: 0.1)
documents become Prefix-Suffix-Middle fill-in-the-middle examples. A held-out fraction of whole documents (chosen by
a hash of each document's opening text, so independent of the run's seed and settings) can be split off into a
separate stream for validation. Window order is a
per-epoch permutation seeded by ``(seed, epoch)``, so the count of sequences consumed is the whole data-loader
state and a resumed run sees bit-identical batches.

The default corpus is the standard library source shipped with the running interpreter: it exists on every
machine, is real text (code and docstrings) and needs no download.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import pathlib
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
# Chat roles (posttrain.chat) and fill-in-the-middle sentinels (paper §4.1), reserved by every trained BPE so that a
# pretrained model already has their embeddings; ids 0 and 1 match ModelConfig.bos_token_id / eos_token_id.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
FIM_TOKENS = ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN) + CHAT_TOKENS + FIM_TOKENS
MIN_BPE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
TEXT_KINDS = ("text", "jsonl")
TOKEN_KINDS = ("bin", "npy")
BIN_DTYPES = ("uint16", "uint32")
NPY_DTYPES = ("uint16", "uint32", "int32")

_READ_CHUNK_BYTES = 1 << 20  # text is read and tokenized in ~1 MB pieces cut at newlines
_ENCODE_BATCH_CHARS = 4 << 20  # characters handed to one parallel encode_batch call
_CHECK_CHUNK_TOKENS = 1 << 22  # pre-tokenized files are scanned in chunks of this many tokens
_CACHE_FORMAT = 1
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _byte_level(tok: tokenizers.Tokenizer, use_regex: bool = True) -> tokenizers.Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """Byte-level BPE tokenizer (a ``tokenizers.Tokenizer``) with ``<|bos|>`` = 0 and ``<|eos|>`` = 1."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        added = tokenizer.get_added_tokens_decoder()
        for token_id, name in ((0, "bos"), (1, "eos")):
            if token_id not in added or not added[token_id].special:
                raise ValueError(f"tokenizer has no special {name} token at id {token_id} (expected "
                                 f"{SPECIAL_TOKENS[token_id]!r}, as ModelConfig.{name}_token_id = {token_id})")
        # Text that happens to contain "<|eos|>" is encoded as ordinary bytes, never as the special id.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0 .. vocab_size - 1)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        """Id of ``<|bos|>``."""
        return 0

    @property
    def eos_id(self) -> int:
        """Id of ``<|eos|>``."""
        return 1

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; adds no BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts, in parallel."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens decode to their names; invalid UTF-8 decodes to U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        """Id of the special token ``token``, or None when the tokenizer does not have it."""
        return self._tok.token_to_id(token)

    def with_special_tokens(self, tokens: Sequence[str]) -> "Tokenizer":
        """A copy with the special tokens it lacks appended (new ids at the end of the vocabulary)."""
        missing = [t for t in tokens if self.token_id(t) is None]
        tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        return Tokenizer(tok)

    def to_json(self) -> str:
        """The ``tokenizer.json`` text."""
        return self._tok.to_str()

    @classmethod
    def from_json(cls, s: str) -> "Tokenizer":
        """Parse ``tokenizer.json`` text; a byte tokenizer's JSON gives a ``ByteTokenizer``."""
        try:
            tok = tokenizers.Tokenizer.from_str(s)
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise ValueError(f"not a valid tokenizer.json: {e}") from None
        return ByteTokenizer() if _is_byte_tokenizer(tok) else Tokenizer(tok)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (readable by ``tokenizers.Tokenizer.from_file``), atomically."""
        _atomic_write_text(pathlib.Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a ``tokenizer.json`` file."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def train(cls, files_or_texts: Iterable[str | os.PathLike], vocab_size: int) -> "Tokenizer":
        """Train byte-level BPE; ``os.PathLike`` items are UTF-8 files, ``str`` items are texts; deterministic."""
        return _train_bpe(_texts_of(files_or_texts), vocab_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """No BPE: ids 0/1 are ``<|bos|>``/``<|eos|>`` and byte b is id b + 2 (vocab_size 258)."""

    def __init__(self):
        chars = _bytes_to_unicode()
        vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1} | {chars[b]: b + 2 for b in range(256)}
        tok = _byte_level(tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[])), use_regex=False)
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[:2]])
        super().__init__(tok)

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` shifted by 2."""
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) + 2).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes of ``ids`` as UTF-8 (U+FFFD for invalid sequences); special tokens decode to their names."""
        parts, run = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < 258:
                raise ValueError(f"ByteTokenizer id {i} is outside the vocabulary [0, 258)")
            if i >= 2:
                run.append(i - 2)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            parts.append((BOS_TOKEN, EOS_TOKEN)[i])
            run = bytearray()
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


def _is_byte_tokenizer(tok: tokenizers.Tokenizer) -> bool:
    if tok.get_vocab_size(with_added_tokens=True) != 258:
        return False
    data = json.loads(tok.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("merges"):
        return False
    chars = _bytes_to_unicode()
    expected = {BOS_TOKEN: 0, EOS_TOKEN: 1} | {chars[b]: b + 2 for b in range(256)}
    return model.get("vocab") == expected


def _train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_BPE_VOCAB_SIZE} (256 byte tokens + "
                         f"{len(SPECIAL_TOKENS)} special tokens) for byte-level BPE, got {vocab_size!r}")
    tok = _byte_level(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok)


def _texts_of(files_or_texts: Iterable[str | os.PathLike]) -> Iterator[str]:
    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [files_or_texts]
    for item in files_or_texts:
        if isinstance(item, str):
            yield item
        elif isinstance(item, os.PathLike):
            path = pathlib.Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer training file not found: {path}")
            yield from _read_text_chunks(path)
        else:
            raise ValueError(f"Tokenizer.train takes texts (str) or files (os.PathLike), got {type(item).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# The default corpus
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Data inputs
# ----------------------------------------------------------------------------------------------------------------


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


def _read_text_chunks(path: pathlib.Path) -> Iterator[str]:
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


def _documents(inp: DataInput) -> Iterator[Iterator[str]]:
    """Each document of a text input as an iterator of text pieces (a text file is one document)."""
    if inp.path.stat().st_size == 0:
        raise ValueError(f"data file {inp.path} is empty")
    if inp.kind == "text":
        yield _read_text_chunks(inp.path)
    else:
        for text in _jsonl_documents(inp):
            yield iter((text,))


def _open_tokens(inp: DataInput, vocab_size: int) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------------------------
# Token cache
# ----------------------------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _input_fingerprint(inp: DataInput) -> dict[str, Any]:
    st = inp.path.stat()
    fp = {"path": str(inp.path.resolve()), "kind": inp.kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if inp.kind == "jsonl":
        fp["text_key"] = inp.text_key
    if inp.kind == "bin":
        fp["dtype"] = inp.dtype
    return fp


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
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
    token_inputs = {i: _open_tokens(inp, vocab_size) for i, inp in enumerate(resolved) if inp.kind in TOKEN_KINDS}
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
           "inputs": [_input_fingerprint(inp) for inp in resolved],
           "tokenizer": hashlib.sha256(tokenizer.to_json().encode()).hexdigest() if has_text else None,
           "fim": [fim_rate, fim_seed] if fim_rate > 0 and has_text else None}
    if heldout_fraction > 0:
        key["split"] = [split, heldout_fraction]
    digest = _sha(key)
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
    _atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(count,))


def _copy_tokens(tokens: np.ndarray, dtype: np.dtype, f) -> int:
    for start in range(0, tokens.size, _CHECK_CHUNK_TOKENS):
        np.asarray(tokens[start:start + _CHECK_CHUNK_TOKENS]).astype(dtype.newbyteorder("<")).tofile(f)
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

    for doc in _documents(inp):
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


def train_or_load_tokenizer(inputs: Iterable[str | os.PathLike | DataInput], vocab_size: int,
                            cache_dir: str | os.PathLike, *, text_key: str = "text") -> Tokenizer:
    """Byte-level BPE trained on the text/JSONL ``inputs``, cached as ``cache_dir/tokenizer-<hash>.json``."""
    resolved = [inp for inp in resolve_inputs(inputs, text_key=text_key) if inp.kind in TEXT_KINDS]
    if not resolved:
        raise ValueError("tokenizer training needs text or .jsonl inputs; pre-tokenized .bin/.npy inputs have none")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_BPE_VOCAB_SIZE} (256 byte tokens + "
                         f"{len(SPECIAL_TOKENS)} special tokens) for byte-level BPE, got {vocab_size!r}")
    digest = _sha({"format": _CACHE_FORMAT, "vocab_size": vocab_size, "special_tokens": SPECIAL_TOKENS,
                   "inputs": [_input_fingerprint(inp) for inp in resolved]})
    path = pathlib.Path(cache_dir) / f"tokenizer-{digest}.json"
    if path.is_file():
        return Tokenizer.load(path)

    def texts() -> Iterator[str]:
        for inp in resolved:
            for doc in _documents(inp):
                yield from doc

    tok = _train_bpe(texts(), vocab_size)
    tok.save(path)
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Packed batches
# ----------------------------------------------------------------------------------------------------------------


def check_seq_len(seq_len: int, cfg) -> None:
    """ValueError unless 1 <= seq_len <= cfg.max_position_embeddings (the model sees seq_len positions; the
    extra window token is only a target)."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds ModelConfig.max_position_embeddings "
                         f"{cfg.max_position_embeddings}")


class PackedBatches:
    """Non-overlapping windows of seq_len + 1 tokens, visited in a per-epoch permutation seeded by (seed, epoch)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if getattr(tokens, "ndim", None) != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {getattr(tokens, 'shape', None)}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.window = seq_len + 1
        self.num_sequences = int(tokens.shape[0]) // self.window
        if self.num_sequences == 0:
            raise ValueError(f"the corpus has {tokens.shape[0]} tokens; one sequence of seq_len={seq_len} needs "
                             f"{self.window} (inputs plus the shifted target)")
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch ``epoch`` visits them."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_sequences)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def sequence(self, index: int) -> np.ndarray:
        """Window ``index`` (in stream order) as int32 [seq_len + 1]."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"window index {index} outside [0, {self.num_sequences})")
        start = index * self.window
        return np.asarray(self.tokens[start:start + self.window], dtype=np.int32)

    def batch(self, position: int, batch_size: int) -> tuple[np.ndarray, int]:
        """The ``batch_size`` windows after ``position`` sequences consumed, as int32 [B, seq_len + 1], and the
        new position."""
        if not _is_int(position) or position < 0:
            raise ValueError(f"position must be a non-negative integer, got {position!r}")
        if not _is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        position, batch_size = int(position), int(batch_size)
        steps = np.arange(position, position + batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(steps, self.num_sequences)
        index_B = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            index_B[sel] = self.permutation(int(epoch))[offsets[sel]]
        gather_BW = index_B[:, None] * self.window + np.arange(self.window, dtype=np.int64)
        return np.asarray(self.tokens[gather_BW], dtype=np.int32), position + batch_size
