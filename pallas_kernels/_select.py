"""Backend selection and block-size helpers shared by the Pallas kernels (DESIGN.md principle 5)."""

from __future__ import annotations

import jax

IMPLS = ("pallas", "ref")


def resolve_impl(impl, interpret) -> tuple[str, bool]:
    """(impl, interpret) with defaults filled in: the Pallas kernel on GPU, the jnp reference elsewhere.

    Forcing ``impl="pallas"`` on a backend without a Triton lowering (CPU) runs it in interpret mode unless
    ``interpret`` says otherwise.
    """
    if impl is None:
        impl = "pallas" if jax.default_backend() == "gpu" else "ref"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be a bool or None, got {interpret!r}")
    return impl, interpret


def check_block(name: str, value, minimum: int = 1) -> None:
    """Raise ValueError unless value is a power-of-two int >= minimum (a Triton block dimension)."""
    if (not isinstance(value, int) or isinstance(value, bool) or value < minimum or value & (value - 1)):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value!r}")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple
