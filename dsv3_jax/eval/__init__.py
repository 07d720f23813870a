"""Evaluation harness (paper §5.1 and the passkey probe of §4.3): `dsv3 eval`. The lm-evaluation-harness adapter
(dsv3_jax.eval.lm_eval_adapter) is imported only when lm-eval is used."""

from dsv3_jax.eval.code_exec import pass_at_k, run_program
from dsv3_jax.eval.harness import EvalSettings, run_passkey, run_task
from dsv3_jax.eval.scoring import Loglik, loglikelihood, rolling_windows
from dsv3_jax.eval.tasks import Task, load_jsonl_task

__all__ = ["EvalSettings", "Loglik", "Task", "load_jsonl_task", "loglikelihood", "pass_at_k", "rolling_windows",
           "run_passkey", "run_program", "run_task"]
