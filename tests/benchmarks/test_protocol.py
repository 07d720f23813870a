"""benchmarks/protocol.py (issue 12's benchmark protocol): median/min/max against a plain restatement, the
interleaved run order, and the busy-machine flag with a monkeypatched load average. Nothing is timed."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "protocol.py"


@pytest.fixture(scope="module")
def protocol():
    """benchmarks/protocol.py loaded from its file (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_protocol", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("values", [[3.0, 1.0, 2.0], [5.0, 1.0, 4.0, 2.0], [7.5]])
def test_spread_is_median_min_max(protocol, values):
    s = protocol.spread(values)
    assert s == {"median": float(np.median(values)), "min": min(values), "max": max(values)}


def test_summarize_keeps_keys_as_median_and_adds_variants(protocol):
    rows = [{"tokens_per_s": 10.0, "ratio": 0.5, "spec": None}, {"tokens_per_s": 30.0, "ratio": 0.7, "spec": None},
            {"tokens_per_s": 20.0, "ratio": 0.9, "spec": None}]
    s = protocol.summarize(rows)
    assert s["tokens_per_s"] == s["tokens_per_s_median"] == 20.0
    assert (s["tokens_per_s_min"], s["tokens_per_s_max"]) == (10.0, 30.0)
    assert s["ratio"] == pytest.approx(0.7) and (s["ratio_min"], s["ratio_max"]) == (0.5, 0.9)
    assert s["spec"] is None and "spec_median" not in s  # a figure not measured stays None
    with pytest.raises(ValueError, match="repeat 1 reports"):
        protocol.summarize([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="at least one"):
        protocol.summarize([])


def test_interleave_runs_implementations_in_turn(protocol):
    calls = []
    runners = {name: (lambda name=name: calls.append(name) or {"n": len(calls)}) for name in ("dsv3", "hf")}
    out = protocol.interleave(runners, 3)
    assert calls == ["dsv3", "hf"] * 3
    assert [r["n"] for r in out["dsv3"]] == [1, 3, 5] and [r["n"] for r in out["hf"]] == [2, 4, 6]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="--repeats must be a positive integer"):
            protocol.interleave(runners, bad)


@pytest.mark.parametrize("load, quiet", [(0.2, True), (0.5, True), (2.75, False)])
def test_busy_machine_is_flagged(protocol, monkeypatch, capsys, load, quiet):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert protocol.machine_state() == {"quiet": quiet, "load_average": load}
    out = capsys.readouterr().out
    if quiet:
        assert out == ""
    else:
        assert f"machine busy: load average {load:.2f} > 0.5; figures are not comparable" in out


def test_repeats_flag_defaults_to_three(protocol):
    import argparse

    ap = argparse.ArgumentParser()
    protocol.add_repeats_arg(ap)
    assert ap.parse_args([]).repeats == 3 and ap.parse_args(["--repeats", "5"]).repeats == 5


def test_pair_arg_parses_two_positive_sizes(protocol):
    import argparse

    parse = protocol.pair_arg("KxN", "7168x2112")
    assert parse("7168x2112") == (7168, 2112) and parse("8X256") == (8, 256)
    for bad, message in (("7168", "expected KxN"), ("0x5", "must be positive"), ("axb", "expected KxN")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(bad)
