"""What every ablation script shares: train the arms on identical data, seed and token budget through
`dsv3_jax.train.loop.train`, read back their held-out evaluations, and write `results.json` and `results.md`.

results.json: ``{"arms": {NAME: {metric: value, ...}}, "settings": {...}, "seeds": {NAME: {seed: {metric: value}}}}``;
an arm's metric is the mean over seeds, with ``METRIC_std`` (sample standard deviation, 0 for one seed),
``METRIC_min`` and ``METRIC_max`` beside it when there are several seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import time
from typing import Any, Callable, Iterable

import numpy as np

from dsv3_jax.train.loop import RunArgs, train
from dsv3_jax.train.plot import read_metrics


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every experiment takes: --out, --quick, --seeds."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the arms' work directories and the results")
    ap.add_argument("--quick", action="store_true", help="a minute or two (CI); the numbers mean little")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds (model initialisation and data order); default per experiment")
    return ap


def new_out_dir(path: str | pathlib.Path) -> pathlib.Path:
    """--out as an empty directory (created); SystemExit when it exists and is not empty (nothing overwritten)."""
    out = pathlib.Path(path)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_seeds(seeds: Iterable[int]) -> list[int]:
    """The seeds as a list; SystemExit for a negative or repeated seed."""
    seeds = list(seeds)
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds must be distinct non-negative integers, got {seeds}")
    return seeds


def run_arm(base: RunArgs, workdir: pathlib.Path, reuse_cache: pathlib.Path | None = None,
            **overrides: Any) -> pathlib.Path:
    """Train one arm: `base` with `overrides` into `workdir` (no end-of-run sample, no progress bar).
    `reuse_cache`: an earlier arm's work directory whose tokenizer and token caches are copied in first (the cache
    files are keyed by a hash of the data, tokenizer and split, so only matching ones are used: no re-tokenizing)."""
    args = dataclasses.replace(base, workdir=str(workdir), sample_tokens=0, progress=False, **overrides)
    if reuse_cache is not None:
        (workdir / "cache").mkdir(parents=True, exist_ok=True)
        for path in (pathlib.Path(reuse_cache) / "cache").glob("*.*"):
            if path.is_file() and path.name.startswith(("tokenizer-", "tokens-")):
                shutil.copyfile(path, workdir / "cache" / path.name)
    t0 = time.perf_counter()
    train(args)
    (workdir / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return workdir


def merge_runs(dirs: Iterable[str | pathlib.Path], vary: tuple[str, ...] = ("seeds",)
               ) -> tuple[dict[str, dict[int, pathlib.Path]], dict]:
    """({arm: {seed: work directory}}, settings) of several finished runs of one script (e.g. one per seed, run in
    parallel): arms are their NAME_sSEED directories; settings are the first run's with the `vary` lists joined
    (dicts united).
    ValueError when a directory has no results.json, the runs' other settings differ, or an arm/seed repeats."""
    workdirs: dict[str, dict[int, pathlib.Path]] = {}
    settings: dict | None = None
    for d in map(pathlib.Path, dirs):
        if not (d / "results.json").is_file():
            raise ValueError(f"--merge {d}: no results.json (not a finished run of this script)")
        these = json.loads((d / "results.json").read_text())["settings"]
        if settings is None:
            settings = {k: (list(v) if k in vary and isinstance(v, list) else v) for k, v in these.items()}
        else:
            diff = sorted(k for k in set(settings) | set(these) if k not in vary and settings.get(k) != these.get(k))
            if diff:
                raise ValueError(f"--merge {d}: settings {diff} differ from the first run's")
            for k in vary:  # lists joined, dicts (e.g. per-width settings) united
                settings[k] = ({**settings[k], **these[k]} if isinstance(these[k], dict)
                               else sorted(set(settings[k]) | set(these[k])))
        for arm in sorted(p for p in d.iterdir() if (p / "seconds.txt").is_file()):
            name, _, seed = arm.name.rpartition("_s")
            if not seed.isdigit():
                continue
            if int(seed) in workdirs.setdefault(name, {}):
                raise ValueError(f"--merge: arm {name} seed {seed} appears twice ({arm})")
            workdirs[name][int(seed)] = arm
    if settings is None:
        raise ValueError("--merge needs at least one directory")
    return workdirs, settings


def read_evals(workdir: str | pathlib.Path) -> list[dict]:
    """The rows of WORKDIR/eval.jsonl ({"step", "kind": "eval", "sets": {name: metrics}}), in step order."""
    path = pathlib.Path(workdir) / "eval.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no eval.jsonl in {workdir}: train the arm with --eval-every")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no evaluation")
    return sorted(rows, key=lambda r: r["step"])


def final_eval(workdir: str | pathlib.Path, name: str = "heldout") -> dict:
    """The held-out set `name`'s metrics at the last evaluated step (KeyError naming the sets there)."""
    sets = read_evals(workdir)[-1]["sets"]
    if name not in sets:
        raise KeyError(f"{workdir}: no evaluation set {name!r} (have {sorted(sets)})")
    return sets[name]


def train_curve(workdir: str | pathlib.Path, key: str = "ce") -> np.ndarray:
    """float64 per-step values of one metrics.jsonl key (the training loss by default)."""
    return np.array([row[key] for row in read_metrics(workdir)], np.float64)


def arm_seconds(workdir: str | pathlib.Path) -> float:
    """Wall-clock seconds the arm took to train."""
    return float((pathlib.Path(workdir) / "seconds.txt").read_text())


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """Mean of each numeric metric over seeds, with _std, _min, _max when there are several seeds."""
    out: dict[str, float] = {}
    keys = [k for k, v in next(iter(per_seed.values())).items() if isinstance(v, (int, float))]
    for key in keys:
        values = np.array([row[key] for row in per_seed.values()], np.float64)
        out[key] = float(values.mean())
        if len(values) > 1:
            out[f"{key}_std"] = float(values.std(ddof=1))
            out[f"{key}_min"], out[f"{key}_max"] = float(values.min()), float(values.max())
    return out


def markdown_table(arms: dict[str, dict[str, float]], metrics: list[str],
                   fmt: Callable[[str, float], str] | None = None) -> str:
    """| arm | metric ... | table; each cell 'mean ± std' when the arm has a _std for that metric."""
    fmt = fmt or (lambda key, v: f"{v:.4g}")
    lines = ["| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in arms.items():
        cells = []
        for key in metrics:
            cell = fmt(key, row[key]) if key in row else "-"
            if f"{key}_std" in row:
                cell += f" ± {fmt(key, row[f'{key}_std'])}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: pathlib.Path, per_seed: dict[str, dict[int, dict[str, float]]], settings: dict,
                  metrics: list[str], title: str, notes: str = "", extra: dict | None = None,
                  fmt: Callable[[str, float], str] | None = None) -> dict:
    """Write results.json and results.md (title, table of `metrics` with cell format `fmt`, notes); return the
    results object."""
    arms = {name: aggregate(rows) for name, rows in per_seed.items()}
    results = {"arms": arms, "settings": settings,
               "seeds": {name: {str(s): row for s, row in rows.items()} for name, rows in per_seed.items()},
               **(extra or {})}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    seeds = sorted({s for rows in per_seed.values() for s in rows})
    table = markdown_table(arms, metrics, fmt)
    text = f"# {title}\n\n{table}\nSeeds {seeds}: mean ± sample standard deviation over seeds.\n"
    (out / "results.md").write_text(text + (f"\n{notes.strip()}\n" if notes else ""))
    print(f"\n{title}\n{table}")
    return results


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
