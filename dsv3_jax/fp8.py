"""FP8 (E4M3) fine-grained quantization numerics (DeepSeek-V3 paper §3.3; reference §5.1-§5.3).

Activations are scaled per 1x128 tile (per token per 128 channels) in the forward pass and per 128x1 tile in the
backward pass; weights per 128x128 block. Every tile has its own online scale ``s = max(amax, 1e-4) / 448`` (the
checkpoint's ``weight_scale_inv``: a multiplier, dequant = ``q * s``), optionally rounded up to a power of two
(``scale_fmt="ue8m0"``). Quantization divides by ``s`` like the official Triton kernel
(DeepSeek-V3 ``inference/kernel.py``), clips to +-448 and casts with round-to-nearest-even. Sizes that are not a
multiple of the block have a partial last tile whose amax covers only the real elements (zero-padding semantics,
DeepSeek-V3 ``README_WEIGHTS.md``).

FP8 training (paper §3.3; reference §5.3): ``fp8_linear`` runs all three GEMMs of a Linear (Fprop, Dgrad, Wgrad)
on E4M3 operands with fine-grained scales and FP32 accumulation, and ``fp8_expert_swiglu`` does the same for the
routed experts' grouped GEMMs, with the activation quantized before dispatch and the SwiGLU inputs cached in FP8.
Every FP8 GEMM goes through ``_fp8_matmul`` (the one place a backend kernel plugs in).

Dimension letters: M rows (tokens), N weight rows (out features), K contraction (in features), and the block
counts ``nb``/``nM``/``nN``/``nK`` = ceil(size / block_size); in the expert functions T tokens, P rows of the
expert-sorted buffer, D model, F expert width, E experts.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers float8_e4m3fn with NumPy for weight_dequant_np
import numpy as np

from dsv3_jax.model.dense import contract_2d
from dsv3_jax.residuals import as_bits, from_bits

E4M3_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-4
SCALE_FORMATS = (None, "ue8m0")


def _check_block_size(block_size) -> None:
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_scale_fmt(scale_fmt) -> None:
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")


def _ceil_pow2(s):
    """Round positive normal float32 scales up to a power of two, exactly (2**ceil(log2(s)))."""
    # frexp is exact: s = m * 2**e with m in [0.5, 1); s is already a power of two iff m == 0.5. A float32
    # log2 can land a hair off an integer and move ceil() by one, so it is not used.
    mant, expo = jnp.frexp(s)
    expo = jnp.where(mant == 0.5, expo - 1, expo)
    return jnp.ldexp(jnp.ones_like(s), expo)


def _div_exact(num, den):
    """Correctly rounded num / den with den broadcast to num's shape."""
    # XLA's algebraic simplifier rewrites division by a constant or by a broadcast as a multiply by the
    # reciprocal, which is off by up to 2 ulp and moves scales (and e4m3 rounding ties) away from the reference
    # x / s (reference §5.1: divide, do not multiply by 1/s). Making the divisor depend elementwise on num hides
    # the broadcast; where num is NaN the quotient is NaN either way, so the result is unchanged, and the select
    # fuses into the division kernel.
    # On NVIDIA GPUs XLA lowers f32 division to div.full (up to 2 ulp) regardless; bit-exact results there need
    # XLA_FLAGS=--xla_backend_extra_options=-nvptx-prec-divf32=2 (checked on an H200, jax 0.11.2).
    den_full = jnp.broadcast_to(jnp.asarray(den, num.dtype), num.shape)
    den_full = jnp.where(jnp.isnan(num), jnp.ones_like(den_full), den_full)
    return num / den_full


def _quant_scale(amax, scale_fmt):
    s = _div_exact(jnp.maximum(amax, AMAX_FLOOR), E4M3_MAX)
    if scale_fmt == "ue8m0":
        s = _ceil_pow2(s)
    return s


def _to_e4m3(x_over_s):
    # ml_dtypes/XLA map |v| > 464 (and inf) to NaN: float8_e4m3fn has no inf and does not saturate.
    return jnp.clip(x_over_s, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


@functools.partial(jax.jit, static_argnames=("block_size", "scale_fmt"))
def act_quant(x, block_size: int = BLOCK, scale_fmt: Optional[str] = None):
    """Quantize per 1x``block_size`` tile along the last axis; returns (q e4m3 like x, s f32 [..., nb])."""
    _check_block_size(block_size)
    _check_scale_fmt(scale_fmt)
    if x.ndim < 1:
        raise ValueError(f"act_quant: x must have at least 1 axis, got shape {x.shape}")
    K = x.shape[-1]
    nb = -(-K // block_size)
    x_f32 = x.astype(jnp.float32)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, nb * block_size - K)]
    x_tiles = jnp.pad(x_f32, pad).reshape(*x.shape[:-1], nb, block_size)
    amax = jnp.max(jnp.abs(x_tiles), axis=-1)  # zero padding never raises the amax
    s = _quant_scale(amax, scale_fmt)
    q_tiles = _to_e4m3(_div_exact(x_tiles, s[..., None]))
    q = q_tiles.reshape(*x.shape[:-1], nb * block_size)[..., :K]
    return q, s


@functools.partial(jax.jit, static_argnames=("block_size", "scale_fmt"))
def act_quant_colwise(x, block_size: int = BLOCK, scale_fmt: Optional[str] = None):
    """Quantize per ``block_size``x1 tile along axis -2 (backward pass); returns (q like x, s f32 [..., nM, K])."""
    if x.ndim < 2:
        raise ValueError(f"act_quant_colwise: x must have at least 2 axes [..., M, K], got shape {x.shape}")
    q_KM, s_KnM = act_quant(jnp.swapaxes(x, -1, -2), block_size=block_size, scale_fmt=scale_fmt)
    return jnp.swapaxes(q_KM, -1, -2), jnp.swapaxes(s_KnM, -1, -2)


@functools.partial(jax.jit, static_argnames=("block_size",))
def weight_quant(w, block_size: int = BLOCK):
    """Quantize per square ``block_size`` block of the last two axes; returns (q e4m3, s f32 [..., nN, nK])."""
    _check_block_size(block_size)
    if w.ndim < 2:
        raise ValueError(f"weight_quant: w must have at least 2 axes [..., N, K], got shape {w.shape}")
    *lead, N, K = w.shape
    nN, nK = -(-N // block_size), -(-K // block_size)
    w_f32 = w.astype(jnp.float32)
    pad = [(0, 0)] * len(lead) + [(0, nN * block_size - N), (0, nK * block_size - K)]
    w_blocks = jnp.pad(w_f32, pad).reshape(*lead, nN, block_size, nK, block_size)
    amax = jnp.max(jnp.abs(w_blocks), axis=(-3, -1))
    s = _quant_scale(amax, None)
    q_blocks = _to_e4m3(_div_exact(w_blocks, s[..., :, None, :, None]))
    q = q_blocks.reshape(*lead, nN * block_size, nK * block_size)[..., :N, :K]
    return q, s


def _check_weight_scale_shape(q_shape, s_shape, block_size: int, name: str = "weight_dequant") -> None:
    """Raise ValueError unless s_shape == q_shape[:-2] + (ceil(N/block), ceil(K/block))."""
    _check_block_size(block_size)
    q_shape, s_shape = tuple(q_shape), tuple(s_shape)
    if len(q_shape) < 2:
        raise ValueError(f"{name}: q must have at least 2 axes [..., N, K], got shape {q_shape}")
    *lead, N, K = q_shape
    expected = (*lead, -(-N // block_size), -(-K // block_size))
    if s_shape != expected:
        raise ValueError(
            f"{name}: scale shape {s_shape} does not match weight shape {q_shape}; "
            f"expected scale shape {expected} (ceil(N/{block_size}), ceil(K/{block_size}))"
        )


def _check_not_integer(q_dtype, name: str) -> None:
    if np.issubdtype(np.dtype(q_dtype), np.integer):
        raise ValueError(
            f"{name}: q has integer dtype {np.dtype(q_dtype)}; view raw FP8 bytes as float8_e4m3fn first"
        )


@functools.partial(jax.jit, static_argnames=("dtype", "block_size"))
def weight_dequant(q, s, dtype=jnp.float32, block_size: int = BLOCK):
    """Dequantize block-scaled weights: W[..., i, j] = f32(q[..., i, j]) * s[..., i // 128, j // 128]."""
    _check_weight_scale_shape(q.shape, s.shape, block_size)
    _check_not_integer(q.dtype, "weight_dequant")
    N, K = q.shape[-2:]
    s_NK = jnp.repeat(jnp.repeat(s.astype(jnp.float32), block_size, axis=-2), block_size, axis=-1)[..., :N, :K]
    return (q.astype(jnp.float32) * s_NK).astype(dtype)


def weight_dequant_np(q, s, dtype=np.float32, block_size: int = BLOCK) -> np.ndarray:
    """NumPy twin of ``weight_dequant`` for host-side (memmapped) checkpoint tensors; bit-identical results."""
    q, s = np.asarray(q), np.asarray(s)
    _check_weight_scale_shape(q.shape, s.shape, block_size, name="weight_dequant_np")
    _check_not_integer(q.dtype, "weight_dequant_np")
    N, K = q.shape[-2:]
    out = np.empty(q.shape, dtype=dtype)
    s_f32 = s.astype(np.float32)
    # One row block at a time: reads a memmap sequentially and keeps the f32 temporaries to 128 rows.
    for i in range(s.shape[-2]):
        rows = slice(i * block_size, min((i + 1) * block_size, N))
        s_row = np.repeat(s_f32[..., i, :], block_size, axis=-1)[..., None, :K]
        out[..., rows, :] = (q[..., rows, :].astype(np.float32) * s_row).astype(dtype)
    return out


def calc_diff(x, y) -> float:
    """DeepGEMM's similarity error 1 - 2*sum(x*y) / sum(x*x + y*y) in float64 (0.0 if both are all-zero)."""
    x64 = np.asarray(x).astype(np.float64)
    y64 = np.asarray(y).astype(np.float64)
    if x64.shape != y64.shape:
        raise ValueError(f"calc_diff: shapes differ, x {x64.shape} vs y {y64.shape}")
    denom = float(np.sum(x64 * x64 + y64 * y64))
    if denom == 0.0:
        return 0.0
    return float(1.0 - 2.0 * np.sum(x64 * y64) / denom)


# ----- FP8 training: the GEMM, the Linear and the routed experts (paper §3.3; reference §5.3) -----

EXPERT_TILE = 128
"""Rows per tile of the expert-sorted buffer on the FP8 path: DeepGEMM's contiguous-layout M alignment (reference
§5.2), so every 128x1 weight-gradient tile along the tokens lies inside one expert's segment."""

DISPATCH_SCALE_FMT = "ue8m0"
"""Scale format of the MoE dispatch input and of the gradient entering the down-projection (§5.3 items 1 and 3)."""


def _dequant_rows(q, s, block_size: int = BLOCK):
    """f32 q * s for 1 x block_size tiles along the last axis (s [..., nb])."""
    K = q.shape[-1]
    return q.astype(jnp.float32) * jnp.repeat(s.astype(jnp.float32), block_size, axis=-1)[..., :K]


def _fp8_matmul(a_q, a_s, b_q, b_s, out_dtype):
    """C [M, N] = A @ B^T of E4M3 a_q [M, K] (1x128 scales a_s [M, nK]) and b_q [N, K] with 128x128 block scales
    b_s [nN, nK] (a weight) or 1x128 scales [N, nK] (an activation, in a weight gradient); FP32 accumulation.

    The single FP8 GEMM of the package: on a GPU the Pallas kernel (pallas_kernels.fp8_gemm); elsewhere the
    dequantized operands in one FP32 GEMM (tests hold it to pallas_kernels.fp8_gemm_ref).
    """
    if a_q.ndim != 2 or b_q.ndim != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"_fp8_matmul: need a_q [M, K] and b_q [N, K], got {a_q.shape} and {b_q.shape}")
    (M, K), N = a_q.shape, b_q.shape[0]
    nK, nN = -(-K // BLOCK), -(-N // BLOCK)
    if tuple(a_s.shape) != (M, nK):
        raise ValueError(f"_fp8_matmul: a_s must be [M, ceil(K/128)] = {(M, nK)}, got {a_s.shape}")
    if tuple(b_s.shape) not in ((N, nK), (nN, nK)):
        raise ValueError(f"_fp8_matmul: b_s must be [ceil(N/128), ceil(K/128)] = {(nN, nK)} or [N, ceil(K/128)] = "
                         f"{(N, nK)}, got {b_s.shape}")
    if jax.default_backend() == "gpu":
        from pallas_kernels import fp8_gemm

        return fp8_gemm(a_q, a_s, b_q, b_s, out_dtype, w_granularity="row" if b_s.shape[0] == N else "block")
    a_MK = _dequant_rows(a_q, a_s)
    if tuple(b_s.shape) == (N, nK):  # per-row tiles (N == nN only when N == 1, where both readings agree)
        b_NK = _dequant_rows(b_q, b_s)
    else:
        b_NK = weight_dequant(b_q, b_s)
    # Scaling the operands before one FP32 GEMM gives the sums of fp8_gemm_ref (FP32 partial products per
    # 128-wide K slice, promoted with their scales) up to FP32 rounding order, without its [M, N, nK] buffer.
    c_MN = jax.lax.dot_general(a_MK, b_NK, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)
    return c_MN.astype(out_dtype)


def _fp8_wgrad(x_MK, g_MN, x_fmt: Optional[str], g_fmt: Optional[str]):
    """dW [K, N] = x^T g in FP32, both operands quantized per 128x1 tile along the token axis M."""
    x_q, x_s = act_quant_colwise(x_MK, scale_fmt=x_fmt)
    g_q, g_s = act_quant_colwise(g_MN, scale_fmt=g_fmt)
    return _fp8_matmul(x_q.T, x_s.T, g_q.T, g_s.T, jnp.float32)


def _check_linear(x, w) -> None:
    if w.ndim != 2:
        raise ValueError(f"fp8_linear: w must be [in, out], got shape {w.shape}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8_linear: x [..., {w.shape[0]}] expected for w {w.shape}, got shape {x.shape}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_linear(x, w, scale_fmt: Optional[str] = None):
    """y [..., N] = x [..., K] @ w [K, N] with Fprop, Dgrad and Wgrad all FP8 GEMMs; y and dx in x.dtype, dw in
    w.dtype. x is quantized per 1x128 tile (``scale_fmt``), w per 128x128 block; the backward keeps FP8 x."""
    return _fp8_linear_fwd(x, w, scale_fmt)[0]


def _fp8_linear_fwd(x, w, scale_fmt):
    _check_linear(x, w)
    *lead, K = x.shape
    x_q, x_s = act_quant(x.reshape(-1, K), scale_fmt=scale_fmt)
    w_q, w_s = weight_quant(w)  # [K, N] blocks: the transposed view serves Fprop, the stored one Dgrad
    y = _fp8_matmul(x_q, x_s, w_q.T, w_s.T, x.dtype).reshape(*lead, w.shape[1])
    return y, as_bits((x_q, x_s, w_q, w_s, jnp.zeros((0,), w.dtype)))  # as bits: see dsv3_jax/residuals.py


def _fp8_linear_bwd(scale_fmt, res, g):
    x_q, x_s, w_q, w_s, w_like = from_bits(*res)
    g_MN = g.reshape(-1, g.shape[-1])
    g_q, g_s = act_quant(g_MN)  # 1x128 along N, the Dgrad contraction
    dx = _fp8_matmul(g_q, g_s, w_q, w_s, g.dtype).reshape(*g.shape[:-1], x_q.shape[-1])
    # Wgrad re-tiles the saved FP8 x from 1x128 to 128x1 (with ue8m0 scales the dequantization is exact).
    dw = _fp8_wgrad(_dequant_rows(x_q, x_s), g_MN, scale_fmt, None)
    return dx, dw.astype(w_like.dtype)


fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


def fp8_dense(x, w, n_in: int = 1, scale_fmt: Optional[str] = None):
    """fp8_linear contracting the last ``n_in`` axes of x with the first ``n_in`` of w ([in..., out...] layout)."""
    return contract_2d("fp8_dense", lambda a, b: fp8_linear(a, b, scale_fmt), x, w, n_in)


def _gather_rows(q_TD, s_Td, src_P):
    """Rows src of (q, s); src == T names an appended zero row (padding)."""
    q = jnp.concatenate([q_TD, jnp.zeros((1, q_TD.shape[1]), q_TD.dtype)])[src_P]
    s = jnp.concatenate([s_Td, jnp.ones((1, s_Td.shape[1]), s_Td.dtype)])[src_P]
    return q, s


def _tiles(tile_expert_N, *arrays_P):
    """Split [P, ...] arrays into [N, P/N, ...] tiles."""
    n = tile_expert_N.shape[0]
    return tuple(a.reshape(n, a.shape[0] // n, *a.shape[1:]) for a in arrays_P)


def _expert(w_q, w_s, e):
    return (jax.lax.dynamic_index_in_dim(w_q, e, keepdims=False),
            jax.lax.dynamic_index_in_dim(w_s, e, keepdims=False))


def _check_experts(x_TD, src_P, tile_expert_N, w_gate_EDF, w_up_EDF, w_down_EFD) -> None:
    e, d, f = w_gate_EDF.shape
    if w_up_EDF.shape != (e, d, f) or w_down_EFD.shape != (e, f, d) or x_TD.ndim != 2 or x_TD.shape[1] != d:
        raise ValueError(f"fp8_expert_swiglu: x [T, D] and w_gate/w_up [E, D, F], w_down [E, F, D] expected; got x "
                         f"{x_TD.shape}, w_gate {w_gate_EDF.shape}, w_up {w_up_EDF.shape}, w_down {w_down_EFD.shape}")
    p, n = src_P.shape[0], tile_expert_N.shape[0]
    if n == 0 or p % n:
        raise ValueError(f"fp8_expert_swiglu: {p} buffer rows do not split into {n} tiles")


@jax.custom_vjp
def fp8_expert_swiglu(x_TD, src_P, tile_expert_N, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Row r of the expert-sorted buffer: SwiGLU of token src[r] through expert tile_expert[r // tile], all GEMMs FP8.

    x is quantized once per token (1x128, ue8m0) before the dispatch gather; the gate/up outputs are cached in FP8
    and SwiGLU is recomputed in the backward; the gradient entering the down projection is quantized with ue8m0
    scales. Returns y [P, D] in x.dtype (padding rows, src == T, give zeros).
    """
    return _fp8_expert_fwd(x_TD, src_P, tile_expert_N, w_gate_EDF, w_up_EDF, w_down_EFD)[0]


def _fp8_expert_fwd(x_TD, src_P, tile_expert_N, w_gate_EDF, w_up_EDF, w_down_EFD):
    _check_experts(x_TD, src_P, tile_expert_N, w_gate_EDF, w_up_EDF, w_down_EFD)
    xq_TD, xs_Td = act_quant(x_TD, scale_fmt=DISPATCH_SCALE_FMT)
    xq_PD, xs_Pd = _gather_rows(xq_TD, xs_Td, src_P)
    wg, wu, wd = weight_quant(w_gate_EDF), weight_quant(w_up_EDF), weight_quant(w_down_EFD)
    dt = x_TD.dtype

    def body(_, xs):
        xq, xs_, e = xs
        (wg_q, wg_s), (wu_q, wu_s), (wd_q, wd_s) = _expert(*wg, e), _expert(*wu, e), _expert(*wd, e)
        gate = _fp8_matmul(xq, xs_, wg_q.T, wg_s.T, jnp.float32)
        up = _fp8_matmul(xq, xs_, wu_q.T, wu_s.T, jnp.float32)
        h_q, h_s = act_quant(jax.nn.silu(gate) * up)
        y = _fp8_matmul(h_q, h_s, wd_q.T, wd_s.T, dt)
        return None, (y, act_quant(gate), act_quant(up))

    _, (y_NtD, gate_c, up_c) = jax.lax.scan(body, None, (*_tiles(tile_expert_N, xq_PD, xs_Pd), tile_expert_N))
    p = src_P.shape[0]
    flat = lambda a: a.reshape(p, a.shape[-1])  # noqa: E731
    cache = tuple(flat(a) for a in (*gate_c, *up_c))
    witness = tuple(jnp.zeros((0,), w.dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    return flat(y_NtD), as_bits((xq_TD, xs_Td, src_P, tile_expert_N, cache, wg, wu, wd, witness))


def _fp8_expert_bwd(res, g_PD):
    xq_TD, xs_Td, src_P, tile_expert_N, cache, wg, wu, wd, witness = from_bits(*res)
    xq_PD, xs_Pd = _gather_rows(xq_TD, xs_Td, src_P)

    def body(dw, xs):
        dwg, dwu, dwd = dw
        xq, xs_, gq, gs, uq, us, g, e = xs
        (wg_q, wg_s), (wu_q, wu_s), (wd_q, wd_s) = _expert(*wg, e), _expert(*wu, e), _expert(*wd, e)
        gate, up = _dequant_rows(gq, gs), _dequant_rows(uq, us)
        sig = jax.nn.sigmoid(gate)
        silu = gate * sig
        g_q, g_s = act_quant(g, scale_fmt=DISPATCH_SCALE_FMT)
        dh = _fp8_matmul(g_q, g_s, wd_q, wd_s, jnp.float32)  # w_down[e] [F, D] is already the [N, K] of Dgrad
        dgate, dup = dh * up * sig * (1 + gate * (1 - sig)), dh * silu
        dx = (_fp8_matmul(*act_quant(dgate), wg_q, wg_s, jnp.float32)
              + _fp8_matmul(*act_quant(dup), wu_q, wu_s, jnp.float32))
        x = _dequant_rows(xq, xs_)
        upd = lambda acc, v: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
            acc, jax.lax.dynamic_index_in_dim(acc, e, keepdims=False) + v, e, 0)
        dw = (upd(dwg, _fp8_wgrad(x, dgate, DISPATCH_SCALE_FMT, None)),
              upd(dwu, _fp8_wgrad(x, dup, DISPATCH_SCALE_FMT, None)),
              upd(dwd, _fp8_wgrad(silu * up, g, None, DISPATCH_SCALE_FMT)))
        return dw, dx

    zeros = tuple(jnp.zeros(w[0].shape, jnp.float32) for w in (wg, wu, wd))
    tiles = _tiles(tile_expert_N, xq_PD, xs_Pd, *cache, g_PD)
    (dwg, dwu, dwd), dx_NtD = jax.lax.scan(body, zeros, (*tiles, tile_expert_N))
    t = xq_TD.shape[0]
    dx_TD = jax.ops.segment_sum(dx_NtD.reshape(g_PD.shape), src_P, num_segments=t + 1)[:t]
    int_zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    return (dx_TD.astype(g_PD.dtype), int_zero(src_P), int_zero(tile_expert_N),
            dwg.astype(witness[0].dtype), dwu.astype(witness[1].dtype), dwd.astype(witness[2].dtype))


fp8_expert_swiglu.defvjp(_fp8_expert_fwd, _fp8_expert_bwd)


__all__ = [
    "AMAX_FLOOR",
    "BLOCK",
    "DISPATCH_SCALE_FMT",
    "E4M3_MAX",
    "EXPERT_TILE",
    "SCALE_FORMATS",
    "act_quant",
    "act_quant_colwise",
    "calc_diff",
    "fp8_dense",
    "fp8_expert_swiglu",
    "fp8_linear",
    "weight_dequant",
    "weight_dequant_np",
    "weight_quant",
]
