"""Held-out evaluation during training (paper §4.5.2-4.5.3: validation loss of the main model with the MTP modules
discarded, MaxVio and per-expert load on the validation set, per-domain expert loads for the specialisation
analysis). Each evaluated set is a fixed list of windows taken in stream order from a held-out token stream
(train/tokens.py's held-out split, or an --eval-data file); one compiled forward per window shape.

Two MaxVio figures per set (Wang et al. 2024, auxiliary-loss-free balancing): `max_vio` (alias `max_vio_global`)
from the expert counts of the whole set, and `max_vio_batch`, MaxVio of each evaluated micro-batch's own counts,
averaged over the micro-batches and layers (MaxVio_batch; never below the global figure, the micro-batches being
equal-sized).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from dsv3_jax.balance import max_violation
from dsv3_jax.losses import token_logprobs
from dsv3_jax.train.packing import PackedBatches
from sharding.rules import batch_spec


def eval_windows(tokens: np.ndarray, seq_len: int, batches: int, micro: int, name: str) -> np.ndarray:
    """int32 [batches, micro, seq_len + 1]: the first batches x micro windows of `tokens` in stream order;
    ValueError naming the set when it holds fewer."""
    stream = PackedBatches(tokens, seq_len) if tokens.shape[0] > seq_len else None
    have = 0 if stream is None else stream.num_sequences
    need = batches * micro
    if have < need:
        raise ValueError(f"evaluation set {name!r} holds {have} windows of {seq_len + 1} tokens ({tokens.shape[0]} "
                         f"tokens); --eval-batches {batches} x {micro} sequences need {need}: lower --eval-batches "
                         "or give more held-out data (--eval-fraction)")
    rows = np.stack([stream.sequence(i) for i in range(need)])
    return rows.reshape(batches, micro, seq_len + 1)


def make_eval_fn(graphdef):
    """jit-compiled `f(params, bias, windows_MS) -> (nll_sum, targets, counts_LE)`: main-model next-token NLL
    summed over the windows (no MTP), its target count and the main MoE layers' expert counts (int32 [L, E];
    [0, 0] without MoE layers)."""

    def f(params, bias, windows_MS):
        model = nnx.merge(graphdef, params, bias)
        out = model.forward(windows_MS[:, :-1], mtp=False)
        nll = -jnp.sum(token_logprobs(out.logits, windows_MS[:, 1:]))
        counts = jnp.zeros((0, 0), jnp.int32) if out.expert_counts is None else out.expert_counts
        return nll, windows_MS[:, 1:].size, counts

    return jax.jit(f)


def set_metrics(nll: float, targets: int, counts_NLE: np.ndarray) -> dict[str, Any]:
    """The row of one evaluated set from its N micro-batches' expert counts [N, L, E]: CE, global MaxVio (whole-set
    counts; mean over layers, and per layer), MaxVio_batch (per micro-batch, mean over micro-batches and layers),
    per-expert load fractions."""
    row: dict[str, Any] = {"ce": nll / targets, "tokens": int(targets)}
    if counts_NLE.size:
        counts_LE = counts_NLE.sum(axis=0)
        vio = np.asarray(max_violation(jnp.asarray(counts_LE)))
        vio_batch = np.asarray(max_violation(jnp.asarray(counts_NLE)))
        load = counts_LE / np.maximum(counts_LE.sum(axis=-1, keepdims=True), 1)
        row.update(max_vio=float(vio.mean()), max_vio_global=float(vio.mean()), max_vio_batch=float(vio_batch.mean()),
                   max_vio_layers=[float(v) for v in vio], load=[[float(x) for x in layer] for layer in load])
    return row


class Evaluator:
    """Evaluates fixed window sets every `every` steps and at the last step; appends rows {"step", "kind": "eval",
    "sets": {name: set_metrics}} to WORKDIR/eval.jsonl (only process 0 writes)."""

    def __init__(self, graphdef, sets: dict[str, np.ndarray], every: int, stop: int, path: pathlib.Path,
                 mesh=None, enabled: bool = True):
        self.sets, self.every, self.stop, self.mesh = sets, every, stop, mesh
        self.fn = make_eval_fn(graphdef)
        self.path, self.enabled = path, enabled

    def due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == self.stop

    def evaluate(self, state) -> dict[str, dict[str, Any]]:
        """{name: set_metrics} of every set under the state's params and expert bias."""
        out = {}
        ctx = contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)
        with ctx:
            for name, windows in self.sets.items():
                nll, targets, counts = 0.0, 0, []
                for rows in windows:
                    n, t, c = jax.device_get(self.fn(state["params"], state["bias"], self._put(rows)))
                    nll, targets = nll + float(n), targets + int(t)
                    counts.append(np.asarray(c, np.int64))
                out[name] = set_metrics(nll, targets, np.stack(counts))
        return out

    def __call__(self, step: int, state) -> None:
        if not self.due(step):
            return
        row = {"step": step, "kind": "eval", "sets": self.evaluate(state)}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _put(self, rows: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(rows)
        sharding = NamedSharding(self.mesh, batch_spec(2))
        return jax.make_array_from_callback(rows.shape, sharding, lambda idx: rows[idx])
