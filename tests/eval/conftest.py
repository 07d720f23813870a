"""Shared fixtures of the evaluation tests: one tiny random model over the byte tokenizer with the chat role tokens
(258 + 3 ids; byte b is id b + 2), saved once in the released layout with its tokenizer.json."""

import pytest
from flax import nnx

import dsv3_jax
from dsv3_jax.posttrain.chat import chat_tokenizer
from dsv3_jax.train.tokenizer import ByteTokenizer


@pytest.fixture(scope="session")
def byte_model():
    tok = chat_tokenizer(ByteTokenizer())
    cfg = dsv3_jax.get_preset("tiny").replace(vocab_size=tok.vocab_size, num_mtp_layers=0,
                                              max_position_embeddings=256)
    return dsv3_jax.Transformer(cfg, nnx.Rngs(3)), tok


@pytest.fixture(scope="session")
def byte_checkpoint(byte_model, tmp_path_factory):
    model, tok = byte_model
    path = tmp_path_factory.mktemp("byte_ckpt")
    dsv3_jax.save_pretrained(model, str(path))
    tok.backend.save(str(path / "tokenizer.json"))
    return path
