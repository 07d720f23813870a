"""Shared fixtures of the evaluation tests: one tiny random model over the byte tokenizer (258 ids), saved once in
the released layout with its tokenizer.json."""

import pytest
from flax import nnx

import dsv3_jax
from dsv3_jax.train.data import ByteTokenizer


@pytest.fixture(scope="session")
def byte_model():
    cfg = dsv3_jax.get_preset("tiny").replace(vocab_size=258, num_mtp_layers=0, max_position_embeddings=256)
    return dsv3_jax.Transformer(cfg, nnx.Rngs(3)), ByteTokenizer()


@pytest.fixture(scope="session")
def byte_checkpoint(byte_model, tmp_path_factory):
    model, tok = byte_model
    path = tmp_path_factory.mktemp("byte_ckpt")
    dsv3_jax.save_pretrained(model, str(path))
    tok.backend.save(str(path / "tokenizer.json"))
    return path
