"""Device meshes from a spec such as ``pp=2,dp=2,ep=2`` and the checks that a model and batch fit them (paper §3.1,
§3.2: DeepSeek-V3 trains with pipeline, expert and ZeRO-1 data parallelism); multi-process start-up.

Mesh axes, outermost first: ``pp`` (pipeline stages), ``dp`` (data parallel), ``ep`` (expert parallel; attention
runs data-parallel across it too, so the batch splits over dp x ep), ``tp`` (tensor parallel). Every mesh built here
has all four axes (size 1 where not asked for), so the rule table and the shard_map specs never branch on presence.
"""

from __future__ import annotations

import math
import os
import re

import jax
from jax.sharding import AxisType, Mesh

from dsv3_jax.config import ModelConfig

MESH_AXES = ("pp", "dp", "ep", "tp")
_ITEM = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(-?\d+|auto)\s*$")


def parse_mesh_spec(spec: str, allow_auto: bool = False) -> dict:
    """``'pp=2,dp=2,ep=2'`` -> {'pp': 2, 'dp': 2, 'ep': 2, 'tp': 1} (all four axes; omitted ones are 1). With
    allow_auto, one axis may be ``auto`` (kept as the string 'auto', for the caller to fill from a device count)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh spec must be a non-empty string like 'dp=2,ep=4', got {spec!r}")
    sizes: dict = {}
    for item in spec.split(","):
        m = _ITEM.match(item)
        if not m or (m.group(2) == "auto" and not allow_auto):
            raise ValueError(f"mesh spec {spec!r}: cannot parse {item.strip()!r}; expected AXIS=SIZE, e.g. 'dp=2'")
        name, size = m.group(1), (m.group(2) if m.group(2) == "auto" else int(m.group(2)))
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; known axes: {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        if size != "auto" and size < 1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} must have size >= 1, got {size}")
        sizes[name] = size
    if sum(v == "auto" for v in sizes.values()) > 1:
        raise ValueError(f"mesh spec {spec!r}: at most one axis may be 'auto'")
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def mesh_sizes(spec: str | None, n_devices: int) -> dict[str, int]:
    """Axis sizes for `spec` on `n_devices` devices; None puts every device on dp."""
    sizes = ({a: 1 for a in MESH_AXES} | {"dp": n_devices}) if spec is None else parse_mesh_spec(spec)
    total = math.prod(sizes.values())
    if total != n_devices:
        shown = " x ".join(f"{a}={s}" for a, s in sizes.items() if s > 1) or "1"
        raise ValueError(f"mesh {spec!r}: {shown} = {total} devices, but there are {n_devices}; the axis sizes "
                         "must multiply to the device count")
    return sizes


def default_devices() -> list:
    """The devices of a run without --mesh (all on dp): every device, or the first N when the environment variable
    DSV3_DEVICES=N is set (e.g. one device of a multi-GPU host, or of simulated CPU devices)."""
    devices = jax.devices()
    n = os.environ.get("DSV3_DEVICES")
    if n is None:
        return devices
    if not n.isdigit() or not 1 <= int(n) <= len(devices):
        raise ValueError(f"DSV3_DEVICES={n!r}: expected a device count between 1 and {len(devices)}")
    return devices[:int(n)]


def ep_group_size(cfg: ModelConfig, ep: int) -> int:
    """Expert-parallel ranks forming one routing group's "node" (paper §2.1.2 node-limited routing): with the
    experts split contiguously over ep ranks, group g lives on ranks [g * s, (g + 1) * s) when ep is a multiple
    of n_group (s = ep / n_group); when n_group is a multiple of ep each rank holds whole groups (s = 1)."""
    g = max(cfg.n_group, 1)
    return ep // g if ep % g == 0 else 1


def validate_mesh(sizes: dict[str, int], cfg: ModelConfig, batch: int | None = None) -> None:
    """ValueError unless `cfg` (and a micro-batch of `batch` sequences) splits over the mesh `sizes`."""
    pp, dp, ep = sizes.get("pp", 1), sizes.get("dp", 1), sizes.get("ep", 1)
    e = cfg.n_routed_experts
    if ep > 1 and (e == 0 or e % ep):
        raise ValueError(f"mesh ep={ep}: the model's {e} routed experts do not divide evenly over {ep} "
                         "expert-parallel ranks (n_routed_experts must be a multiple of ep)")
    g = cfg.n_group
    if ep > 1 and g > 1 and ep % g and g % ep:
        raise ValueError(f"mesh ep={ep}: n_group={g} routing groups cannot align with {ep} expert-parallel ranks "
                         "(one must be a multiple of the other, so that each group lives on whole ranks)")
    if pp > 1 and cfg.num_moe_layers == 0:
        raise ValueError(f"mesh pp={pp}: pipeline stages cut the MoE stack, and the model has no MoE layer (stages "
                         "need not be equal: sharding/stage_layout.py)")
    if batch is not None and batch % (dp * ep):
        raise ValueError(f"mesh dp={dp}, ep={ep}: the (micro-)batch of {batch} sequences does not split over "
                         f"dp x ep = {dp * ep} ranks (the batch must be a multiple of dp * ep)")


def build_mesh(spec: str | None = None, cfg: ModelConfig | None = None, batch: int | None = None,
               devices=None) -> Mesh:
    """A jax Mesh with axes ('pp', 'dp', 'ep', 'tp') over `devices`, checked against cfg/batch. Default devices:
    without a spec `default_devices()`; with one, the first devices of a single process that the spec's sizes
    multiply to (all of them across several processes)."""
    if devices is None:
        devices = default_devices() if spec is None else jax.devices()
        if spec is not None and jax.process_count() == 1:
            devices = devices[:min(len(devices), math.prod(parse_mesh_spec(spec).values()))]
    devices = list(devices)
    sizes = mesh_sizes(spec, len(devices))
    if cfg is not None:
        validate_mesh(sizes, cfg, batch)
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def initialize_distributed() -> bool:
    """jax.distributed.initialize from the environment when several processes are launched; True if it did.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID. SLURM: with
    SLURM_NTASKS > 1, jax detects the coordinator, count and id itself. On the CPU the cross-process collectives
    go through gloo (the default implementation has none). Call before any computation.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    explicit = "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1
    if not explicit and not slurm:
        return False
    # Only the CPU client reads this; accelerators keep their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        missing = [k for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(f"multi-process launch: set {', '.join(missing)} as well (JAX_COORDINATOR_ADDRESS is "
                             "host:port of process 0; JAX_NUM_PROCESSES the count; JAX_PROCESS_ID this one's rank)")
        try:
            n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
        if not 0 <= i < n:
            raise ValueError(f"JAX_PROCESS_ID={i} must be in [0, JAX_NUM_PROCESSES={n})")
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=i)
    else:
        jax.distributed.initialize()
    return True

