"""The pipeline executor (sharding/pipeline_exec.py): losses and gradients of every schedule against the
sequential single-device computation (reference §8.4), on simulated devices in a subprocess."""

import itertools
import json
import os
import pathlib
import subprocess
import sys

import pytest

from sharding.pipeline import SCHEDULES, make_schedule
import sharding.pipeline_exec as pe
from tests import background
from sharding.pipeline_exec import program_shape, tick_table

ROOT = pathlib.Path(__file__).parents[2]
TOL = 1e-5


@background.job("pipeline_exec")
def _checks(workdir):
    script = pathlib.Path(__file__).parent / "pipeline_exec_checks.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
    return background.result("pipeline_exec")


def _rows(results, key):
    return {(r["schedule"], r["pp"]): r for r in results[key]}


def test_mlp_stages_every_schedule(results):
    rows = _rows(results, "mlp")
    expected = [(n, pp) for n, pp in itertools.product(("GPipe", "1F1B", "ZB1P", "DualPipe"), (2, 4))]
    assert set(expected + [("DualPipeV", 2)]) <= set(rows)
    assert rows["DualPipeV", 2]["stages"] == 4  # two stages per device
    for key, r in rows.items():
        assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), key
        assert r["grad_err"] <= TOL, key


def test_transformer_matches_single_device_grad(results):
    rows = _rows(results, "transformer")
    assert {("1F1B", 2), ("DualPipe", 2), ("1F1B", 4), ("DualPipe", 4), ("ZB1P", 4)} <= set(rows)
    for key, r in rows.items():
        assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), key
        assert r["grad_err"] <= TOL, key
        # expert counts for the bias update, summed over micro-batches, as the single-device forward routes
        assert r["counts"] == r["ref_counts"] and r["mtp_counts"] == r["ref_mtp_counts"], key
        assert len(r["counts"]) == 4 and sum(map(sum, r["counts"])) == 4 * 8 * 2 * 8 * 2  # L * M * B * T * K


def test_masked_packed_microbatches_match_single_device_grad(results):
    r = results["transformer_masked"]
    assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), r
    assert r["grad_err"] <= TOL and r["counts_equal"], r


def test_bad_input_raises(results):
    errors = results["errors"]
    assert "mesh axis 'pp' has 4 devices" in errors["mesh_size"]
    assert "leading axis of 2 stages" in errors["stage_axis"]
    assert "leading axis of 4 micro-batches" in errors["microbatch_axis"]
    assert "smaller than" in errors["pad_to"]


@pytest.mark.parametrize("name,ranks,mb", [(n, r, m) for n in SCHEDULES for r in (2, 4) for m in (2 * r, 3 * r)
                                           if not (n == "dualpipe" and m % 2)])
def test_tick_table_keeps_order_and_dependencies(name, ranks, mb):
    s = make_schedule(name, ranks, mb)
    table, stage_index = tick_table(s)
    assert table.shape[1] == program_shape(s)[0]
    tick = {}
    for r, ops in enumerate(s.resolved()):
        ticks = []
        for op in ops:
            rows = [t for t in range(table.shape[1]) if any(
                (c[0] == "F" and table[r, t, pe._F_ON] == 1 and table[r, t, pe._F_M] == c[3]
                 and stage_index[r, table[r, t, pe._F_PH]] == c[2]) or
                (c[0] != "F" and table[r, t, pe._B_KIND] == {"B": 1, "b": 2, "W": 3}[c[0]]
                 and table[r, t, pe._B_M] == c[3] and stage_index[r, table[r, t, pe._B_PH]] == c[2]) for c in op)]
            assert len(set(rows)) == 1, (r, op, rows)
            ticks.append(rows[0])
            for c in op:
                tick[c] = rows[0]
        assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)  # one op per tick, in schedule order
    last = s.num_stages - 1
    for (kind, chain, stage, m), t in tick.items():
        if kind == "F" and stage > 0:
            assert tick["F", chain, stage - 1, m] < t
        if kind in "Bb":
            assert tick["F", chain, stage, m] < t
            if stage < last:
                nxt = tick.get(("B", chain, stage + 1, m), tick.get(("b", chain, stage + 1, m)))
                assert nxt < t
        if kind == "W":
            assert tick["b", chain, stage, m] < t


@pytest.mark.parametrize("name,ranks,mb", [(n, r, m) for n in SCHEDULES for r in (2, 4) for m in (2 * r, 6 * r)
                                           if not (n == "dualpipe" and m % 2)])
def test_buffer_slots_hold_each_micro_batch_until_its_last_read(name, ranks, mb):
    """Replays the tick table at the level of the buffers (the executor's order within a tick: forward read,
    forward write, backward read, arrivals) and checks that every read finds the micro-batch the op is for: a slot
    is never reused while a micro-batch still needs it. And slots are reused: as many as micro-batches in flight,
    not one per micro-batch."""
    s = make_schedule(name, ranks, mb)
    table, _ = tick_table(s)
    held = {}  # (rank, slot, 'x' input | 'g' output gradient / head input) -> micro-batch
    step = {1: 1, 2: -1, 3: 0}  # destination code (right, left, local) -> rank offset
    for t in range(table.shape[1]):
        arrivals = []
        for r in range(ranks):
            on, _, slot, m, first, last, dest = table[r, t, pe._F_ON:pe._F_DEST + 1]
            if on:
                if not first:
                    assert held[r, slot, "x"] == m, (r, t)
                for kind, write in (("x", first), ("g", last)):
                    if write:
                        held[r, slot, kind] = m
                if dest:
                    arrivals.append(((r + step[dest], table[r, t, pe._F_DSLOT], "x"), m))
            kind, _, slot, m, first, last, dest = table[r, t, pe._B_KIND:pe._B_DEST + 1]
            if kind:
                assert held[r, slot, "x"] == m and held[r, slot, "g"] == m, (r, t)
                if dest:
                    arrivals.append(((r + step[dest], table[r, t, pe._B_DSLOT], "g"), m))
        for key, m in arrivals:
            held[key] = m
    slots = program_shape(s)[2]  # one pool per rank, over all its stages
    if name == "gpipe":  # all forwards before any backward: every micro-batch is in flight
        assert slots == mb
    else:  # DualPipe: ranks + 2, DualPipeV (two stages of one stream per rank): 2 x ranks + 2
        assert slots <= 2 * ranks + 2 and (slots < mb or mb == 2 * ranks), slots
