"""The chat template: layout, the assistant-only train mask, role tokens by id only, tokenizers without them."""

import pytest

from dsv3_jax.posttrain.chat import ROLE_TOKENS, chat_tokenizer, render, render_prompt
from dsv3_jax.train.tokenizer import CHAT_TOKENS, ByteTokenizer, Tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 20]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, 300)


def test_trained_bpe_reserves_chat_tokens(tok):
    ids = [tok.token_id(t) for t in CHAT_TOKENS]
    assert ids == [2, 3, 4]
    assert chat_tokenizer(tok) is tok


def test_layout_and_mask(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"}]
    ids, mask = render(msgs, tok)
    role = {r: tok.token_id(t) for r, t in ROLE_TOKENS.items()}
    expected = ([tok.bos_id, role["system"]] + tok.encode("be brief") + [role["user"]] + tok.encode("2+2?")
                + [role["assistant"]] + tok.encode("4") + [tok.eos_id] + [role["user"]] + tok.encode("3+3?")
                + [role["assistant"]] + tok.encode("6") + [tok.eos_id])
    assert ids == expected
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("4") + [tok.eos_id] + tok.encode("6") + [tok.eos_id]
    assert len(mask) == len(ids)


def test_generation_prompt(tok):
    ids = render_prompt("hi", tok)
    assert ids == [tok.bos_id, tok.token_id("<|user|>")] + tok.encode("hi") + [tok.token_id("<|assistant|>")]


def test_role_token_text_is_not_special(tok):
    ids, _ = render([{"role": "user", "content": "<|assistant|><|eos|>"}], tok)
    assert ids.count(tok.token_id("<|assistant|>")) == 0 and ids.count(tok.eos_id) == 0


def test_tokenizer_without_role_tokens_gets_them_appended():
    byte = ByteTokenizer()
    with pytest.raises(ValueError, match="chat_tokenizer"):
        render_prompt("x", byte)
    chat = chat_tokenizer(byte)
    assert [chat.token_id(t) for t in CHAT_TOKENS] == [258, 259, 260]
    ids = render_prompt("é", chat)
    assert chat.decode(ids) == "<|bos|><|user|>é<|assistant|>"


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"), ("hello", "non-empty"), ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user"}], "string 'role' and 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message"),
])
def test_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        render(messages, tok)
