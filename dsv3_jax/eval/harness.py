"""Running evaluation tasks on a model (paper §5.1): multiple-choice accuracy by summed log-likelihood (acc, and
acc_norm divided by the choice's length: characters for text, tokens for ids), greedy generation exact match,
code pass@k from sandboxed execution, perplexity per token and per byte over rolling windows, and the passkey
retrieval grid (§4.3). Each runner returns (metrics, per-example records)."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from dsv3_jax.eval.code_exec import pass_at_k, run_program
from dsv3_jax.eval.passkey import make_passkey_problems, passkey_score
from dsv3_jax.eval.scoring import loglikelihood, rolling_windows
from dsv3_jax.inference.generate import generate_batched
from dsv3_jax.eval.tasks import Task

CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How tasks are run: batching, generation, code sampling and execution, perplexity windows, passkey grid."""

    batch_size: int = 8
    seed: int = 0
    max_new_tokens: int = 64
    top_k: int | None = None
    top_p: float | None = None
    code_samples: int = 1
    code_temperature: float | None = None  # default: 0 (greedy) for one sample, else 0.8
    pass_ks: tuple[int, ...] = (1, 10, 100)
    code_timeout: float = 5.0
    ppl_window: int | None = None  # default: the model's context
    ppl_stride: int | None = None  # default: the window (disjoint chunks)
    passkey_lengths: tuple[int, ...] = (64, 128, 256)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_trials: int = 5
    chat: bool = False  # generation prompts as a user turn of the chat template (post-trained models)

    def validate(self) -> "EvalSettings":
        """Raise ValueError on an impossible setting; returns self."""
        for name in ("batch_size", "code_samples", "passkey_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(k < 1 for k in self.pass_ks):
            raise ValueError(f"pass@k values must be >= 1, got {self.pass_ks}")
        if self.code_timeout <= 0:
            raise ValueError(f"code_timeout must be > 0, got {self.code_timeout}")
        return self


def _need_tokenizer(tokenizer, task: Task, what: str):
    if tokenizer is None:
        raise ValueError(f"task {task.name}: {what} needs a tokenizer, and this checkpoint has none (give the "
                         "multiple-choice task as context_ids/choices_ids)")
    return tokenizer


def _bos(bos: int | None) -> list[int]:
    return [] if bos is None else [bos]


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the continuation's front (word-boundary spaces belong to the
    continuation, as BPE tokenizers expect)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def encode_pair(tokenizer, bos: int | None, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS first, continuation ids) of a text request."""
    context, continuation = split_trailing_space(context, continuation)
    return _bos(bos) + tokenizer.encode(context), tokenizer.encode(continuation)


def run_multiple_choice(model, tokenizer, bos, task: Task, settings: EvalSettings):
    """acc and acc_norm by summed log-likelihood of each choice."""
    requests, spans, lengths = [], [], []
    for i, ex in enumerate(task.examples):
        if "choices_ids" in ex:
            reqs = [(ex["context_ids"], c) for c in ex["choices_ids"]]
            lengths.append([len(c) for c in ex["choices_ids"]])
        else:
            tok = _need_tokenizer(tokenizer, task, "a text multiple-choice example")
            reqs = [encode_pair(tok, bos, ex["context"], c) for c in ex["choices"]]
            lengths.append([len(c) for c in ex["choices"]])
        if any(not ctx for ctx, _ in reqs):
            raise ValueError(f"task {task.name}, example {i}: empty context and no BOS token to score from")
        spans.append((len(requests), len(requests) + len(reqs)))
        requests += reqs
    results = loglikelihood(model, requests, settings.batch_size)
    records, correct, correct_norm, truncated = [], 0, 0, 0
    for i, (ex, (a, b), lens) in enumerate(zip(task.examples, spans, lengths)):
        ll = np.array([r.logprob for r in results[a:b]])
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll / np.asarray(lens)))
        correct += pred == ex["answer"]
        correct_norm += pred_norm == ex["answer"]
        truncated += sum(r.truncated > 0 for r in results[a:b])
        records.append({"index": i, "choice_logliks": ll.tolist(), "pred": pred, "pred_norm": pred_norm,
                        "answer": ex["answer"], "correct": pred == ex["answer"],
                        "correct_norm": pred_norm == ex["answer"]})
    n = len(task.examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n, "truncated_requests": truncated}, records


def generate_texts(model, tokenizer, bos, prompts: Sequence[str], settings: EvalSettings, max_new_tokens: int,
                   temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continuations of text prompts (BOS first; or as chat user turns with settings.chat), decoded up to the first
    EOS; batched in fixed shapes."""
    eos = model.config.eos_token_id
    if settings.chat:
        from dsv3_jax.posttrain.chat import render_prompt

        ids = [render_prompt(p, tokenizer) for p in prompts]
    else:
        ids = [_bos(bos) + tokenizer.encode(p) for p in prompts]
    outs = generate_batched(model, ids, max_new_tokens, batch_size=settings.batch_size, temperature=temperature,
                            top_k=settings.top_k, top_p=settings.top_p, seed=seed,
                            stop_tokens=[] if eos is None else [eos])
    return [tokenizer.decode(new) for new, _ in outs]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """text up to the earliest stop string."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def run_generate(model, tokenizer, bos, task: Task, settings: EvalSettings):
    """Greedy generation scored by exact match after strip (or the task's scorer)."""
    tok = _need_tokenizer(tokenizer, task, "generation")
    outs = generate_texts(model, tok, bos, [ex["prompt"] for ex in task.examples], settings, settings.max_new_tokens)
    records, total = [], 0.0
    for i, (ex, text) in enumerate(zip(task.examples, outs)):
        completion = cut_at_stops(text, ex.get("stop", []))
        score = (task.scorer(completion, ex) if task.scorer is not None
                 else float(completion.strip() == ex["answer"].strip()))
        total += score
        records.append({"index": i, "completion": completion, "answer": ex["answer"], "score": score})
    return {"exact_match": total / len(task.examples), "n": len(task.examples)}, records


def run_code(model, tokenizer, bos, task: Task, settings: EvalSettings):
    """pass@k over `code_samples` samples per problem, each program run with its tests in a sandbox."""
    tok = _need_tokenizer(tokenizer, task, "code generation")
    n = settings.code_samples
    temperature = settings.code_temperature
    if temperature is None:
        temperature = 0.0 if n == 1 else 0.8
    prompts = [ex["prompt"] for ex in task.examples for _ in range(n)]
    outs = generate_texts(model, tok, bos, prompts, settings, settings.max_new_tokens, temperature, settings.seed)
    ks = sorted(k for k in set(settings.pass_ks) if k <= n) or [1]
    records, sums = [], {k: 0.0 for k in ks}
    for i, ex in enumerate(task.examples):
        statuses = []
        for text in outs[i * n:(i + 1) * n]:
            program = ex["prompt"] + cut_at_stops(text, ex.get("stop", CODE_STOPS)) + "\n\n" + ex["tests"] + "\n"
            if "entry_point" in ex:
                program += f"\ncheck({ex['entry_point']})\n"
            statuses.append(run_program(program, timeout=settings.code_timeout).status)
        c = statuses.count("passed")
        for k in ks:
            sums[k] += pass_at_k(n, c, k)
        records.append({"index": i, "n": n, "correct": c, "statuses": statuses})
    metrics = {f"pass@{k}": sums[k] / len(task.examples) for k in ks}
    return {**metrics, "n": len(task.examples), "samples": n, "temperature": temperature}, records


def run_perplexity(model, tokenizer, bos, task: Task, settings: EvalSettings):
    """Corpus-level token perplexity, byte perplexity and bits per byte (each document scored from BOS)."""
    tok = _need_tokenizer(tokenizer, task, "perplexity")
    max_pos = model.config.max_position_embeddings
    window = settings.ppl_window or max_pos
    if not 1 <= window <= max_pos:
        raise ValueError(f"perplexity window must be in [1, {max_pos}] (the model's context), got {window}")
    requests, owner = [], []
    for i, ex in enumerate(task.examples):
        ids = _bos(bos) + tok.encode(ex["text"])
        pairs = rolling_windows(ids, window, settings.ppl_stride)
        requests += pairs
        owner += [i] * len(pairs)
    results = loglikelihood(model, requests, settings.batch_size, max_len=window)
    ll = np.zeros(len(task.examples))
    ntok = np.zeros(len(task.examples), np.int64)
    for i, r in zip(owner, results):
        ll[i] += r.logprob
        ntok[i] += r.n_tokens
    nbytes = np.array([len(ex["text"].encode("utf-8")) for ex in task.examples])
    records = [{"index": i, "loglik": float(ll[i]), "tokens": int(ntok[i]), "bytes": int(nbytes[i])}
               for i in range(len(task.examples))]
    total, tokens, nb = float(ll.sum()), int(ntok.sum()), int(nbytes.sum())
    return {"token_perplexity": math.exp(-total / tokens), "byte_perplexity": math.exp(-total / nb),
            "bits_per_byte": -total / (nb * math.log(2)), "tokens": tokens, "bytes": nb,
            "n": len(task.examples)}, records


def run_passkey(model, tokenizer, bos, settings: EvalSettings):
    """Greedy passkey retrieval accuracy per (length, depth) cell, and overall."""
    if tokenizer is None:
        raise ValueError("builtin:passkey needs a tokenizer, and this checkpoint has none")
    if bos is None:
        raise ValueError("builtin:passkey needs a BOS token")
    problems = make_passkey_problems(tokenizer, settings.passkey_lengths, settings.passkey_depths,
                                     settings.passkey_trials, settings.seed)
    max_new = max(len(tokenizer.encode(" " + p.answer)) for p in problems) + 2
    outs = generate_texts(model, tokenizer, bos, [p.prompt for p in problems], settings, max_new)
    cells: dict[tuple[int, float], list[float]] = {}
    records = []
    for i, (p, text) in enumerate(zip(problems, outs)):
        score = passkey_score(text, p.answer)
        cells.setdefault((p.length, p.depth), []).append(score)
        records.append({"index": i, "length": p.length, "depth": p.depth, "prompt_tokens": p.n_tokens,
                        "answer": p.answer, "completion": text, "score": score})
    grid = {f"{length}@{depth}": float(np.mean(v)) for (length, depth), v in cells.items()}
    acc = float(np.mean([r["score"] for r in records]))
    return {"accuracy": acc, "grid": grid, "n": len(problems)}, records


RUNNERS = {"multiple_choice": run_multiple_choice, "generate": run_generate, "code": run_code,
           "perplexity": run_perplexity}


def run_task(model, tokenizer, bos, task: Task, settings: EvalSettings):
    """(metrics, per-example records) of one task."""
    return RUNNERS[task.kind](model, tokenizer, bos, task, settings)
