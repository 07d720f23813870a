"""Byte-level BPE tokenizer (``tokenizers``) with the special tokens every trained vocabulary reserves: BOS/EOS,
the chat roles and the fill-in-the-middle sentinels (paper §4.1); a 258-id byte tokenizer; BPE training cached
per corpus.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3_jax.train.inputs import (TEXT_KINDS, DataInput, atomic_write_text, cache_digest, documents,
                                   input_fingerprint, read_text_chunks, resolve_inputs)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
# Chat roles (posttrain.chat) and fill-in-the-middle sentinels (paper §4.1), reserved by every trained BPE so that a
# pretrained model already has their embeddings; ids 0 and 1 match ModelConfig.bos_token_id / eos_token_id.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
FIM_TOKENS = ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN) + CHAT_TOKENS + FIM_TOKENS
MIN_BPE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
_CACHE_FORMAT = 1


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
        atomic_write_text(pathlib.Path(path), self.to_json())

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
            yield from read_text_chunks(path)
        else:
            raise ValueError(f"Tokenizer.train takes texts (str) or files (os.PathLike), got {type(item).__name__}")


def train_or_load_tokenizer(inputs: Iterable[str | os.PathLike | DataInput], vocab_size: int,
                            cache_dir: str | os.PathLike, *, text_key: str = "text") -> Tokenizer:
    """Byte-level BPE trained on the text/JSONL ``inputs``, cached as ``cache_dir/tokenizer-<hash>.json``."""
    resolved = [inp for inp in resolve_inputs(inputs, text_key=text_key) if inp.kind in TEXT_KINDS]
    if not resolved:
        raise ValueError("tokenizer training needs text or .jsonl inputs; pre-tokenized .bin/.npy inputs have none")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_BPE_VOCAB_SIZE} (256 byte tokens + "
                         f"{len(SPECIAL_TOKENS)} special tokens) for byte-level BPE, got {vocab_size!r}")
    digest = cache_digest({"format": _CACHE_FORMAT, "vocab_size": vocab_size, "special_tokens": SPECIAL_TOKENS,
                   "inputs": [input_fingerprint(inp) for inp in resolved]})
    path = pathlib.Path(cache_dir) / f"tokenizer-{digest}.json"
    if path.is_file():
        return Tokenizer.load(path)

    def texts() -> Iterator[str]:
        for inp in resolved:
            for doc in documents(inp):
                yield from doc

    tok = _train_bpe(texts(), vocab_size)
    tok.save(path)
    return tok
