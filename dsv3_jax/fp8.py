"""FP8 (E4M3) fine-grained quantization numerics (DeepSeek-V3 paper §3.3; reference §5.1-§5.3).

Activations are scaled per 1x128 tile (per token per 128 channels) in the forward pass and per 128x1 tile in the
backward pass; weights per 128x128 block. Every tile has its own online scale ``s = max(amax, 1e-4) / 448`` (the
checkpoint's ``weight_scale_inv``: a multiplier, dequant = ``q * s``), optionally rounded up to a power of two
(``scale_fmt="ue8m0"``). Quantization divides by ``s`` like the official Triton kernel
(DeepSeek-V3 ``inference/kernel.py``), clips to +-448 and casts with round-to-nearest-even. Sizes that are not a
multiple of the block have a partial last tile whose amax covers only the real elements (zero-padding semantics,
DeepSeek-V3 ``README_WEIGHTS.md``).

Dimension letters: M rows (tokens), N weight rows (out features), K contraction (in features), and the block
counts ``nb``/``nM``/``nN``/``nK`` = ceil(size / block_size).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers float8_e4m3fn with NumPy for weight_dequant_np
import numpy as np

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


__all__ = [
    "AMAX_FLOOR",
    "BLOCK",
    "E4M3_MAX",
    "SCALE_FORMATS",
    "act_quant",
    "act_quant_colwise",
    "calc_diff",
    "weight_dequant",
    "weight_dequant_np",
    "weight_quant",
]
