"""Compile-only scale check (issue 10 item 6; paper §3.1-3.2, §3.4): lower and compile the REAL training step for a
mesh on as many fake CPU devices as the mesh has, from abstract state, and read XLA's per-device memory analysis.

Nothing the size of the model is allocated: the train state is jax.ShapeDtypeStructs with their shardings
(train.loop.initial_state(abstract=True)), the batch a ShapeDtypeStruct; the step is train.loop's own
(make_train_step with step_config, pipeline_schedule, train_state_shardings), so what `dsv3 train` would run is
what is measured. `compile_memory` runs in-process on the devices jax already has; `compile_in_subprocess` runs
this module as a child with XLA_FLAGS=--xla_force_host_platform_device_count=N (`dsv3 plan --compile`), so the
caller needs no flag, and gets its JSON back.

Per device, XLA reports argument, output, temporary and alias (donated input reused as output) bytes; the peak is
argument + output + temp - alias. The CPU compile differs from a GPU one (docs/design.md, "Compile-only check"):
XLA's CPU backend runs BF16 dots in float32 and keeps float32 copies of their operands, it has no FP8 dot (E4M3
operands are upcast), and the CPU grouped expert GEMM pads every expert's rows to 64-row tiles where a GPU runs
ragged_dot; so the temporaries are an upper bound of a GPU compile's, and the arguments (the state) are exact.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

COMPILED_KEYS = ("devices", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes")
_TAG = "DSV3_COMPILE_RESULT "
# The program is compiled, never run: skip LLVM's optimisations of the generated CPU code, which take most of the
# compile time and do not change XLA's buffer assignment (the memory figures are the same; checked on `tiny`).
_FAST_CODEGEN = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_memory(cfg, mesh: str, *, seq_len: int, micro_batch: int = 1, microbatches: int = 1,
                   pipeline: str | None = None, precision: str = "bf16", remat: str = "paper", zero: str = "zero1",
                   devices=None) -> dict:
    """Lower and compile train.loop's train step for `mesh` (e.g. 'dp=2,ep=2') on the first N of `devices`
    (default jax.devices()), from abstract state; returns the per-device memory figures (COMPILED_KEYS) and
    the compile times in seconds. `microbatches`: micro-batches of `micro_batch` sequences per data-parallel rank
    in one step (pipeline micro-batches with `pipeline`, accumulated micro-batches without)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from dsv3_jax.precision import Precision
    from dsv3_jax.train.loop import RunArgs, initial_state, pipeline_schedule, step_config
    from dsv3_jax.train.optim import constant_schedule
    from dsv3_jax.train.packing import check_seq_len
    from dsv3_jax.train.step import make_train_step
    from sharding.mesh import build_mesh, parse_mesh_spec
    from sharding.rules import batch_spec

    for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("microbatches", microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"compile check: {name} must be a positive integer, got {value!r}")
    sizes = parse_mesh_spec(mesh)
    n = math.prod(sizes.values())
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(f"compile check: mesh {mesh} needs {n} devices, jax has {len(devices)} (run it through "
                         "compile_in_subprocess, which sets --xla_force_host_platform_device_count)")
    data_ranks = sizes["dp"] * sizes["ep"]
    if pipeline is not None:  # one step = one accumulated micro-batch, cut into `microbatches` pipeline ones
        k, m = 1, microbatches * micro_batch * data_ranks
    else:  # `microbatches` accumulated micro-batches of micro_batch sequences per rank
        k, m = microbatches, micro_batch * data_ranks
    args = RunArgs(workdir="", steps=1, preset=None, batch=k * m, micro_batch=m, seq_len=seq_len,
                   precision=precision, remat=remat, mesh=mesh, zero=zero, pipeline=pipeline,
                   microbatches=microbatches if pipeline is not None else None)
    check_seq_len(seq_len, cfg)
    schedule, layout = pipeline_schedule(args, cfg)
    jmesh = build_mesh(mesh, cfg, batch=m, devices=devices[:n])
    t0 = time.perf_counter()
    graphdef, optimizer, state, shardings = initial_state(cfg, Precision.named(precision), seed=0,
                                                          lr=constant_schedule(1e-4), mesh=jmesh, zero=zero,
                                                          abstract=True, pipeline=layout)
    step = make_train_step(graphdef, optimizer, step_config(args), jmesh, shardings, schedule,
                           layout=None if layout is None else layout[0])
    windows = jax.ShapeDtypeStruct((k, m, seq_len + 1), jnp.int32,
                                   sharding=NamedSharding(jmesh, batch_spec(3, batch_dim=1)))
    lowered = step.lower(state, windows)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=_FAST_CODEGEN)
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    if ma is None:
        raise ValueError(f"compile check: the {jax.default_backend()} backend gives no memory analysis")
    out = {"devices": n, "argument_bytes": int(ma.argument_size_in_bytes),
           "output_bytes": int(ma.output_size_in_bytes), "temp_bytes": int(ma.temp_size_in_bytes),
           "alias_bytes": int(ma.alias_size_in_bytes)}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    out.update(precision=precision, pipeline=pipeline, microbatches=microbatches, micro_batch=micro_batch,
               seq_len=seq_len, remat=remat, accumulated=k, sequences_per_step=k * m,
               lower_s=t1 - t0, compile_s=t2 - t1, backend=jax.default_backend())
    return out


def compile_with_fallback(cfg, mesh: str, *, precision: str = "bf16", **kw) -> dict:
    """compile_memory at `precision`; when fp8 is refused (a ValueError while tracing, e.g. under ep > 1), at
    bf16, with the refusal in 'fallback_reason'."""
    try:
        return compile_memory(cfg, mesh, precision=precision, **kw)
    except ValueError as e:
        if precision != "fp8" or "fp8" not in str(e):
            raise
        out = compile_memory(cfg, mesh, precision="bf16", **kw)
        out["fallback_reason"] = f"fp8 did not compile: {e}"
        return out


def compile_in_subprocess(cfg, mesh: str, *, timeout: float | None = None, **kw) -> dict:
    """compile_with_fallback in a child Python on as many fake CPU devices as `mesh` has (XLA_FLAGS appended with
    --xla_force_host_platform_device_count; JAX_PLATFORMS=cpu); the child's error becomes a ValueError."""
    from sharding.mesh import parse_mesh_spec

    n = math.prod(parse_mesh_spec(mesh).values())
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    root = str(pathlib.Path(__file__).resolve().parent.parent)  # the checkout that holds sharding/ and dsv3_jax/
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    request = json.dumps({"config": cfg.to_hf(), "mesh": mesh, **kw})
    try:
        proc = subprocess.run([sys.executable, "-m", "sharding.compile_check", request], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ValueError(f"compile check: mesh {mesh} did not compile within {timeout:g} s") from None
    for line in proc.stdout.splitlines():
        if line.startswith(_TAG):
            result = json.loads(line[len(_TAG):])
            if "error" in result:
                raise ValueError(f"compile check ({n} CPU devices, mesh {mesh}): {result['error']}")
            return result
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise ValueError(f"compile check: the child process ({n} CPU devices) exited with code {proc.returncode} "
                     f"without a result; its last output:\n{tail}")


def format_compiled(c: dict, hbm_bytes: float) -> str:
    """Readable lines: XLA's per-device figures of a compile_memory result beside the planner's (the keys
    planner_bytes, planner_state_bytes that `dsv3 plan --compile` adds)."""
    gib = 2 ** 30
    how = (f"{c['pipeline']} x {c['microbatches']} micro-batches" if c.get("pipeline")
           else f"{c['accumulated']} accumulated micro-batch(es)")
    lines = [f"  {'compiled train step, per device (XLA, ' + str(c['devices']) + ' CPU devices)':<62}{'GiB':>10}",
             f"    {c['precision']}, {how} of {c['micro_batch']} x {c['seq_len']} tokens per rank, remat "
             f"{c['remat']}; lowered in {c['lower_s']:.0f} s, compiled in {c['compile_s']:.0f} s"]
    if c.get("fallback_reason"):
        lines.append(f"    ({c['fallback_reason']}; compiled in bf16)")
    for label, key in (("arguments (train state, batch)", "argument_bytes"), ("outputs", "output_bytes"),
                       ("temporaries", "temp_bytes"), ("aliased (donated state reused as output)", "alias_bytes"),
                       ("peak = arguments + outputs + temporaries - aliased", "peak_bytes")):
        lines.append(f"  {label:<62}{c[key] / gib:10.2f}")
    if "planner_bytes" in c:
        lines += [f"  {'planner, same layout (FP32 weights held whole): state':<62}"
                  f"{c['planner_state_bytes'] / gib:10.2f}",
                  f"  {'planner, same layout: total':<62}{c['planner_bytes'] / gib:10.2f}",
                  f"  XLA / planner: arguments / state {c['argument_bytes'] / c['planner_state_bytes']:.2f}, "
                  f"peak / total {c['peak_bytes'] / c['planner_bytes']:.2f}"]
    verdict = "fits" if c["peak_bytes"] <= hbm_bytes else "DOES NOT FIT"
    lines.append(f"  compiled peak {c['peak_bytes'] / gib:.2f} GiB of {hbm_bytes / gib:.1f} GiB: {verdict}")
    return "\n".join(lines)


def _child(request: str) -> int:
    """Entry of the child process: one JSON request in argv, one tagged JSON line out."""
    try:
        from dsv3_jax.config import ModelConfig

        kw = json.loads(request)
        cfg = ModelConfig.from_hf(kw.pop("config"))
        result = compile_with_fallback(cfg, kw.pop("mesh"), **kw)
    except (ValueError, FileNotFoundError) as e:
        result = {"error": str(e)}
    except Exception as e:  # anything else still reaches the parent as one message
        result = {"error": f"{type(e).__name__}: {e}"}
    print(_TAG + json.dumps(result), flush=True)
    return 0 if "error" not in result else 2


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
