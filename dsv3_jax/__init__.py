"""dsv3-jax: a JAX/Flax reimplementation of DeepSeek-V3 (arXiv:2412.19437)."""

import os
import re

from dsv3_jax.config import PRESETS, ModelConfig, get_preset
from dsv3_jax.model.transformer import ModelOutput, Transformer
from dsv3_jax.precision import Precision
from dsv3_jax.hf import from_pretrained, save_pretrained


def cpu_collective_threads(devices: int | None = None) -> None:
    """Room in XLA:CPU's thread pool for simulated devices' collectives; call before jax makes its CPU client.

    XLA:CPU runs every simulated device's operations on one pool of max(cores, devices) threads, and a collective
    holds its thread until all its peers arrive. A device may run two independent collectives at once (e.g. a
    pipeline send and an expert-parallel all-gather), and with as many threads as devices that can leave a peer
    without a thread: every thread waits, and XLA aborts the process after 40 s ("Termination timeout for
    `collective permute`"). XLA sizes the pool from NPROC when it is set; this sets NPROC (unless already set) to
    4 threads per device, for meshes of up to 128 devices. `devices`: the simulated device count, by default the
    --xla_force_host_platform_device_count in XLA_FLAGS or JAX_NUM_CPU_DEVICES."""
    if devices is None:
        found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
        devices = int(found[-1]) if found else int(os.environ.get("JAX_NUM_CPU_DEVICES", "1") or 1)
    if devices > 1:  # XLA's own size plus up to 3 per device (at most 256 more: a large mesh is for compiling)
        os.environ.setdefault("NPROC", str(max(os.cpu_count() or 1, devices + min(3 * devices, 256))))


__all__ = ["cpu_collective_threads", "ModelConfig", "PRESETS", "get_preset", "Transformer",
           "ModelOutput", "Precision", "from_pretrained", "save_pretrained"]

cpu_collective_threads()  # before the first jax computation (importing the modules above makes none)
