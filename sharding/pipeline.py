"""Pipeline schedules as data, and a timing simulator (paper §3.2.1, Table 2; reference §8).

A schedule is one list of ops per rank. An op is one chunk or two overlapped chunks; a chunk is
`F` (forward of one stage), `B` (full backward), `b` (backward for inputs only, its weight part deferred) or `W`
(the oldest deferred weight part of this rank, FIFO as DualPipe's WeightGradStore). Chunks carry a local phase
and a micro-batch index and print as in the DualPipe reference: `F0:3`, `b1:0`, `W`, `[F0:3&B1:1]`.

* Local phase p of rank r names one of the (at most two) stages the rank holds. Single-direction schedules
  (GPipe, 1F1B, ZB1P) use phase 0 only. DualPipe: phase 0 is the direction in which the rank is in the first
  half of the pipeline (so on ranks >= PP/2 phase 0 is direction 1). DualPipeV: phase 0 = stage r, phase 1 =
  stage 2n-1-r.
* ":k" is the micro-batch index within its direction (DualPipe: direction d's micro-batch k is global
  micro-batch d*C + k) or, for the other schedules, the global micro-batch index.

`python -m sharding.pipeline show dualpipe --ranks 4 --microbatches 8` prints a schedule;
`python -m sharding.pipeline table` prints the bubble table of docs/design.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import deque
from typing import Sequence

SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One stage's worth of work: kind F/B/b/W, local phase, micro-batch index within its direction."""

    kind: str
    phase: int
    mb: int

    def __str__(self) -> str:
        return "W" if self.kind == "W" else f"{self.kind}{self.phase}:{self.mb}"


Op = tuple[Chunk, ...]  # one chunk, or two chunks overlapped in one slot


def format_op(op: Op) -> str:
    """`F0:3`, `W`, or `[F0:3&B1:1]` for an overlapped pair."""
    return str(op[0]) if len(op) == 1 else "[" + "&".join(str(c) for c in op) + "]"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-rank op lists plus where each (rank, phase) sits: chain (direction) and stage index along it.

    `place[r][p] = (chain, stage)`. Micro-batch k of chain c is global micro-batch `c * per_chain + k`; every
    chain runs through model stages 0..num_stages-1 in order, `stage` being the model stage's index.
    """

    name: str
    ranks: int
    microbatches: int
    num_stages: int
    chains: int
    ops: tuple[tuple[Op, ...], ...]
    place: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def per_chain(self) -> int:
        return self.microbatches // self.chains

    def stage_rank(self, chain: int, stage: int) -> tuple[int, int]:
        """(rank, phase) that runs `stage` of `chain`."""
        for r, phases in enumerate(self.place):
            for p, cs in enumerate(phases):
                if cs == (chain, stage):
                    return r, p
        raise KeyError((chain, stage))

    def lines(self) -> list[str]:
        """`rank r: OP OP ...` for each rank."""
        return [f"rank {r}: " + " ".join(format_op(op) for op in ops) for r, ops in enumerate(self.ops)]

    def resolved(self) -> list[list[tuple[tuple[str, int, int, int], ...]]]:
        """Ops with every chunk as (kind, chain, stage, global micro-batch); W takes the rank's oldest b."""
        out = []
        for r, ops in enumerate(self.ops):
            pending: deque = deque()
            rank_ops = []
            for op in ops:
                chunks = []
                for c in op:
                    if c.kind == "W":
                        if not pending:
                            raise ValueError(f"{self.name}: rank {r} has a W with no deferred b before it")
                        chunks.append(("W",) + pending.popleft())
                        continue
                    chain, stage = self.place[r][c.phase]
                    key = (chain, stage, chain * self.per_chain + c.mb)
                    if c.kind == "b":
                        pending.append(key)
                    chunks.append((c.kind,) + key)
                rank_ops.append(tuple(chunks))
            if pending:
                raise ValueError(f"{self.name}: rank {r} ends with {len(pending)} b chunks whose W never runs")
            out.append(rank_ops)
        return out


def _check_counts(ranks: int, microbatches: int) -> None:
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")


def _single(name: str, ranks: int, microbatches: int, ops) -> Schedule:
    return Schedule(name, ranks, microbatches, ranks, 1, tuple(tuple(o) for o in ops),
                    tuple(((0, r),) for r in range(ranks)))


def _c(kind: str, phase: int, mb: int) -> Op:
    return (Chunk(kind, phase, mb),)


def gpipe(ranks: int, microbatches: int) -> Schedule:
    """GPipe: all forwards, then all backwards (micro-batch order)."""
    _check_counts(ranks, microbatches)
    ops = [[_c("F", 0, k) for k in range(microbatches)] + [_c("B", 0, k) for k in range(microbatches)]
           for _ in range(ranks)]
    return _single("GPipe", ranks, microbatches, ops)


def one_f_one_b(ranks: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): rank r runs PP-1-r warm-up forwards, then alternates F and B, then drains B."""
    _check_counts(ranks, microbatches)
    if microbatches < ranks:
        raise ValueError(f"1f1b needs microbatches >= ranks (got {microbatches} < {ranks})")
    ops = []
    for r in range(ranks):
        warm = ranks - 1 - r
        seq = [_c("F", 0, k) for k in range(warm)]
        for i in range(microbatches - warm):
            seq += [_c("F", 0, warm + i), _c("B", 0, i)]
        seq += [_c("B", 0, k) for k in range(microbatches - warm, microbatches)]
        ops.append(seq)
    return _single("1F1B", ranks, microbatches, ops)


def zb1p(ranks: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "ZB1P"): 1F1B with B split into b and W. Rank r holds back r W's in the steady
    phase and runs them in the drain, where it would otherwise wait; the activation peak stays 1F1B's (PP)."""
    _check_counts(ranks, microbatches)
    if microbatches < ranks:
        raise ValueError(f"zb1p needs microbatches >= ranks (got {microbatches} < {ranks})")
    ops = []
    for r in range(ranks):
        warm = ranks - 1 - r
        seq = [_c("F", 0, k) for k in range(warm)]
        w_done = 0
        for i in range(microbatches - warm):
            seq += [_c("F", 0, warm + i), _c("b", 0, i)]
            if i >= r:
                seq.append(_c("W", 0, -1))
                w_done += 1
        for k in range(microbatches - warm, microbatches):
            seq.append(_c("b", 0, k))
            seq.append(_c("W", 0, -1))
            w_done += 1
        seq += [_c("W", 0, -1)] * (microbatches - w_done)
        ops.append(seq)
    return _single("ZB1P", ranks, microbatches, ops)


def _dual_steps(n: int, hr: int, chunks: int, middle: bool) -> list[Op]:
    """Steps 1-8 of DualPipe(V)::step (reference §8.2) for half-rank hr of n, C chunks per phase."""
    seq: list[Op] = []
    nxt = {("F", 0): 0, ("F", 1): 0, ("B", 0): 0, ("B", 1): 0}

    def f(p):
        k = nxt["F", p]
        nxt["F", p] += 1
        return Chunk("F", p, k)

    def b(p, zb=False):
        k = nxt["B", p]
        nxt["B", p] += 1
        return Chunk("b" if zb else "B", p, k)

    w = (Chunk("W", 0, -1),)
    for _ in range(2 * (n - hr - 1)):                     # 1: F0
        seq.append((f(0),))
    for _ in range(hr + 1):                               # 2: F0 F1
        seq += [(f(0),), (f(1),)]
    for _ in range(n - hr - 1):                           # 3: b1 W F1
        seq += [(b(1, zb=True),), w, (f(1),)]
    for i in range(chunks - 2 * n + hr + 1):              # 4: [F0&B1] [F1&B0]
        if i == 0 and middle:
            seq += [(f(0),), (b(1),)]
        else:
            seq.append((f(0), b(1)))
        seq.append((f(1), b(0)))
    for _ in range(n - hr - 1):                           # 5: B1 [F1&B0]
        seq += [(b(1),), (f(1), b(0))]
    zb = False
    for i in range(hr + 1):                               # 6: B1 B0, zero-bubble from the middle on
        if i == (hr + 1) // 2 and hr % 2 == 1:
            zb = True
        seq.append((b(1, zb),))
        if i == (hr + 1) // 2 and hr % 2 == 0:
            zb = True
        seq.append((b(0, zb),))
    for _ in range(n - hr - 1):                           # 7: W b0
        seq += [w, (b(0, zb=True),)]
    seq += [w] * (hr + 1)                                 # 8: W
    return seq


def dualpipe(ranks: int, microbatches: int) -> Schedule:
    """DualPipe: rank r holds stages r and PP-1-r; half the micro-batches enter at rank 0, half at rank PP-1."""
    _check_counts(ranks, microbatches)
    if ranks % 2:
        raise ValueError(f"dualpipe needs an even number of ranks, got {ranks}")
    if microbatches % 2:
        raise ValueError(f"dualpipe needs an even number of micro-batches, got {microbatches}")
    if microbatches < 2 * ranks:
        raise ValueError(f"dualpipe needs microbatches >= 2 * ranks (got {microbatches} < {2 * ranks})")
    n, c = ranks // 2, microbatches // 2
    ops, place = [], []
    for r in range(ranks):
        hr = min(r, ranks - 1 - r)
        ops.append(tuple(_dual_steps(n, hr, c, middle=hr == n - 1)))
        first_half = r < n
        # phase 0 = the direction in which this rank is in the first half; direction 1 runs stage s on rank PP-1-s
        d0 = 0 if first_half else 1
        place.append(tuple((d, r if d == 0 else ranks - 1 - r) for d in (d0, 1 - d0)))
    return Schedule("DualPipe", ranks, microbatches, ranks, 2, tuple(ops), tuple(place))


def dualpipev(ranks: int, microbatches: int) -> Schedule:
    """DualPipeV: n ranks, 2n stages in a V (rank r holds stages r and 2n-1-r); input and loss on rank 0."""
    _check_counts(ranks, microbatches)
    if microbatches < 2 * ranks:
        raise ValueError(f"dualpipev needs microbatches >= 2 * ranks (got {microbatches} < {2 * ranks})")
    ops = tuple(tuple(_dual_steps(ranks, r, microbatches, middle=r == ranks - 1)) for r in range(ranks))
    place = tuple(((0, r), (0, 2 * ranks - 1 - r)) for r in range(ranks))
    return Schedule("DualPipeV", ranks, microbatches, 2 * ranks, 1, ops, place)


_BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}


def make_schedule(name: str, ranks: int, microbatches: int) -> Schedule:
    """The named schedule (one of SCHEDULES) for `ranks` pipeline ranks and `microbatches` micro-batches."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {SCHEDULES}")
    return _BUILDERS[name](ranks, microbatches)


# ---------------------------------------------------------------------------------------------------------------
# Simulator


@dataclasses.dataclass(frozen=True)
class Costs:
    """Chunk times. B is the full backward (b + W); `fb` is an overlapped F&B slot (default F + B); `p2p` is the
    latency of a send between different ranks."""

    f: float = 1.0
    b: float = 1.0  # backward for inputs only
    w: float = 1.0  # backward for weights
    fb: float | None = None
    p2p: float = 0.0

    @property
    def full_b(self) -> float:
        return self.b + self.w

    def of(self, op) -> float:
        kinds = tuple(c[0] for c in op)
        single = {"F": self.f, "B": self.full_b, "b": self.b, "W": self.w}
        if len(kinds) == 1:
            return single[kinds[0]]
        if sorted(kinds) == ["B", "F"] and self.fb is not None:
            return self.fb
        return sum(single[k] for k in kinds)


@dataclasses.dataclass(frozen=True)
class UnitCosts(Costs):
    """Every op, overlapped or not, takes one time unit: the pipeline executor's ticks (pipeline_exec.tick_table)."""

    def of(self, op) -> float:
        return 1.0


@dataclasses.dataclass(frozen=True)
class SimResult:
    """Per-rank (start, end) of every op, the makespan, idle time per rank and peak in-flight activations."""

    start: tuple[tuple[float, ...], ...]
    end: tuple[tuple[float, ...], ...]
    total: float
    busy: tuple[float, ...]
    bubble: tuple[float, ...]  # total - busy, per rank
    peak_activations: tuple[int, ...]

    @property
    def bubble_fraction(self) -> float:
        return sum(self.bubble) / (self.total * len(self.bubble))


def _deps(kind: str, chain: int, stage: int, mb: int, last: int):
    """Chunks (kind set, chain, stage, mb) this chunk waits for."""
    if kind == "F":
        return [(("F",), chain, stage - 1, mb)] if stage > 0 else []
    if kind in ("B", "b"):
        d = [(("F",), chain, stage, mb)]
        if stage < last:
            d.append((("B", "b"), chain, stage + 1, mb))
        return d
    return [(("b",), chain, stage, mb)]  # W


def simulate(schedule: Schedule, costs: Costs = Costs()) -> SimResult:
    """As-soon-as-possible timing of the per-rank op lists under the stage dependencies; ValueError on deadlock."""
    ops = schedule.resolved()
    last = schedule.num_stages - 1
    done: dict[tuple, tuple[float, int]] = {}  # (kind, chain, stage, mb) -> (end time, rank)
    pos = [0] * schedule.ranks
    free = [0.0] * schedule.ranks
    start = [[0.0] * len(o) for o in ops]
    end = [[0.0] * len(o) for o in ops]
    remaining = sum(len(o) for o in ops)
    while remaining:
        progressed = False
        for r in range(schedule.ranks):
            while pos[r] < len(ops[r]):
                op = ops[r][pos[r]]
                ready = free[r]
                ok = True
                for kind, chain, stage, mb in op:
                    for kinds, c2, s2, m2 in _deps(kind, chain, stage, mb, last):
                        hit = next((done[(k, c2, s2, m2)] for k in kinds if (k, c2, s2, m2) in done), None)
                        if hit is None:
                            ok = False
                            break
                        t, src = hit
                        ready = max(ready, t + (costs.p2p if src != r else 0.0))
                    if not ok:
                        break
                if not ok:
                    break
                t0, t1 = ready, ready + costs.of(op)
                start[r][pos[r]], end[r][pos[r]] = t0, t1
                for chunk in op:
                    done[chunk] = (t1, r)
                free[r] = t1
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: format_op(schedule.ops[r][pos[r]]) for r in range(schedule.ranks) if pos[r] < len(ops[r])}
            raise ValueError(f"{schedule.name}: schedule deadlocks; ranks wait at {stuck}")
    total = max(free)
    busy = tuple(sum(costs.of(op) for op in o) for o in ops)
    peaks = []
    for o in ops:
        live = peak = 0
        for op in o:
            live += sum(c[0] == "F" for c in op)
            peak = max(peak, live)
            live -= sum(c[0] in ("B", "b") for c in op)
        peaks.append(peak)
    return SimResult(tuple(map(tuple, start)), tuple(map(tuple, end)), total, busy,
                     tuple(total - b for b in busy), tuple(peaks))


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _stages_to_ranks(name: str, stages: int) -> int:
    return stages // 2 if name == "dualpipev" else stages


def bubble_table(stage_counts: Sequence[int] = (4, 8, 16), microbatches: int = 32,
                 costs: Costs = Costs()) -> str:
    """Markdown table: for PP stages, each schedule's devices, worst-rank bubble, bubble fraction, peak activations."""
    fb = costs.of((("F",), ("B",)))
    rows = [f"micro-batches {microbatches}; F = {costs.f:g}, b = {costs.b:g}, W = {costs.w:g} "
            f"(B = {costs.full_b:g}), F&B = {fb:g}, P2P latency {costs.p2p:g}",
            "",
            "| PP (stages) | schedule | devices | bubble (worst rank) | bubble fraction | peak activations |",
            "|---|---|---|---|---|---|"]
    for pp in stage_counts:
        for name in SCHEDULES:
            s = make_schedule(name, _stages_to_ranks(name, pp), microbatches)
            r = simulate(s, costs)
            rows.append(f"| {pp} | {s.name} | {s.ranks} | {max(r.bubble):g} | {r.bubble_fraction:.3f} "
                        f"| {max(r.peak_activations)} |")
    return "\n".join(rows)


def _costs_arg(text: str) -> Costs:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--costs must be comma-separated numbers F,b,W[,F&B], got {text!r}") from None
    if len(vals) not in (3, 4) or any(v < 0 for v in vals):
        raise ValueError(f"--costs must be 3 or 4 non-negative numbers F,b,W[,F&B], got {text!r}")
    return Costs(vals[0], vals[1], vals[2], vals[3] if len(vals) == 4 else None)


def main(argv: Sequence[str] | None = None) -> None:
    """`show NAME --ranks R --microbatches M [--costs F,b,W[,F&B]]` or `table [--microbatches M] [--costs ...]`."""
    parser = argparse.ArgumentParser(prog="python -m sharding.pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print one schedule, one line per rank")
    show.add_argument("name", choices=SCHEDULES)
    show.add_argument("--ranks", type=int, required=True)
    show.add_argument("--microbatches", type=int, required=True)
    show.add_argument("--costs", help="also simulate with chunk costs F,b,W[,F&B]")
    table = sub.add_parser("table", help="bubble table for PP = 4, 8, 16 stages")
    table.add_argument("--microbatches", type=int, default=32)
    table.add_argument("--costs", default="1,1,1")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "show":
            s = make_schedule(args.name, args.ranks, args.microbatches)
            print(f"=== {s.name} ranks={s.ranks} chunks={s.microbatches}")
            print("\n".join(s.lines()))
            if args.costs:
                r = simulate(s, _costs_arg(args.costs))
                print(f"total {r.total:g}; bubble per rank {[round(b, 6) for b in r.bubble]}; "
                      f"peak activations per rank {list(r.peak_activations)}")
        else:
            print(bubble_table(microbatches=args.microbatches, costs=_costs_arg(args.costs)))
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
