"""Post-training end to end (paper §4-§5 at toy scale): pretrain `tiny` on the default corpus mixed with synthetic
arithmetic, supervised fine-tuning on arithmetic chat data, then GRPO on the same kind of problems, measuring the
exact-match accuracy on held-out problems after each stage.

    python experiments/posttrain_demo.py --out runs/posttrain_demo            # default size (~20 min on 2 cores)
    python experiments/posttrain_demo.py --out /tmp/demo --quick              # a minute or two (CI)

Problems are draws of the built-in `addition` task (dsv3_jax.posttrain.tasks) under a different seed per stage;
the evaluation problems are drawn first and removed from the pretraining text, the SFT conversations and the GRPO
pool, so no stage sees them. Evaluation is greedy generation scored by the task's checker,
with the prompt as a user turn of the chat template (what SFT and GRPO train); the pretrained model is also
scored on the plain-text format it was pretrained on. Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from dsv3_jax.eval import EvalSettings, Task, run_task
from dsv3_jax.load import load_model_and_tokenizer
from dsv3_jax.posttrain.grpo import GRPOArgs, run_grpo
from dsv3_jax.posttrain.sft import SFTArgs, sft
from dsv3_jax.posttrain.tasks import make_problems, score
from dsv3_jax.train.inputs import default_corpus_files
from dsv3_jax.train.loop import RunArgs, train

SEEDS = {"pretrain": 101, "sft": 202, "grpo": 303, "eval": 404}

SIZES = {  # pretraining / SFT / GRPO / evaluation sizes
    "default": dict(pretrain_steps=600, pretrain_problems=20000, corpus_bytes=1_500_000, sft_steps=300,
                    sft_problems=4000, grpo_iterations=100, eval_problems=300, batch=16, seq_len=128),
    "quick": dict(pretrain_steps=30, pretrain_problems=2000, corpus_bytes=200_000, sft_steps=20,
                  sft_problems=400, grpo_iterations=2, eval_problems=16, batch=8, seq_len=64),
}


def problems(stage: str, n: int, digits: int, held_out: frozenset[str] = frozenset()) -> list:
    """n problems of a stage (its own seed), none of whose prompts is in held_out."""
    drawn = [p for p in make_problems("addition", 2 * n + 1000, SEEDS[stage], digits=digits)
             if p.prompt not in held_out]
    if len(drawn) < n:
        raise ValueError(f"{stage}: only {len(drawn)} problems outside the evaluation set; lower the sizes")
    return drawn[:n]


def eval_problems(n: int, digits: int) -> list:
    """n distinct evaluation problems (the held-out set)."""
    unique = list({p.prompt: p for p in make_problems("addition", 3 * n, SEEDS["eval"], digits=digits)}.values())
    if len(unique) < n:
        raise ValueError(f"only {len(unique)} distinct {digits}-digit problems; lower the evaluation size")
    return unique[:n]


def _write_jsonl(path: pathlib.Path, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _eval_task(held_out: list, stop: tuple[str, ...] = ()) -> Task:
    """The held-out problems as a generation task; `stop`: strings that end a completion (besides EOS)."""
    examples = tuple({"prompt": p.prompt, "answer": p.answer, "problem": p, "stop": list(stop)} for p in held_out)
    return Task("addition", "generate", examples,
                scorer=lambda completion, ex: float(score("addition", completion, ex["problem"])))


def _exact_match(workdir: pathlib.Path, task: Task, chat: bool) -> float:
    model, tokenizer = load_model_and_tokenizer(workdir)
    settings = EvalSettings(batch_size=16, max_new_tokens=8, chat=chat)
    metrics, _ = run_task(model, tokenizer, tokenizer.bos_id, task, settings)
    return metrics["exact_match"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the three work directories and the results")
    ap.add_argument("--quick", action="store_true", help="a minute or two (CI); the numbers mean little")
    ap.add_argument("--digits", type=int, default=2, help="operand digits of the addition problems")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    args = ap.parse_args(argv)
    size = SIZES["quick" if args.quick else "default"]
    out = pathlib.Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    held_out = eval_problems(size["eval_problems"], args.digits)
    excluded = frozenset(p.prompt for p in held_out)
    arith = out / "arithmetic.jsonl"  # plain-text documents of 20 problems ("What is 27 + 5? 32")
    pre = problems("pretrain", size["pretrain_problems"], args.digits, excluded)
    _write_jsonl(arith, ({"text": "\n".join(f"{p.prompt} {p.answer}" for p in pre[i:i + 20])}
                         for i in range(0, len(pre), 20)))
    corpus = [str(p) for p in default_corpus_files(size["corpus_bytes"])]
    common = dict(batch=size["batch"], seq_len=size["seq_len"], seed=args.seed, progress=False)
    train(RunArgs(workdir=str(out / "pretrain"), steps=size["pretrain_steps"], preset="tiny", data=corpus + [str(arith)],
                  sample_tokens=0, save_every=size["pretrain_steps"], lr=3e-3, **common))

    sft_data = out / "sft.jsonl"
    _write_jsonl(sft_data, ({"messages": [{"role": "user", "content": p.prompt},
                                          {"role": "assistant", "content": p.answer}]}
                            for p in problems("sft", size["sft_problems"], args.digits, excluded)))
    grpo_pool = out / "grpo_problems.jsonl"
    _write_jsonl(grpo_pool, ({"prompt": p.prompt, "answer": p.answer, "task": "addition"}
                             for p in problems("grpo", size["grpo_iterations"] * 8, args.digits, excluded)))
    sft(SFTArgs(workdir=str(out / "sft"), init=str(out / "pretrain"), data=[str(sft_data)], steps=size["sft_steps"],
                lr=1e-3, min_lr=1e-4, save_every=size["sft_steps"], **common))

    run_grpo(GRPOArgs(init=str(out / "sft"), workdir=str(out / "grpo"), task=str(grpo_pool),
                      iterations=size["grpo_iterations"], prompts_per_batch=8, group_size=16, updates_per_batch=1,
                      lr=2e-5, max_new_tokens=8, seed=args.seed, save_every=size["grpo_iterations"], progress=False))

    task = _eval_task(held_out)
    stages = {  # the pretraining text has one problem per line: a plain-text answer ends at the newline
        "pretrained (plain text prompt)": _exact_match(out / "pretrain", _eval_task(held_out, ("\n",)), chat=False),
        "pretrained (chat prompt)": _exact_match(out / "pretrain", task, chat=True),
        "after SFT": _exact_match(out / "sft", task, chat=True),
        "after GRPO": _exact_match(out / "grpo", task, chat=True),
    }
    results = {"exact_match": stages, "settings": {**size, "digits": args.digits, "seed": args.seed,
                                                   "seeds": SEEDS, "quick": args.quick},
               "grpo_reward_first_last": _reward_span(out / "grpo"), "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = ["| stage | exact match |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in stages.items()]
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"({size['eval_problems']} held-out {args.digits}-digit additions, greedy; {results['seconds']:.0f} s)")
    return 0


def _reward_span(workdir: pathlib.Path) -> list[float] | None:
    """Mean GRPO reward of the first and last iteration (metrics.jsonl)."""
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    return [float(rewards[0]), float(np.mean(rewards[-5:]))] if rewards else None


if __name__ == "__main__":
    sys.exit(main())
