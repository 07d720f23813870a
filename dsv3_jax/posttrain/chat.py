"""The chat template of supervised fine-tuning and RL (paper §5.1): role tokens, loss on assistant turns only.

A conversation renders as ``<|bos|> [<|system|> S] <|user|> U1 <|assistant|> A1 <|eos|> <|user|> U2 ...``.
Role tokens are special tokens inserted by id; message text is encoded as ordinary text, so a message that
contains the string "<|eos|>" cannot end its turn. The trained positions (the SFT loss mask) are the tokens of
each assistant message and the ``<|eos|>`` that closes it. A generation prompt ends with ``<|assistant|>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dsv3_jax.train.tokenizer import CHAT_TOKENS, Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = dict(zip(ROLES, CHAT_TOKENS))


def chat_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the role tokens (a copy with them appended if it lacks any)."""
    if all(tokenizer.token_id(t) is not None for t in CHAT_TOKENS):
        return tokenizer
    return tokenizer.with_special_tokens(CHAT_TOKENS)


def check_messages(messages, where: str = "conversation") -> list[dict]:
    """The messages as a list of {role, content} dicts, or ValueError naming what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be an object with string 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"{where}: a system message may only come first (message {i})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _role_id(tokenizer: Tokenizer, role: str) -> int:
    token_id = tokenizer.token_id(ROLE_TOKENS[role])
    if token_id is None:
        raise ValueError(f"the tokenizer has no {ROLE_TOKENS[role]} token; pass it through chat_tokenizer() first")
    return token_id


def render(messages, tokenizer: Tokenizer, *, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, train mask): the mask is 1 on assistant message tokens and the <|eos|> closing each turn."""
    messages = check_messages(messages)
    ids, mask = [tokenizer.bos_id], [0]
    for m in messages:
        ids.append(_role_id(tokenizer, m["role"]))
        mask.append(0)
        body = tokenizer.encode(m["content"])
        trained = int(m["role"] == "assistant")
        ids += body
        mask += [trained] * len(body)
        if m["role"] == "assistant":
            ids.append(tokenizer.eos_id)
            mask.append(1)
    if add_generation_prompt:
        ids.append(_role_id(tokenizer, "assistant"))
        mask.append(0)
    return ids, mask


def render_prompt(prompt: str, tokenizer: Tokenizer, system: str | None = None) -> list[int]:
    """Ids of a one-turn user prompt followed by the generation prompt (the model answers after it)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return render(messages, tokenizer, add_generation_prompt=True)[0]
