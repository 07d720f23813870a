"""Pipeline executor: runs a schedule of sharding/pipeline.py over the 'pp' axis of a mesh (paper §3.2.1).

Stage parameters live in a stored layout [ranks, homes, ...] sharded over 'pp': each stage once, on the rank that
runs it in the schedule's first chain (`stage_homes`), so a rank holds only its own stages. Inside the step each
rank holds the stage copies its schedule runs: DualPipe runs stage s on ranks s and PP-1-s, so rank
PP-1-s receives it by a `ppermute` from rank s, and the two copies' gradients (and aux) are summed back into the
stored one by the reverse `ppermute`; DualPipeV (stages r and 2n-1-r) and the one-direction schedules store every
stage they run. The edge parameters (embedding, head, ...) are replicated;
the ranks that hold the first or last stage use them and their gradients are summed over 'pp'. So with DualPipe
rank 0 runs embedding, first stage, last stage and head together, as §3.2 places them. (Stage parameters given
with a leading stage axis instead are gathered into the stored layout first, and their gradients scattered back.)

Execution is SPMD inside `jax.shard_map`, manual over the pipeline axis only (the mesh's other axes stay
automatic, so a stage's computation keeps its data and expert parallelism, the MoE's shard_map nested inside):
the per-rank op lists become a static tick table (list scheduling with unit cost per op, every dependency one tick
earlier), and a `lax.scan` over ticks runs, on every rank, a forward lane (F or nothing) and a backward lane (B, b,
W or nothing); an overlapped pair [F&B] uses both lanes in one tick.
After each tick the outputs move to their neighbours with two `ppermute`s (right, left); DualPipeV's turn on its
last rank is a local copy. Every rank keeps each in-flight micro-batch's stage input and output-gradient, in
buffer slots reused once the micro-batch's last backward op has read them (as many as micro-batches in flight);
B, b and W recompute the stage forward inside `jax.vjp` from the saved input (b differentiates with respect to the
input only, W with respect to the parameters only, from the saved (input, output-grad) pair).

The executor knows nothing of the model: a `PipelineModel` (embed, stage, head functions) says what a stage
computes; sharding/pipeline_transformer.py builds the one for DeepSeek-V3.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

from sharding.pipeline import Schedule, UnitCosts, simulate

_NONE, _RIGHT, _LEFT, _LOCAL = 0, 1, 2, 3
_BK = {"B": 1, "b": 2, "W": 3}
# tick-table columns: forward lane, then backward lane (kind 0 = idle), then the slot on the receiving rank of
# what each lane sends
_F_ON, _F_PH, _F_SLOT, _F_M, _F_FIRST, _F_LAST, _F_DEST = range(7)
_B_KIND, _B_PH, _B_SLOT, _B_M, _B_FIRST, _B_LAST, _B_DEST = range(7, 14)
_F_DSLOT, _B_DSLOT = 14, 15
_COLS = 16


@dataclasses.dataclass(frozen=True)
class PipelineModel:
    """A model cut into identical stages plus edges, as pure functions.

    embed(edge_params, inputs_m) -> h                before the first stage (inputs_m: one micro-batch of `inputs`)
    stage(stage_params, h, inputs_m)                 one stage (inputs_m for what the stage needs besides h, e.g.
        -> (h, loss_term, aux)                       attention masks; not differentiated); loss_term (scalar) is
                                                     added to the micro-batch's loss; aux (any pytree, e.g. expert
                                                     counts) is summed over micro-batches, not differentiated
    head(edge_params, h, inputs_m) -> (loss, aux)    after the last stage: the micro-batch's loss (scalar)

    The loss differentiated is the mean over micro-batches of (head loss + every stage's loss_term).
    """

    embed: Callable[[Any, Any], jax.Array]
    stage: Callable[[Any, jax.Array, Any], tuple[jax.Array, jax.Array, Any]]
    head: Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]


def tick_table(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """(table [ranks, ticks, 16] int32, stage_index [ranks, phases] int32): each op's tick is its start in
    `pipeline.simulate` with unit costs (an op runs at least one tick after its dependencies and after the rank's
    previous op); each micro-batch's buffer slot on a rank from `_slots`."""
    where: dict[tuple[int, int], tuple[int, int]] = {}  # (chain, stage) -> (rank, phase)
    for r, phases in enumerate(schedule.place):
        for p, cs in enumerate(phases):
            where[cs] = (r, p)
    if any(len(ph) != len(schedule.place[0]) for ph in schedule.place):
        raise ValueError(f"{schedule.name}: every rank must hold the same number of stages")
    last = schedule.num_stages - 1
    sim = simulate(schedule, UnitCosts())
    tick = {chunk: int(t) for ops, starts in zip(schedule.resolved(), sim.start) for op, t in zip(ops, starts)
            for chunk in op}
    n_ticks = int(sim.total)
    table = np.zeros((schedule.ranks, n_ticks, _COLS), np.int32)
    slot = _slots(tick, where, last)

    def dest(r, chain, stage, step):
        s2 = stage + step
        if s2 < 0 or s2 > last:
            return _NONE
        r2 = where[(chain, s2)][0]
        if abs(r2 - r) > 1:
            raise ValueError(f"{schedule.name}: stages {stage} and {s2} sit on ranks {r} and {r2}; the executor "
                             "only sends to neighbouring ranks")
        return {1: _RIGHT, -1: _LEFT, 0: _LOCAL}[r2 - r]

    for (kind, chain, stage, m), t in tick.items():
        r, p = where[(chain, stage)]
        first, is_last = int(stage == 0), int(stage == last)
        step = 1 if kind == "F" else -1 if kind in "Bb" else 0
        d = dest(r, chain, stage, step) if step else _NONE
        to = slot.get((chain, stage + step, m), 0) if d != _NONE else 0
        if kind == "F":
            row = table[r, t, _F_ON:_F_DEST + 1]
            if row[0]:
                raise ValueError(f"{schedule.name}: two forwards on rank {r} at tick {t}")
            row[:] = (1, p, slot[chain, stage, m], m, first, is_last, d)
            table[r, t, _F_DSLOT] = to
        else:
            row = table[r, t, _B_KIND:_B_DEST + 1]
            if row[0]:
                raise ValueError(f"{schedule.name}: two backward chunks on rank {r} at tick {t}")
            row[:] = (_BK[kind], p, slot[chain, stage, m], m, first, is_last, d)
            table[r, t, _B_DSLOT] = to
    stage_index = np.array([[s for _, s in ph] for ph in schedule.place], np.int32)
    return table, stage_index


def _slots(tick: dict, where: dict, last: int) -> dict:
    """{(chain, stage, m): buffer slot}: where the rank running (chain, stage) keeps micro-batch m's stage input
    and output gradient, from their first write to their last read; micro-batches whose lifetimes do not overlap
    share a slot, whichever of the rank's stages they are at, so a rank needs as many slots as it has
    micro-batches in flight (DualPipe: the number of ranks + 2, over both its stages), not one per micro-batch.
    Times within tick t: 4t the forward lane reads its input, 4t+1 it writes the embedding output (first stage)
    or the head input (last), 4t+2 the backward lane reads both, 4t+3 the arrivals from the neighbours are
    written."""
    span: dict = {}  # (chain, stage, m) -> [first write, last read]

    def use(key, time, write):
        lo, hi = span.get(key, (None, None))
        span[key] = (time if write and (lo is None or time < lo) else lo,
                     time if not write and (hi is None or time > hi) else hi)

    for (kind, chain, stage, m), t in tick.items():
        if kind == "F":
            if stage == 0 or stage == last:
                use((chain, stage, m), 4 * t + 1, True)
            if stage > 0:
                use((chain, stage, m), 4 * t, False)
            if stage < last:
                use((chain, stage + 1, m), 4 * t + 3, True)
        else:
            use((chain, stage, m), 4 * t + 2, False)
            if kind in "Bb" and stage > 0:
                use((chain, stage - 1, m), 4 * t + 3, True)
    slot, busy = {}, {}  # busy: rank -> per slot, the last read of its current micro-batch
    for key, (lo, hi) in sorted(span.items(), key=lambda kv: kv[1][0]):
        ends = busy.setdefault(where[key[:2]][0], [])
        free = [i for i, end in enumerate(ends) if end < lo]
        i = free[0] if free else len(ends)
        ends[i:i + 1] = [hi]
        slot[key] = i
    return slot


def stage_homes(schedule: Schedule) -> np.ndarray:
    """int32 [ranks, homes]: the stages each rank stores, each stage once, on the rank that runs it in the first
    chain (direction): DualPipe's stage s on rank s (its second copy, on rank PP-1-s, is built inside the step)."""
    homes: list[list[int]] = [[] for _ in range(schedule.ranks)]
    for r, phases in enumerate(schedule.place):
        homes[r] = [s for chain, s in phases if chain == 0]
    if sorted(s for h in homes for s in h) != list(range(schedule.num_stages)) or len(set(map(len, homes))) != 1:
        raise ValueError(f"{schedule.name}: its first chain does not place every stage once, equally over the ranks "
                         f"({homes}); the executor stores each stage on the rank of its first chain")
    return np.array(homes, np.int32)


def _copy_plan(schedule: Schedule, homes: np.ndarray) -> tuple[tuple, tuple]:
    """(held, arrivals): the stage copies each rank holds, and which of them each of its phases runs.

    A rank holds its stored stages (copies 0..homes-1, used in place) and then one copy per arrival: arrival a =
    (h, pairs) is a ppermute of every rank's stored[h] over `pairs` (src, dst), each rank sending and receiving at
    most once, so the copy costs one buffer on every rank. held[r][p] is the copy rank r's phase p runs. DualPipe's
    second copies (stage s also on rank PP-1-s) are a single arrival r -> PP-1-r; DualPipeV and the one-direction
    schedules store every stage they run (no arrival)."""
    where = {int(s): (r, h) for r in range(homes.shape[0]) for h, s in enumerate(homes[r])}
    homes_n = homes.shape[1]
    held = np.zeros((schedule.ranks, len(schedule.place[0])), np.int32)
    arrivals: list[tuple[int, list[tuple[int, int]]]] = []
    for p in range(held.shape[1]):
        for r, phases in enumerate(schedule.place):
            src, h = where[phases[p][1]]
            if src == r:
                held[r, p] = h
                continue
            for a, (ah, pairs) in enumerate(arrivals):  # an arrival already bringing it, or with room for it
                if ah == h and ((src, r) in pairs or all(s != src and d != r for s, d in pairs)):
                    break
            else:
                a, pairs = len(arrivals), []
                arrivals.append((h, pairs))
            if (src, r) not in pairs:
                pairs.append((src, r))
            held[r, p] = homes_n + a
    return tuple(map(tuple, held.tolist())), tuple((h, tuple(pairs)) for h, pairs in arrivals)


def _take(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _put(buf, i, value):
    """buf[i] = value."""
    return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), i, 0)


def program_shape(schedule: Schedule) -> tuple[int, int, int]:
    """(ticks, stages per rank, micro-batch slots per stage) of the compiled program that runs `schedule`."""
    table, stage_index = tick_table(schedule)
    return table.shape[1], stage_index.shape[1], _slot_count(table)


def _slot_count(table: np.ndarray) -> int:
    return int(max(table[..., _F_SLOT].max(), table[..., _B_SLOT].max())) + 1


def pipeline_value_and_grad(model: PipelineModel, schedule: Schedule, mesh: jax.sharding.Mesh, stage_params,
                            edge_params, inputs, *, axis: str = "pp", pad_to: tuple[int, int, int] | None = None,
                            stored: bool = False):
    """(loss, (stage_grads, edge_grads), (stage_aux, head_aux)) of the mean micro-batch loss, run as `schedule`
    over mesh axis `axis`; the aux outputs are summed over micro-batches (stage_aux laid out like stage_grads).

    stage_params: pytree whose leaves have a leading axis of schedule.num_stages, or with `stored` the stored
    layout [ranks, homes, ...] (rank r's entry h is stage `stage_homes(schedule)[r, h]`; keep it sharded over
    `axis`: each rank then reads only its own stages, a stage a schedule runs on a second rank (DualPipe) is sent
    there inside the step, and the copies' gradients are summed into the stored one; stage grads and aux come back
    in that layout, sharded the same way). edge_params: any pytree (replicated over `axis`, gradients summed);
    inputs: pytree whose leaves have a leading axis of schedule.microbatches (one entry per micro-batch; DualPipe
    sends micro-batches 0..M/2-1 forward from rank 0 and M/2..M-1 the other way). The hidden state passed between
    stages must have the same shape and dtype at every stage boundary. `pad_to` = (ticks, stages per rank, slots),
    each at least `program_shape(schedule)`'s, pads the program (idle ticks, an unused stage copy, unused buffer
    slots) so that schedules of different shapes share one compiled program.
    """
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")
    if mesh.shape[axis] != schedule.ranks:
        raise ValueError(f"schedule {schedule.name} is for {schedule.ranks} ranks but mesh axis {axis!r} has "
                         f"{mesh.shape[axis]} devices")
    homes = stage_homes(schedule)
    lead = homes.shape if stored else (schedule.num_stages,)
    for leaf in jax.tree.leaves(stage_params):
        if leaf.shape[:len(lead)] != lead:
            raise ValueError(f"stage_params leaves need a leading axis of {schedule.num_stages} stages"
                             + (f" in the stored layout {lead} (ranks, stages per rank)" if stored else "")
                             + f", got shape {leaf.shape}")
    for leaf in jax.tree.leaves(inputs):
        if leaf.shape[:1] != (schedule.microbatches,):
            raise ValueError(f"inputs leaves need a leading axis of {schedule.microbatches} micro-batches, got "
                             f"shape {leaf.shape}")
    table, stage_index = tick_table(schedule)
    need = (table.shape[1], stage_index.shape[1], _slot_count(table))
    ticks, phases, slots = need if pad_to is None else pad_to
    if ticks < need[0] or phases < need[1] or slots < need[2]:
        raise ValueError(f"pad_to {pad_to} is smaller than what {schedule.name} needs: (ticks, stages per rank, "
                         f"slots) = {need}")
    table = np.pad(table, ((0, 0), (0, ticks - need[0]), (0, 0)))
    held, arrivals = _copy_plan(schedule, homes)
    plan = (tuple(row + row[:1] * (phases - need[1]) for row in held), arrivals)  # padding phases: copy of phase 0
    # an Auto-typed view of the mesh: the executor only names the pipeline axis, inside its shard_map
    mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    run = _compiled(model, mesh, axis, slots, schedule.microbatches, plan)
    if stored:
        return run(jnp.asarray(table), stage_params, edge_params, inputs)
    flat = homes.reshape(-1)
    loss, (gs, ge), (sa, ha) = run(jnp.asarray(table), jax.tree.map(lambda a: a[homes], stage_params), edge_params,
                                   inputs)

    def per_stage(g):  # [ranks, homes, ...] -> [stages, ...]
        return jnp.zeros((schedule.num_stages,) + g.shape[2:], g.dtype).at[flat].set(g.reshape((-1,) + g.shape[2:]))

    return loss, (jax.tree.map(per_stage, gs), ge), (jax.tree.map(per_stage, sa), ha)


_CACHE: dict = {}


def _compiled(model: PipelineModel, mesh, axis: str, slots: int, microbatches: int, plan):
    key = (model, mesh, axis, slots, microbatches, plan)
    if key not in _CACHE:
        _CACHE[key] = jax.jit(lambda *a: _run(model, mesh, axis, slots, microbatches, plan, *a))
    return _CACHE[key]


def _gather_copies(stored, arrivals, axis) -> list[Callable[[], Any]]:
    """The stage copies this rank holds, as functions returning each one's pytree: its stored entries (`stored` is
    the rank's [1, homes, ...] block), then one per arrival (`_copy_plan`). A lane calls the one it runs inside its
    lax.switch branch: a stored stage is read in place there (indexed outside the tick loop, XLA copies it into the
    loop's state), and the copies are never stacked (a stack, and each lane's slice of it, would be two more
    copies of the rank's stages: 13 GB and 6.5 GB per device in FP32 at V3 under DualPipe)."""
    homes_n = jax.tree.leaves(stored)[0].shape[1]
    own = [lambda h=h: jax.tree.map(lambda a: a[0, h], stored) for h in range(homes_n)]
    got = [jax.lax.ppermute(own[h](), axis, list(pairs)) for h, pairs in arrivals]
    return own + [lambda v=v: v for v in got]


def _scatter_copies(per_copy, homes_n, arrivals, axis):
    """[homes, ...] sums of per-copy values (gradients, aux; one pytree per held copy) into each stage's stored
    entry: an arrival's values go back to the rank it came from."""
    out = list(per_copy[:homes_n])
    for (h, pairs), value in zip(arrivals, per_copy[homes_n:]):
        back = jax.lax.ppermute(value, axis, [(d, s) for s, d in pairs])  # zeros on a rank that sent nothing
        out[h] = jax.tree.map(jnp.add, out[h], back)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


def _run(model: PipelineModel, mesh, axis, slots, microbatches, plan, table, stored, edge_params, inputs):
    held, arrivals = plan
    ranks, homes_n = table.shape[0], jax.tree.leaves(stored)[0].shape[1]
    copies_n = homes_n + len(arrivals)
    one_stage = jax.tree.map(lambda a: a[0, 0], stored)
    inv_m = jnp.float32(1.0 / microbatches)
    x0 = jax.eval_shape(model.embed, edge_params, _take(inputs, 0))
    h_shape, _, aux_s = jax.eval_shape(model.stage, one_stage, x0, _take(inputs, 0))
    _, aux_h = jax.eval_shape(model.head, edge_params, x0, _take(inputs, 0))
    stage_fn = lambda p, x, inp: model.stage(p, x, inp)[:2]  # noqa: E731
    head_fn = lambda e, h, inp: jnp.asarray(model.head(e, h, inp)[0], jnp.float32)  # noqa: E731
    zeros_of = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)  # noqa: E731
    if (h_shape.shape, h_shape.dtype) != (x0.shape, x0.dtype):
        raise ValueError(f"stage output {h_shape} differs from the stage input {x0.shape} {x0.dtype}; the pipeline "
                         "needs one hidden shape at every stage boundary")
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731

    def per_rank(table, stored, edge, inputs):
        table = table[0]
        r_me = jax.lax.axis_index(axis)
        # The barriers order the copies' ppermutes after every input and before every output on all devices alike:
        # the CPU runtime may otherwise run independent collectives in a different order on different devices
        # and deadlock (seen with DualPipe: one device in the pp ppermute, its ep partner in an all-gather).
        stored, edge, inputs = jax.lax.optimization_barrier((stored, edge, inputs))
        local = _gather_copies(stored, arrivals, axis)  # the stage copies this rank holds
        copy_of = jnp.asarray(held, jnp.int32)[r_me]  # [phases] -> index into local

        def on_phase(fn, ph):  # fn(stage params of phase ph), chosen by a switch (no copy of the weights)
            return jax.lax.switch(copy_of[ph], [lambda get=get: fn(get()) for get in local])

        zeros_h = jnp.zeros(x0.shape, x0.dtype)
        zero_e = jax.tree.map(jnp.zeros_like, edge)
        # x[i]: the stage input of the micro-batch in slot i (the embedding output on the first stage); g[i]: its
        # output gradient, or on the last stage its output (the head's input). Slot `slots` is a discard slot.
        buf = jnp.zeros((slots + 1,) + x0.shape, x0.dtype)
        carry = dict(x=buf, g=buf, gp=[jax.tree.map(jnp.zeros_like, get()) for get in local], ge=zero_e,
                     loss=jnp.zeros((), jnp.float32),
                     sa=jax.tree.map(lambda a: jnp.zeros((copies_n,) + a.shape, a.dtype), aux_s), ha=zeros_of(aux_h))

        def tick(c, row):
            x_buf, g_buf = c["x"], c["g"]
            # ---- forward lane: [embed] -> stage -> [head + loss]
            fp, fk, fm = row[_F_PH], row[_F_SLOT], row[_F_M]
            f_on, ffirst, flast = row[_F_ON] == 1, row[_F_FIRST] == 1, row[_F_LAST] == 1
            inp = _take(inputs, fm)

            def fwd():
                x = jax.lax.cond(ffirst, lambda: model.embed(edge, inp).astype(x0.dtype), lambda: x_buf[fk])
                h, term, aux = on_phase(lambda sp: model.stage(sp, x, inp), fp)
                loss, head_aux = jax.lax.cond(flast, lambda: (lambda o: (f32(o[0]), o[1]))(model.head(edge, h, inp)),
                                              lambda: (f32(0), zeros_of(aux_h)))
                return x, h, f32(term) + loss, aux, head_aux

            x_f, h_f, loss, aux, head_aux = jax.lax.cond(
                f_on, fwd, lambda: (zeros_h, zeros_h, f32(0), zeros_of(aux_s), zeros_of(aux_h)))
            x_buf = _put(x_buf, jnp.where(f_on & ffirst, fk, slots), x_f)
            g_buf = _put(g_buf, jnp.where(f_on & flast, fk, slots), h_f)

            # ---- backward lane: [head vjp] -> stage vjp (input and/or weights) -> [embed vjp]
            kind, bp, bk, bm = row[_B_KIND], row[_B_PH], row[_B_SLOT], row[_B_M]
            bfirst, blast = row[_B_FIRST] == 1, row[_B_LAST] == 1
            inp_b = _take(inputs, bm)
            need_w = (kind == _BK["B"]) | (kind == _BK["W"])
            # the first stage has no input gradient to send; its W needs one for the embedding's weights
            need_x = jnp.where(bfirst, need_w, (kind == _BK["B"]) | (kind == _BK["b"]))

            def head_vjp():
                _, vjp = jax.vjp(lambda e, h: head_fn(e, h, inp_b), edge, g_buf[bk])
                return vjp(inv_m)

            de_head, g_out = jax.lax.cond((kind > 0) & blast, head_vjp, lambda: (zero_e, g_buf[bk]))
            # edge gradients go into the accumulator as soon as they exist (the head's [D, V] one is 3.7 GB at V3)
            ge = jax.tree.map(lambda acc, a: acc + jnp.where(need_w, a, 0), c["ge"], de_head)
            x_in, cot = x_buf[bk], (g_out, inv_m)
            zero_p = jax.tree.map(jnp.zeros_like, local[0]())

            def stage_vjp(wrt_x: bool, wrt_w: bool):
                def run(sp):
                    if wrt_x and wrt_w:
                        _, vjp = jax.vjp(lambda p, x: stage_fn(p, x, inp_b), sp, x_in)
                        return vjp(cot)
                    if wrt_x:
                        return zero_p, jax.vjp(lambda x: stage_fn(sp, x, inp_b), x_in)[1](cot)[0]
                    return jax.vjp(lambda p: stage_fn(p, x_in, inp_b), sp)[1](cot)[0], zeros_h
                return lambda: on_phase(run, bp)

            branches = (lambda: (zero_p, zeros_h), stage_vjp(True, False), stage_vjp(False, True),
                        stage_vjp(True, True))
            dp, dx = jax.lax.switch(need_x.astype(jnp.int32) + 2 * need_w.astype(jnp.int32), branches)

            def embed_vjp():
                _, vjp = jax.vjp(lambda e: model.embed(e, inp_b).astype(x0.dtype), edge)
                return vjp(dx)[0]

            de_embed = jax.lax.cond(need_w & bfirst, embed_vjp, lambda: zero_e)
            gp = [jax.tree.map(lambda acc, d: acc + jnp.where(copy_of[bp] == k, d, 0), g, dp)
                  for k, g in enumerate(c["gp"])]
            ge = jax.tree.map(jnp.add, ge, de_embed)

            # ---- sends: slot 0 = forward activation, slot 1 = backward gradient
            def lane(value, dest, dslot, want):  # (value, its slot on the receiving rank)
                ok = dest == want
                return jnp.where(ok, value, jnp.zeros_like(value)), jnp.where(ok, dslot, slots)

            msgs = {}
            for d in (_RIGHT, _LEFT, _LOCAL):
                (fv, fm_), (bv, bm_) = lane(h_f, row[_F_DEST], row[_F_DSLOT], d), lane(dx, row[_B_DEST],
                                                                                      row[_B_DSLOT], d)
                msgs[d] = (jnp.stack([fv, bv]), jnp.stack([fm_, bm_]))
            r = jax.lax.axis_index(axis)
            arrivals = [(msgs[_LOCAL], True)]
            if ranks > 1:
                arrivals.append((jax.lax.ppermute(msgs[_RIGHT], axis, [(i, i + 1) for i in range(ranks - 1)]),
                                 r > 0))
                arrivals.append((jax.lax.ppermute(msgs[_LEFT], axis, [(i + 1, i) for i in range(ranks - 1)]),
                                 r < ranks - 1))
            for (vals, meta), ok in arrivals:  # a rank without that neighbour receives zeros: discard them
                x_buf = _put(x_buf, jnp.where(ok, meta[0], slots), vals[0])
                g_buf = _put(g_buf, jnp.where(ok, meta[1], slots), vals[1])
            sa = jax.tree.map(lambda acc, a: acc.at[copy_of[fp]].add(a), c["sa"], aux)
            ha = jax.tree.map(jnp.add, c["ha"], head_aux)
            return dict(x=x_buf, g=g_buf, gp=gp, ge=ge, loss=c["loss"] + loss * inv_m, sa=sa, ha=ha), None

        c, _ = jax.lax.scan(tick, carry, table)
        gp, sa = _scatter_copies([(g, _take(c["sa"], k)) for k, g in enumerate(c["gp"])], homes_n, arrivals, axis)
        gp, sa, loss, ge, ha = jax.lax.optimization_barrier((gp, sa, c["loss"], c["ge"], c["ha"]))
        return (jax.lax.psum(loss, axis), jax.tree.map(lambda a: a[None], (gp, sa)), jax.lax.psum((ge, ha), axis))

    specs_stored = jax.tree.map(lambda _: P(axis), stored)
    specs_edge = jax.tree.map(lambda _: P(), edge_params)
    specs_in = jax.tree.map(lambda _: P(), inputs)
    specs_sa, specs_ha = jax.tree.map(lambda _: P(axis), aux_s), jax.tree.map(lambda _: P(), aux_h)
    loss, (g_stored, aux_stored), (g_edge, aux_head) = jax.shard_map(
        per_rank, mesh=mesh, in_specs=(P(axis), specs_stored, specs_edge, specs_in),
        out_specs=(P(), (specs_stored, specs_sa), (specs_edge, specs_ha)), axis_names={axis}, check_vma=False)(
            table, stored, edge_params, inputs)
    return loss, (g_stored, g_edge), (aux_stored, aux_head)
