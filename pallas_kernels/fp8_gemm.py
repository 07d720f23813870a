"""Block-scaled FP8 GEMM, C = A @ B^T (DeepSeek-V3 paper §3.3.2; reference §5.1 fp8_gemm, §5.2 DeepGEMM).

A is quantized per 1x128 tile (x_s [M, nK]) and B per 128x128 block (w_s [nN, nK]; or, with
``w_granularity="row"``, per 1x128 tile like A, w_s [N, nK]: the weight-gradient GEMM, whose operands are both
activations quantized per 128x1 tile and transposed, §5.3). Each 128-wide K slice is
multiplied with FP32 accumulation and promoted into the FP32 accumulator with its scales applied there:
``acc += (a_blk @ b_blk^T) * a_s[:, kb][:, None] * b_s[n // 128, kb][None, :]``; the output is cast once at the end.

``fp8_gemm`` is the public entry point: a Pallas kernel on GPU, the plain-jnp ``fp8_gemm_ref`` elsewhere; both have
the same signature. On GPU there are two kernels: the Mosaic GPU one (``fp8_gemm_mosaic``: FP8 ``wgmma``, Hopper
only, the default there) and the Triton one below (grid over M and N blocks, a loop over the 128-wide K blocks
inside; the fallback, and the one interpret mode runs).

Dimension letters: M rows of A, N rows of B (out features), K contraction, k the K block index (nK blocks), b the
offset within a K block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._select import check_block, next_pow2, resolve_impl, round_up
from pallas_kernels.fp8_gemm_mosaic import MosaicConfig, fp8_gemm_mosaic_padded

BLOCK_K = 128  # the scale granularity along K; DeepGEMM asserts BLOCK_K == 128
BLOCK_N = 128  # one weight-scale block per output tile, so the B scale is a scalar per (tile, K block)
DEFAULT_BLOCK_M = 64
W_GRANULARITIES = ("block", "row")
BACKENDS = ("mosaic", "triton")


def _check_shapes(x_q, x_s, w_q, w_s, w_granularity: str = "block") -> None:
    if w_granularity not in W_GRANULARITIES:
        raise ValueError(f"fp8_gemm: w_granularity must be one of {W_GRANULARITIES}, got {w_granularity!r}")
    if x_q.ndim != 2:
        raise ValueError(f"fp8_gemm: x_q must be [M, K], got shape {x_q.shape}")
    if w_q.ndim != 2:
        raise ValueError(f"fp8_gemm: w_q must be [N, K], got shape {w_q.shape}")
    (M, K), (N, K_w) = x_q.shape, w_q.shape
    if K_w != K:
        raise ValueError(f"fp8_gemm: w_q must be [N, K={K}] to match x_q {x_q.shape}, got shape {w_q.shape}")
    nK, nN = -(-K // BLOCK_K), -(-N // BLOCK_N)
    if tuple(x_s.shape) != (M, nK):
        raise ValueError(f"fp8_gemm: x_s must be [M, ceil(K/128)] = {(M, nK)}, got shape {x_s.shape}")
    if w_granularity == "row":
        if tuple(w_s.shape) != (N, nK):
            raise ValueError(f"fp8_gemm: row-wise w_s must be [N, ceil(K/128)] = {(N, nK)}, got shape {w_s.shape}")
    elif tuple(w_s.shape) != (nN, nK):
        raise ValueError(
            f"fp8_gemm: w_s must be [ceil(N/128), ceil(K/128)] = {(nN, nK)}, got shape {w_s.shape}"
        )


def _check_operand_dtypes(name: str, x_q, w_q) -> None:
    """The kernel's dot takes both operands in one floating dtype (e4m3 for FP8; bf16/f32 with unit scales)."""
    if not jnp.issubdtype(x_q.dtype, jnp.floating) or x_q.dtype != w_q.dtype:
        raise ValueError(
            f"{name}: x_q and w_q must share one floating dtype (float8_e4m3fn for FP8), "
            f"got {x_q.dtype} and {w_q.dtype}"
        )


def _column_scales(ws, N: int, w_rows: bool):
    """float32 [nK, N]: the weight scale of every output column and K block (a 128x128 block's scale repeated over
    its 128 columns, or the per-row scales as given)."""
    ws_kN = ws.astype(jnp.float32).T
    return ws_kN if w_rows else jnp.repeat(ws_kN, BLOCK_N, axis=1)[:, :N]


def _promoted_matmul_ref(x_MK, xs_Mk, w_NK, ws_nk, w_rows: bool = False):
    """jnp FP32 [M, N] = sum over 128-wide K blocks of (x_blk @ w_blk^T) * xs[:, k] * ws[n // 128, k] (or ws[n, k])."""
    (M, K), N = x_MK.shape, w_NK.shape[0]
    nK = xs_Mk.shape[1]
    pad_K = nK * BLOCK_K - K
    # Zero padding of the partial last K block contributes exactly 0 to every partial product.
    x_kMb = jnp.pad(x_MK.astype(jnp.float32), ((0, 0), (0, pad_K))).reshape(M, nK, BLOCK_K).transpose(1, 0, 2)
    w_kNb = jnp.pad(w_NK.astype(jnp.float32), ((0, 0), (0, pad_K))).reshape(N, nK, BLOCK_K).transpose(1, 0, 2)
    ws_kN = _column_scales(ws_nk, N, w_rows)

    def body(acc_MN, xs):
        x_Mb, w_Nb, xs_M, ws_N = xs
        part_MN = jnp.dot(x_Mb, w_Nb.T, precision=jax.lax.Precision.HIGHEST)  # exact products of e4m3 values
        return acc_MN + part_MN * xs_M[:, None] * ws_N[None, :], None

    acc_MN, _ = jax.lax.scan(body, jnp.zeros((M, N), jnp.float32),
                             (x_kMb, w_kNb, xs_Mk.astype(jnp.float32).T, ws_kN))
    return acc_MN


@functools.partial(jax.jit, static_argnames=("out_dtype", "w_granularity"))
def fp8_gemm_ref(x_q, x_s, w_q, w_s, out_dtype=jnp.bfloat16, *, w_granularity: str = "block"):
    """Plain-jnp block-scaled FP8 GEMM: [M, K] e4m3 x [N, K] e4m3 -> [M, N] out_dtype, FP32 accumulation."""
    _check_shapes(x_q, x_s, w_q, w_s, w_granularity)
    return _promoted_matmul_ref(x_q, x_s, w_q, w_s, w_rows=w_granularity == "row").astype(out_dtype)


def _to_bits(a):
    """Narrow floats cross the pallas_call boundary as unsigned ints of the same width (zero bits = +0.0).

    Bit-identical, and free in the kernel (a register bitcast after the load); it keeps XLA CPU from converting the
    whole e4m3/bf16 operands at every grid step of interpret mode (~10x faster there).
    """
    if a.dtype.itemsize < 4:
        return jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{8 * a.dtype.itemsize}"))
    return a


def _from_bits(v, dtype):
    return v if v.dtype == dtype else jax.lax.bitcast_convert_type(v, dtype)


def _check_dot_dtype(name: str, operand_dtype, dot_dtype) -> None:
    exact = {jnp.dtype(operand_dtype), jnp.dtype(jnp.float32)}
    if jnp.dtype(operand_dtype).itemsize == 1:  # e4m3 values are exact in every 16-bit float
        exact |= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}
    if dot_dtype is not None and jnp.dtype(dot_dtype) not in exact:
        raise ValueError(f"{name}: dot_dtype must be None or one of {sorted(str(d) for d in exact)} (exact for "
                         f"{jnp.dtype(operand_dtype)} operands), got {dot_dtype!r}")


def _on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x)."""
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def _resolve_dot_dtype(operand_dtype, dot_dtype, interpret: bool):
    """The dtype the kernel's MMA takes: the operands' own, except e4m3 on Hopper (bf16, see below)."""
    if dot_dtype is not None:
        return jnp.dtype(dot_dtype)
    if not interpret and jnp.dtype(operand_dtype).itemsize == 1:
        # Pallas emits the e4m3 tt.dot without maxNumImpreciseAcc; on sm_90 Triton then converts to f16 and uses
        # legacy mma.sync, while a bf16 dot gets wgmma. sm_89 and sm_100 keep native FP8 MMAs (docs/design.md).
        if _on_hopper():
            return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(operand_dtype)


def _promoted_k_loop(load_x, load_w, load_xs, load_ws, n_k: int, block_m: int, block_n: int, dot_dtype):
    """Kernel body: FP32 accumulator over ``n_k`` K blocks, each dot promoted with its tile scales (§5.2)."""

    def body(kb, acc):
        k0 = pl.multiple_of(kb * BLOCK_K, BLOCK_K)
        a, b = load_x(k0).astype(dot_dtype), load_w(k0).astype(dot_dtype)
        # f32 operands ask for HIGHEST, else the Triton backend would round them to TF32.
        precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
        part = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)
        return acc + part * load_xs(kb)[:, None] * load_ws(kb)

    return jax.lax.fori_loop(0, n_k, body, jnp.zeros((block_m, block_n), jnp.float32))


def _fp8_gemm_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, n_k: int, operand_dtype, dot_dtype):
    # x_ref [bm, Kp], xs_ref [nK, bm] (MN-major scales: a contiguous row per K block), w_ref [128, Kp],
    # ws_ref [nK] (this N block's scales) or, row-wise, [nK, 128] (one per output column); o_ref [bm, 128].
    block_m, block_n = o_ref.shape
    acc = _promoted_k_loop(
        lambda k0: _from_bits(x_ref[:, pl.ds(k0, BLOCK_K)], operand_dtype),
        lambda k0: _from_bits(w_ref[:, pl.ds(k0, BLOCK_K)], operand_dtype),
        lambda kb: xs_ref[kb, :],
        (lambda kb: ws_ref[kb, :][None, :]) if len(ws_ref.shape) == 2 else (lambda kb: ws_ref[kb]),
        n_k, block_m, block_n, dot_dtype)
    o_ref[...] = acc.astype(o_ref.dtype)


def _triton_params():
    """Triton launch parameters for the GEMM kernels (the official kernel autotunes 8 warps, 3-6 stages)."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=8, num_stages=3)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "interpret", "w_granularity", "dot_dtype"))
def _fp8_gemm_pallas(x_q, x_s, w_q, w_s, out_dtype, block_m: int, interpret: bool, w_granularity: str, dot_dtype):
    (M, K), N = x_q.shape, w_q.shape[0]
    nK, nN = x_s.shape[1], -(-N // BLOCK_N)
    bm = min(block_m, max(16, next_pow2(M)))
    Mp, Kp, Np = round_up(M, bm), nK * BLOCK_K, nN * BLOCK_N
    # Zero padding: padded K columns add 0 to every partial product; padded rows/columns are sliced off.
    operand_dtype = x_q.dtype
    x_q = jnp.pad(_to_bits(x_q), ((0, Mp - M), (0, Kp - K)))
    w_q = jnp.pad(_to_bits(w_q), ((0, Np - N), (0, Kp - K)))
    xs_kM = jnp.pad(x_s.astype(jnp.float32), ((0, Mp - M), (0, 0))).T
    if w_granularity == "row":  # MN-major like x_s: a contiguous row of 128 column scales per K block
        ws = jnp.pad(w_s.astype(jnp.float32), ((0, Np - N), (0, 0))).T
        ws_spec = pl.BlockSpec((nK, BLOCK_N), lambda i, j: (0, j))
    else:
        ws, ws_spec = w_s.astype(jnp.float32), pl.BlockSpec((None, nK), lambda i, j: (j, 0))
    out = pl.pallas_call(
        functools.partial(_fp8_gemm_kernel, n_k=nK, operand_dtype=operand_dtype, dot_dtype=dot_dtype),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(Mp // bm, nN),
        in_specs=[
            pl.BlockSpec((bm, Kp), lambda i, j: (i, 0)),
            pl.BlockSpec((nK, bm), lambda i, j: (0, i)),
            pl.BlockSpec((BLOCK_N, Kp), lambda i, j: (j, 0)),
            ws_spec,
        ],
        out_specs=pl.BlockSpec((bm, BLOCK_N), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
        name="fp8_gemm",
    )(x_q, xs_kM, w_q, ws)
    return out[:M, :N]


@functools.partial(jax.jit, static_argnames=("out_dtype", "w_granularity", "config"))
def _fp8_gemm_mosaic(x_q, x_s, w_q, w_s, out_dtype, w_granularity: str, config: MosaicConfig):
    """Pad to the Mosaic kernel's tiles (zeros: exact), lay the scales out MN-major, run it, slice the result."""
    (M, K), N = x_q.shape, w_q.shape[0]
    nK = x_s.shape[1]
    Mp, Np = round_up(M, config.tile_m), round_up(N, config.tile_n)
    nKp = round_up(nK, config.k_per_step)  # padded K blocks have zero data and zero scales
    Kp = nKp * BLOCK_K
    x_q = jnp.pad(x_q, ((0, Mp - M), (0, Kp - K)))
    w_q = jnp.pad(w_q, ((0, Np - N), (0, Kp - K)))
    xs_kM = jnp.pad(x_s.astype(jnp.float32).T, ((0, nKp - nK), (0, Mp - M)))
    ws_kN = jnp.pad(_column_scales(w_s, N, w_granularity == "row"), ((0, nKp - nK), (0, Np - N)))
    return fp8_gemm_mosaic_padded(x_q, xs_kM, w_q, ws_kN, out_dtype, config)[:M, :N]


def _resolve_backend(backend, operand_dtype, interpret: bool) -> str:
    """The GPU kernel to run: Mosaic GPU for e4m3 on Hopper (FP8 wgmma), Triton otherwise and in interpret mode."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"fp8_gemm: backend must be one of {BACKENDS} or None, got {backend!r}")
    if interpret:
        if backend == "mosaic":
            raise ValueError("fp8_gemm: the Mosaic GPU kernel has no interpret mode (backend='mosaic' needs a GPU)")
        return "triton"
    if backend is not None:
        return backend
    return "mosaic" if _on_hopper() and jnp.dtype(operand_dtype) == jnp.float8_e4m3fn else "triton"


def fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=jnp.bfloat16, *, w_granularity: str = "block", impl=None,
             interpret=None, block_m: int = DEFAULT_BLOCK_M, dot_dtype=None, backend=None,
             mosaic: MosaicConfig | None = None):
    """Block-scaled FP8 GEMM x_q @ w_q^T -> [M, N] out_dtype: Pallas kernel on GPU, ``fp8_gemm_ref`` elsewhere.

    ``w_granularity`` "block" (w_s [nN, nK]) or "row" (w_s [N, nK]); ``impl`` forces "pallas" or "ref";
    ``interpret`` runs the kernel in Pallas interpret mode (default off GPU); ``backend`` picks the GPU kernel,
    "mosaic" (FP8 wgmma, Hopper; the default there for e4m3) or "triton" (``block_m``, ``dot_dtype``: the dtype
    the tiles are converted to, exactly, for the MMA; default e4m3, bf16 on Hopper); ``mosaic``: the Mosaic
    kernel's tile sizes.
    """
    impl, interpret = resolve_impl(impl, interpret)
    check_block("fp8_gemm: block_m", block_m, minimum=16)
    _check_shapes(x_q, x_s, w_q, w_s, w_granularity)
    _check_operand_dtypes("fp8_gemm", x_q, w_q)
    _check_dot_dtype("fp8_gemm", x_q.dtype, dot_dtype)
    if impl == "ref":
        return fp8_gemm_ref(x_q, x_s, w_q, w_s, out_dtype=out_dtype, w_granularity=w_granularity)
    if _resolve_backend(backend, x_q.dtype, interpret) == "mosaic":
        return _fp8_gemm_mosaic(x_q, x_s, w_q, w_s, out_dtype=jnp.dtype(out_dtype), w_granularity=w_granularity,
                                config=mosaic or MosaicConfig())
    return _fp8_gemm_pallas(x_q, x_s, w_q, w_s, out_dtype=jnp.dtype(out_dtype), block_m=block_m,
                            interpret=interpret, w_granularity=w_granularity,
                            dot_dtype=_resolve_dot_dtype(x_q.dtype, dot_dtype, interpret))
