"""The benchmark protocol (issue 12), shared by the scripts in benchmarks/: check that the machine is quiet before
starting, run the compared implementations interleaved run by run, each at least ``--repeats`` (default 3) times,
and report the median with min and max.

Every figure a script reports is computed per repeat (a ratio from the two runs of that repeat) and summarised
over the repeats: its JSON keeps the plain key (the median) and adds ``KEY_median``, ``KEY_min`` and ``KEY_max``,
beside ``quiet``, ``load_average`` and ``repeats``. Figures taken on a busy machine are marked, not refused.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable, Mapping, Sequence

QUIET_LOAD = 0.5  # a 1-minute load average above this makes the figures incomparable
DEFAULT_REPEATS = 3


def add_repeats_arg(ap: argparse.ArgumentParser) -> None:
    """Add ``--repeats N`` (runs of each implementation, interleaved; default 3)."""
    ap.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                    help=f"runs of each implementation, interleaved run by run; median, min and max are reported "
                         f"(default {DEFAULT_REPEATS}; comparable figures need >= {DEFAULT_REPEATS})")


def check_repeats(repeats: int) -> int:
    """``repeats``, or ValueError unless it is a positive integer."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"--repeats must be a positive integer, got {repeats!r}")
    return repeats


def machine_state(threshold: float = QUIET_LOAD) -> dict[str, float | bool]:
    """{"quiet", "load_average"} from the 1-minute load average; prints a warning line when the machine is busy."""
    load = float(os.getloadavg()[0])
    quiet = load <= threshold
    if not quiet:
        print(f"machine busy: load average {load:.2f} > {threshold:g}; figures are not comparable", flush=True)
    return {"quiet": quiet, "load_average": load}


def interleave(runners: Mapping[str, Callable[[], dict[str, float]]], repeats: int) -> dict[str, list[dict]]:
    """Call every runner once per repeat, in turn (a, b, a, b, ...); {name: [its result dict per repeat]}."""
    check_repeats(repeats)
    out: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            out[name].append(run())
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """{"median", "min", "max"} of ``values`` (the median of an even count is the mean of the middle two)."""
    if not values:
        raise ValueError("spread() needs at least one value")
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """One dict from per-repeat figure dicts: KEY (the median), KEY_median, KEY_min, KEY_max for each key; a key
    that is None in any repeat (a figure not measured) stays None, without variants."""
    if not rows:
        raise ValueError("summarize() needs at least one repeat")
    keys = list(rows[0])
    for i, row in enumerate(rows):
        if list(row) != keys:
            raise ValueError(f"repeat {i} reports {sorted(row)}, repeat 0 {sorted(keys)}")
    out: dict[str, float | None] = {}
    for key in keys:
        values = [row[key] for row in rows]
        if any(v is None for v in values):
            out[key] = None
            continue
        s = spread(values)
        out[key] = s["median"]
        out.update({f"{key}_{name}": v for name, v in s.items()})
    return out


def header(state: Mapping[str, float | bool], repeats: int) -> str:
    """The line that opens a script's printed figures: repeats, and the load average it started at."""
    return (f"median of {repeats} interleaved runs (min-max in brackets); load average {state['load_average']:.2f} "
            f"at start{'' if state['quiet'] else ' (busy)'}")


def pair_arg(letters: str, example: str) -> Callable[[str], tuple[int, int]]:
    """An argparse type for two positive sizes written like ``example`` ("7168x2112" for letters "KxN")."""

    def parse(text: str) -> tuple[int, int]:
        try:
            a, b = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {letters} (e.g. {example}), got {text!r}") from None
        if a < 1 or b < 1:
            raise argparse.ArgumentTypeError(f"{letters} must be positive, got {text!r}")
        return a, b

    return parse
