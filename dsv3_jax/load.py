"""Load a model with its tokenizer from a `dsv3 train`/`dsv3 sft` work directory or a released-format checkpoint."""

from __future__ import annotations

import os

from dsv3_jax.train.tokenizer import Tokenizer


class HFTokenizer:
    """A released checkpoint's tokenizer.json through the tokenizers package (any special-token layout)."""

    def __init__(self, path: str, bos_id: int | None, eos_id: int | None):
        import tokenizers

        self.backend = tokenizers.Tokenizer.from_file(path)
        self.bos_id, self.eos_id = bos_id, eos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def load_model_and_tokenizer(path: str | os.PathLike, precision=None, tokenizer_required: bool = True):
    """(model, tokenizer) from a work directory (newest checkpoint) or a checkpoint dir with tokenizer.json; with
    tokenizer_required=False a checkpoint without one loads with tokenizer None (token-id tasks only)."""
    from dsv3_jax.hf import from_pretrained
    from dsv3_jax.train.loop import load_workdir

    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        model, tokenizer = load_workdir(path)
        if tokenizer is None and tokenizer_required:
            raise ValueError(f"{path}: the run trained on pre-tokenized data and has no tokenizer")
        return model, tokenizer
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_path) and not tokenizer_required:
        return from_pretrained(path, precision=precision), None
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"{path}: no tokenizer.json beside the checkpoint (and no checkpoints/ of a "
                                "training work directory)")
    model = from_pretrained(path, precision=precision)
    try:  # our own layout (<|bos|> = 0, <|eos|> = 1) gets the full Tokenizer (chat template, special tokens)
        tokenizer = Tokenizer.load(tok_path)
    except ValueError:
        tokenizer = HFTokenizer(tok_path, model.config.bos_token_id, model.config.eos_token_id)
    return model, tokenizer
