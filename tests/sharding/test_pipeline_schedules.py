"""Pipeline schedules as data and the simulator (sharding/pipeline.py) against the DualPipe reference (§8)."""

import collections
import contextlib
import io
import itertools
import os
import pathlib
import subprocess
import sys

import pytest

from sharding.pipeline import (SCHEDULES, Chunk, Costs, Schedule, dualpipe, dualpipev, gpipe, main, make_schedule,
                               one_f_one_b, simulate, zb1p)

DATA = pathlib.Path(__file__).parent / "data"
ROOT = pathlib.Path(__file__).parents[2]

# (name, ranks, microbatches) satisfying every schedule's requirements
CASES = [(name, r, m) for name in SCHEDULES for r in (1, 2, 3, 4, 8) for m in (2 * r, 2 * r + 2, 3 * r + 4)
         if not (name == "dualpipe" and (r % 2 or m % 2))]


def _golden_rank_lines():
    return [line for line in (DATA / "dualpipe_pp4.txt").read_text().splitlines() if line.startswith("rank ")]


def test_show_reproduces_golden_dualpipe_pp4():
    out = subprocess.run([sys.executable, "-m", "sharding.pipeline", "show", "dualpipe", "--ranks", "4",
                          "--microbatches", "8"], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    rank_lines = [line for line in out.splitlines() if line.startswith("rank ")]
    assert rank_lines == _golden_rank_lines()
    assert "=== DualPipe ranks=4 chunks=8" in out.splitlines()


def test_dualpipev_is_first_half_of_dualpipe():
    # Same op strings: V's phase 0/1 are stages r and 2n-1-r of one chain, DualPipe's local phases on ranks < n
    # are directions 0/1 through stage r and PP-1-r.
    for n, c in itertools.product((1, 2, 3, 4, 8), (0, 1, 5)):
        v = dualpipev(n, 2 * n + c)
        d = dualpipe(2 * n, 2 * (2 * n + c))
        assert v.lines() == d.lines()[:n]
    # ... but the labels mean different micro-batches: in V, F0:k and F1:k are the same micro-batch k in its two
    # halves; in DualPipe, F1:k is micro-batch k of the reverse direction (global C + k), another input.
    v, d = dualpipev(2, 4), dualpipe(4, 8)
    v_f1 = {c[3] for op in v.resolved()[0] for c in op if c[0] == "F" and c[2] == 3}
    d_f1 = {c[3] for op in d.resolved()[0] for c in op if c[0] == "F" and c[1] == 1}
    assert v_f1 == {0, 1, 2, 3} and d_f1 == {4, 5, 6, 7}


@pytest.mark.parametrize("name,ranks,mb", CASES)
def test_op_counts_and_order(name, ranks, mb):
    s = make_schedule(name, ranks, mb)
    res = s.resolved()
    seen = collections.Counter()
    for r, ops in enumerate(res):
        raw = [c for op in s.ops[r] for c in op]
        assert sum(c.kind == "b" for c in raw) == sum(c.kind == "W" for c in raw)
        phases = {c.phase for c in raw}
        per_phase = s.microbatches // s.chains  # C per direction (DualPipe), all of them otherwise
        for p in phases:
            assert sum(c.kind == "F" and c.phase == p for c in raw) == per_phase
            assert sum(c.kind in "Bb" and c.phase == p for c in raw) == per_phase
        t_of = {}
        for t, op in enumerate(ops):
            for kind, chain, stage, m in op:
                seen[kind, chain, stage, m] += 1
                t_of[kind, chain, stage, m] = t
        for (kind, chain, stage, m), t in t_of.items():
            if kind in "Bb":
                assert t_of["F", chain, stage, m] < t  # the micro-batch's forward ran earlier on this rank
            if kind == "W":
                assert t_of["b", chain, stage, m] < t
    # every (stage, micro-batch) runs exactly one forward and one backward somewhere
    per_chain = s.microbatches // s.chains
    for chain, stage, k in itertools.product(range(s.chains), range(s.num_stages), range(per_chain)):
        m = chain * per_chain + k
        assert seen["F", chain, stage, m] == 1
        assert seen["B", chain, stage, m] + seen["b", chain, stage, m] == 1
        assert seen["b", chain, stage, m] == seen["W", chain, stage, m]
    simulate(s)  # dependencies satisfiable: no deadlock


def test_deadlock_is_reported():
    c = lambda kind, mb: (Chunk(kind, 0, mb),)  # noqa: E731
    # rank 1 wants micro-batch 1 first, rank 0 waits for rank 1's backward of micro-batch 0 before sending it
    bad = Schedule("bad", 2, 2, 2, 1, ((c("F", 0), c("B", 0), c("F", 1), c("B", 1)),
                                       (c("F", 1), c("B", 1), c("F", 0), c("B", 0))), (((0, 0),), ((0, 1),)))
    with pytest.raises(ValueError, match="deadlock"):
        simulate(bad)


@pytest.mark.parametrize("call,match", [
    (lambda: dualpipe(3, 12), "even number of ranks"),
    (lambda: dualpipe(4, 9), "even number of micro-batches"),
    (lambda: dualpipe(4, 6), "microbatches >= 2 \\* ranks"),
    (lambda: dualpipev(4, 7), "microbatches >= 2 \\* ranks"),
    (lambda: one_f_one_b(4, 3), "microbatches >= ranks"),
    (lambda: zb1p(4, 3), "microbatches >= ranks"),
    (lambda: gpipe(0, 3), "ranks must be a positive"),
    (lambda: make_schedule("interleaved", 4, 8), "unknown pipeline schedule"),
])
def test_requirements_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cli_rejects_bad_input():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        main(["show", "dualpipe", "--ranks", "4", "--microbatches", "6"])
    assert "microbatches >= 2 * ranks" in err.getvalue()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        main(["table", "--costs", "1,x,1"])
    assert "--costs" in err.getvalue()


def test_simulator_hand_timeline():
    # GPipe, 2 ranks, 2 micro-batches, F=1, B=2 (b=1.5, W=0.5), P2P 0.5, worked out by hand
    r = simulate(gpipe(2, 2), Costs(f=1, b=1.5, w=0.5, p2p=0.5))
    assert r.start == ((0, 1, 6, 8), (1.5, 2.5, 3.5, 5.5))
    assert r.total == 10 and r.busy == (6, 6) and r.bubble == (4, 4)
    assert r.peak_activations == (2, 2)


COSTS = [Costs(1, 1, 1), Costs(1.0, 1.5, 0.7), Costs(2, 1, 0.5)]


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("costs", COSTS)
def test_bubble_1f1b_and_zb1p(pp, costs):
    f, b_full, w = costs.f, costs.full_b, costs.w
    for m in (pp, 2 * pp, 3 * pp + 1):
        r = simulate(one_f_one_b(pp, m), costs)
        assert r.bubble == pytest.approx([(pp - 1) * (f + b_full)] * pp)
        assert r.peak_activations[0] == pp
        r = simulate(zb1p(pp, m), costs)
        assert r.bubble == pytest.approx([(pp - 1) * (f + b_full - 2 * w)] * pp)
        assert r.peak_activations[0] == pp
        assert max(simulate(gpipe(pp, m), costs).bubble) == pytest.approx((pp - 1) * (f + b_full))


# The README's DualPipe bubble (PP/2-1)(F&B + B - 3W) holds, for the worst rank, under the convention of its
# figure: the input-backward costs as much as the forward (b = F, so B = F + W), W <= F, and F&B at most F + B.
DUAL_COSTS = [Costs(1, 1, 1), Costs(1, 1, 1, fb=2), Costs(1, 1, 0.5, fb=1.7), Costs(2, 2, 2, fb=5)]


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("costs", DUAL_COSTS)
def test_bubble_dualpipe(pp, costs):
    fb = costs.of((("F",), ("B",)))
    expected = (pp // 2 - 1) * (fb + costs.full_b - 3 * costs.w)
    for m in (2 * pp, 2 * pp + 6):
        r = simulate(dualpipe(pp, m), costs)
        assert max(r.bubble) == pytest.approx(expected)
        assert r.peak_activations == (pp + 1,) * pp
        r = simulate(dualpipev(pp // 2, m), costs)  # PP stages on PP/2 devices
        assert max(r.bubble) == pytest.approx(expected)
        assert r.peak_activations == (pp + 1,) * (pp // 2)


def test_table_cli_prints_every_schedule():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["table", "--microbatches", "32"])
    rows = [line for line in out.getvalue().splitlines() if line.startswith("| 16 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["GPipe", "1F1B", "ZB1P", "DualPipe", "DualPipeV"]
    # 1F1B at PP=16, 32 micro-batches, F=b=W=1: bubble 15*3 = 45 of a 32*3 + 45 makespan
    assert rows[1].split("|")[4].strip() == "45" and rows[1].split("|")[5].strip() == f"{45 / 141:.3f}"
