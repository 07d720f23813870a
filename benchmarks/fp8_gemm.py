"""Block-scaled FP8 GEMM (pallas_kernels.fp8_gemm) against jnp.dot in bf16 at DeepSeek-V3's GEMM shapes
(reference §5.2: M 4096, (K, N) from DeepGEMM's test list), in one run; TFLOP/s of both and their ratio.

On a Hopper GPU both FP8 kernels run compiled: the Mosaic GPU one (FP8 wgmma, the default there; "fp8") and the
Triton one ("fp8_triton", tiles converted to bf16 for the MMA); --tune also times a sweep of Mosaic tile configs
per shape. On the CPU there is no FP8 kernel to time: the kernel runs in Pallas interpret mode next to the jnp
reference (``fp8_gemm_ref``), at a reduced M (128 unless --m is given).

Protocol (benchmarks/protocol.py): the load average is checked first, the kernels of a shape are timed interleaved,
each --repeats times (a run: the median of --reps calls), and every figure is the median over the runs (min, max).

    python benchmarks/fp8_gemm.py [--json] [--shapes 7168x2112 ...] [--m 4096] [--reps N] [--repeats N] [--tune]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.fp8 import act_quant, calc_diff, weight_quant
from pallas_kernels import fp8_gemm
from pallas_kernels.fp8_gemm_mosaic import MosaicConfig
from protocol import add_repeats_arg, check_repeats, header, interleave, machine_state, pair_arg, summarize  # beside this file

SHAPES_KN = ((7168, 2112), (1536, 24576), (512, 32768), (16384, 7168), (7168, 4096), (2048, 7168))
GPU_M, CPU_M = 4096, 128
TUNE = [MosaicConfig(tile_m=m, tile_n=n, k_per_step=k, max_concurrent_steps=s)
        for m, n in ((64, 128), (128, 64), (64, 64), (64, 256), (128, 128)) for k in (1, 2) for s in (2, 4)]


def _timer(fn, args, reps: int, inner: int = 1):
    """(run, first output): ``fn`` jitted and compiled ahead of time; run() is the median over ``reps`` of the wall
    time per call of ``inner`` back-to-back calls (several on a GPU, where one call is shorter than its dispatch)."""
    compiled = jax.jit(fn).lower(*args).compile()
    out = jax.block_until_ready(compiled(*args))

    def run() -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(inner):
                last = compiled(*args)
            jax.block_until_ready(last)
            times.append((time.perf_counter() - t) / inner)
        return float(np.median(times))

    return run, out


def _max_err(out, ref) -> float:
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))


def _tune(args, reps: int, flops: float, ref) -> list[dict]:
    """TFLOP/s of each Mosaic config of TUNE that compiles (its error otherwise), and its max error vs ``ref``."""
    rows = []
    for cfg in TUNE:
        row = {"tile_m": cfg.tile_m, "tile_n": cfg.tile_n, "k_per_step": cfg.k_per_step,
               "max_concurrent_steps": cfg.max_concurrent_steps}
        try:
            run, out = _timer(lambda *a, c=cfg: fp8_gemm(*a, backend="mosaic", mosaic=c), args, reps, inner=10)
            row.update(tflops=flops / run() / 1e12, max_abs_err_vs_ref=_max_err(out, ref))
        except Exception as e:  # a config that does not fit (registers, shared memory) is reported, not fatal
            row["error"] = f"{type(e).__name__}: {(str(e) or repr(e)).splitlines()[0][:160]}"
        rows.append(row)
    return rows


def bench_shape(m: int, k: int, n: int, on_gpu: bool, reps: int, repeats: int, tune: bool = False) -> dict:
    """Time one (M, K, N), interleaved ``repeats`` times: the FP8 kernel, the jnp reference (CPU only) and the
    bf16 jnp.dot; each figure the median over the repeats, with _median/_min/_max."""
    kx, kw = jax.random.split(jax.random.key(k * 100003 + n))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (n, k), jnp.bfloat16)
    args = jax.block_until_ready((*act_quant(x), *weight_quant(w)))
    flops = 2.0 * m * n * k
    inner = 10 if on_gpu else 1
    runners, extra = {}, {}
    runners["fp8"], out_fp8 = _timer(lambda *a: fp8_gemm(*a, impl="pallas", interpret=not on_gpu), args, reps,
                                     inner)
    runners["bf16"], out_bf16 = _timer(lambda a, b: jnp.dot(a, b.T), (x, w), reps, inner)
    if on_gpu:
        runners["fp8_triton"], _ = _timer(lambda *a: fp8_gemm(*a, impl="pallas", backend="triton"), args, reps,
                                          inner)
        ref = fp8_gemm(*args, impl="ref")
        extra["max_abs_err_vs_ref"] = _max_err(out_fp8, ref)
        if tune:
            extra["tune"] = _tune(args, reps, flops, ref)
    else:
        runners["fp8_ref"], _ = _timer(lambda *a: fp8_gemm(*a, impl="ref"), args, reps)
    runs = interleave(runners, repeats)
    rows = []
    for r in range(repeats):
        row = {"fp8_s": runs["fp8"][r], "bf16_s": runs["bf16"][r]}
        for name in ("fp8_ref", "fp8_triton"):
            if name in runs:
                row[f"{name}_s"] = runs[name][r]
                row[f"{name}_tflops"] = flops / row[f"{name}_s"] / 1e12
        row["fp8_tflops"] = flops / row["fp8_s"] / 1e12
        row["bf16_tflops"] = flops / row["bf16_s"] / 1e12
        row["ratio"] = row["fp8_tflops"] / row["bf16_tflops"]
        rows.append(row)
    return {"m": m, "k": k, "n": n, **summarize(rows), **extra,
            "calc_diff_vs_bf16": calc_diff(np.asarray(out_fp8, np.float32), np.asarray(out_bf16, np.float32))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    ap.add_argument("--shapes", nargs="+", type=pair_arg("KxN", "7168x2112"), metavar="KxN", default=list(SHAPES_KN),
                    help="(K, N) pairs; default: the six DeepSeek-V3 shapes of reference §5.2")
    ap.add_argument("--m", type=int, default=None, help=f"rows of A (default {GPU_M} on GPU, {CPU_M} on CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per measurement after an ahead-of-time "
                    "compile, median (default 10 on GPU, 1 on CPU)")
    ap.add_argument("--tune", action="store_true", help="GPU: also time a sweep of Mosaic kernel tile configs")
    add_repeats_arg(ap)
    args = ap.parse_args(argv)
    if args.m is not None and args.m < 1:
        ap.error(f"--m must be positive, got {args.m}")
    if args.reps is not None and args.reps < 1:
        ap.error(f"--reps must be positive, got {args.reps}")
    check_repeats(args.repeats)
    state = machine_state()

    on_gpu = jax.default_backend() == "gpu"
    m = args.m or (GPU_M if on_gpu else CPU_M)
    reps = args.reps or (10 if on_gpu else 1)
    device = jax.devices()[0].device_kind
    if on_gpu:
        print(f"fp8_gemm on {device}: Pallas kernels compiled (the default: Mosaic GPU on Hopper; Triton beside it) "
              f"vs jnp.dot bf16, M={m}")
    else:
        print(f"fp8_gemm on {device} ({jax.default_backend()}): no compiled FP8 kernel here; the Pallas kernel runs "
              f"in interpret mode, next to the jnp reference, at M={m}"
              + (f" (reduced from {GPU_M}; pass --m to change)" if args.m is None else ""))
    print(f"  {header(state, args.repeats)}")
    rows = []
    for k, n in args.shapes:
        r = bench_shape(m, k, n, on_gpu, reps, args.repeats, args.tune)
        rows.append(r)
        kernel_name = "pallas" if on_gpu else "pallas(interpret)"
        if on_gpu:
            ref = f"  fp8 triton {r['fp8_triton_tflops']:7.1f} TFLOP/s  max|err vs ref| {r['max_abs_err_vs_ref']:.2e}"
        else:
            ref = f"  fp8 ref {r['fp8_ref_s'] * 1e3:9.2f} ms {r['fp8_ref_tflops']:7.3f} TFLOP/s"
        print(f"  M={m} K={k:5d} N={n:5d}  fp8 {kernel_name} {r['fp8_s'] * 1e3:9.2f} ms "
              f"{r['fp8_tflops']:7.3f} TFLOP/s{ref}  bf16 jnp.dot {r['bf16_s'] * 1e3:9.2f} ms "
              f"{r['bf16_tflops']:7.3f} TFLOP/s  fp8/bf16 {r['ratio']:.2f}x [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]  "
              f"calc_diff {r['calc_diff_vs_bf16']:.1e}",
              flush=True)
        for t in r.get("tune", []):
            result = (f"{t['tflops']:7.1f} TFLOP/s  max|err| {t['max_abs_err_vs_ref']:.2e}" if "tflops" in t
                      else t["error"])
            print(f"    tune tile {t['tile_m']}x{t['tile_n']} k/step {t['k_per_step']} stages "
                  f"{t['max_concurrent_steps']}: {result}", flush=True)
    if args.json:
        print(json.dumps({"backend": jax.default_backend(), "device": device, "m": m, "interpret": not on_gpu,
                          "shapes": rows, "repeats": args.repeats, **state}))


if __name__ == "__main__":
    main()
