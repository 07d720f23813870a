"""`dsv3 distill-data`: a teacher's sampled answers as chat SFT data (how V3 learned from R1, paper §5.1).

Prompts: JSONL, one per line, either {"messages": [...]} ending with a user turn, or {"prompt": "..."}. Each is
rendered with the chat template and its generation prompt, sampled `samples` times (batched inference.generate,
stopping at <|eos|>), and written as {"messages": prompt + [{"role": "assistant", "content": answer}]}, the format
`dsv3 sft --data` reads. An answer that hit --max-new-tokens without <|eos|> is written with "truncated": true and
counted (`dsv3 sft` trains its closing <|eos|> like any other; drop such lines to avoid that).
"""

from __future__ import annotations

import json
import os

from dsv3_jax.inference.generate import generate_batched
from dsv3_jax.jsonl import read_objects
from dsv3_jax.posttrain.chat import check_messages, render


def read_prompts(path: str | os.PathLike) -> list[tuple[str, list[dict]]]:
    """[(file:line, messages ending with a user turn)] of a prompts JSONL file; ValueError naming file:line."""
    out = []
    for where, row in read_objects(path, "prompts"):
        if isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        elif "messages" in row:
            messages = check_messages(row["messages"], where)
        else:
            raise ValueError(f"{where}: expected an object with a 'prompt' string or a 'messages' list")
        if messages[-1]["role"] != "user":
            raise ValueError(f"{where}: the last message must be the user's (the teacher answers it)")
        out.append((where, messages))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def distill_data(teacher: str, prompts: str, out: str, samples: int = 1, temperature: float = 1.0,
                 max_new_tokens: int = 256, batch: int = 8, seed: int = 0, top_p: float | None = None) -> dict:
    """Sample the teacher's answers to every prompt and write chat JSONL to `out`; returns counts."""
    from dsv3_jax.load import load_model_and_tokenizer
    from dsv3_jax.posttrain.sft import sft_tokenizer

    for name, value in (("samples", samples), ("max_new_tokens", max_new_tokens), ("batch", batch)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    rows = read_prompts(prompts)
    model, tokenizer = load_model_and_tokenizer(teacher)
    tokenizer = sft_tokenizer(tokenizer, model.config.vocab_size, f"--teacher {teacher}")
    eos = tokenizer.eos_id
    jobs = [(messages, render(messages, tokenizer, add_generation_prompt=True)[0]) for _, messages in rows
            for _ in range(samples)]
    limit = model.config.max_position_embeddings
    for (where, _), (_, ids) in zip([r for r in rows for _ in range(samples)], jobs):
        if len(ids) + max_new_tokens > limit:
            raise ValueError(f"{where}: {len(ids)} prompt tokens + --max-new-tokens {max_new_tokens} exceed the "
                             f"teacher's max_position_embeddings {limit}")
    answers = generate_batched(model, [ids for _, ids in jobs], max_new_tokens, batch_size=batch,
                               temperature=temperature, top_p=top_p, seed=seed, stop_tokens=[eos])
    written = truncated = 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for (messages, _), (new, finished) in zip(jobs, answers):
            row = {"messages": messages + [{"role": "assistant", "content": tokenizer.decode(new)}]}
            if not finished:
                row["truncated"] = True
                truncated += 1
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
    os.replace(tmp, out)
    return {"prompts": len(rows), "written": written, "truncated": truncated, "out": out}
