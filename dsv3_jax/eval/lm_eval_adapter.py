"""lm-evaluation-harness adapter: the model registered with lm-eval as "dsv3" (an `lm_eval.api.model.LM`), its
loglikelihood, loglikelihood_rolling and generate_until served by the dsv3 scoring core, so lm-eval's tasks (paper
§5.1 benchmarks) run on local data. Importing this module needs the `eval` extra (lm-eval)."""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dsv3_jax.eval.harness import EvalSettings, cut_at_stops, encode_pair, generate_texts
from dsv3_jax.eval.scoring import loglikelihood, rolling_windows


@register_model("dsv3")
class DSV3LM(LM):
    """A dsv3 checkpoint (`checkpoint=DIR`: released format with tokenizer.json, or a `dsv3 train` work directory)
    or an in-memory (model, tokenizer) pair, for lm_eval.simple_evaluate / `lm_eval --model dsv3`."""

    def __init__(self, checkpoint: str | None = None, model=None, tokenizer=None, batch_size: int | str = 8,
                 max_gen_toks: int = 64, **_ignored):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("DSV3LM needs checkpoint=DIR or model=... with tokenizer=...")
            from dsv3_jax.cli import _load_for_generation

            model, tokenizer, bos = _load_for_generation(checkpoint)
        else:
            if tokenizer is None:
                raise ValueError("DSV3LM: an in-memory model needs its tokenizer")
            bos = model.config.bos_token_id
        self.model, self.tokenizer, self.bos = model, tokenizer, bos
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = 8  # no automatic search: batches are fixed shapes anyway
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"DSV3LM: batch_size must be an integer or 'auto', got {batch_size!r}") from None
        self.settings = EvalSettings(batch_size=batch_size, max_new_tokens=int(max_gen_toks)).validate()

    def _prefix(self) -> list[int]:
        eos = self.model.config.eos_token_id
        return [self.bos] if self.bos is not None else [eos]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) per request; an empty context is scored after BOS."""
        pairs = [encode_pair(self.tokenizer, self.bos, *req.args) for req in requests]
        pairs = [(ctx or self._prefix(), cont) for ctx, cont in pairs]
        return [(r.logprob, r.is_greedy) for r in loglikelihood(self.model, pairs, self.settings.batch_size)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each whole string after BOS, in disjoint windows of the model's context."""
        window = self.model.config.max_position_embeddings
        pairs, owner = [], []
        for i, req in enumerate(requests):
            ids = self._prefix() + self.tokenizer.encode(req.args[0])
            windows = rolling_windows(ids, window)
            pairs += windows
            owner += [i] * len(windows)
        totals = [0.0] * len(requests)
        for i, r in zip(owner, loglikelihood(self.model, pairs, self.settings.batch_size)):
            totals[i] += r.logprob
        return totals

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, with do_sample/temperature) continuations cut at the `until` strings."""
        out = [""] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kw = dict(req.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            max_new = int(kw.get("max_gen_toks", self.settings.max_new_tokens))
            groups.setdefault((tuple(until), temperature, max_new), []).append(i)
        for (until, temperature, max_new), idx in groups.items():
            texts = generate_texts(self.model, self.tokenizer, self.bos, [requests[i].args[0] for i in idx],
                                   self.settings, max_new, temperature, self.settings.seed)
            for i, text in zip(idx, texts):
                out[i] = cut_at_stops(text, until)
        return out
