"""`dsv3 eval`: resolve the tasks, run them on a loaded checkpoint, print metrics (text or `--json`) and write
per-example scores (`--dump-scores`)."""

from __future__ import annotations

import argparse
import json
import os

from dsv3_jax.eval.harness import EvalSettings, run_passkey, run_task
from dsv3_jax.eval.passkey import format_table
from dsv3_jax.eval.tasks import POSTTRAIN_TASKS, load_jsonl_task, posttrain_task

BUILTIN_DEFAULT_N = 100


def resolve_tasks(specs: list[str], kind: str | None, limit: int | None, seed: int) -> list:
    """Task objects for the --task values ('passkey' stays a name: it is built against the tokenizer)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    tasks = []
    for spec in specs:
        if spec.startswith("builtin:"):
            name = spec[len("builtin:"):]
            if name == "passkey":
                tasks.append("passkey")
            elif name in POSTTRAIN_TASKS:
                tasks.append(posttrain_task(name, limit or BUILTIN_DEFAULT_N, seed))
            else:
                raise ValueError(f"unknown built-in task {spec!r}; known: "
                                 f"{', '.join('builtin:' + n for n in ('passkey',) + POSTTRAIN_TASKS)}")
        elif spec == "passkey":
            tasks.append("passkey")
        else:
            if not spec.endswith((".jsonl", ".json")) and not os.path.exists(spec):
                raise ValueError(f"unknown task {spec!r}: give a JSONL file or builtin:NAME")
            tasks.append(load_jsonl_task(spec, kind, limit))
    return tasks


def _format(name: str, kind: str, metrics: dict) -> str:
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                      if k != "grid")
    return f"{name} ({kind}): {shown}"


def run_eval(args: argparse.Namespace, load) -> int:
    """The `dsv3 eval` command; `load(path) -> (model, tokenizer | None, bos)`."""
    settings = EvalSettings(batch_size=args.batch_size, seed=args.seed, max_new_tokens=args.max_new_tokens,
                            top_k=args.top_k, top_p=args.top_p, code_samples=args.samples,
                            code_temperature=args.temperature, pass_ks=tuple(args.pass_k),
                            code_timeout=args.timeout, ppl_window=args.ppl_window, ppl_stride=args.ppl_stride,
                            passkey_lengths=tuple(args.lengths), passkey_depths=tuple(args.depths),
                            passkey_trials=args.trials, chat=args.chat).validate()
    tasks = resolve_tasks(args.task, args.kind, args.limit, args.seed)
    names = ["builtin:passkey" if t == "passkey" else t.name for t in tasks]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"task {name!r} given twice (JSONL tasks are named by their file's stem)")
    model, tokenizer, bos = load(args.checkpoint)
    results, lines, dumps = {}, [], []
    for task in tasks:
        if task == "passkey":
            name, kind = "builtin:passkey", "passkey"
            metrics, records = run_passkey(model, tokenizer, bos, settings)
        else:
            name, kind = task.name, task.kind
            metrics, records = run_task(model, tokenizer, bos, task, settings)
        results[name] = {"kind": kind, **metrics}
        lines.append(_format(name, kind, metrics))
        if kind == "passkey":
            cells = {(length, depth): metrics["grid"][f"{length}@{depth}"] for length in settings.passkey_lengths
                     for depth in settings.passkey_depths}
            lines.append(format_table(cells, settings.passkey_lengths, settings.passkey_depths))
        dumps += [{"task": name, **r} for r in records]
    if args.dump_scores:
        with open(args.dump_scores, "w", encoding="utf-8") as f:
            for row in dumps:
                f.write(json.dumps(row) + "\n")
    print(json.dumps({"checkpoint": args.checkpoint, "tasks": results}) if args.json else "\n".join(lines))
    return 0
