"""Analytic training planner: memory per device and time per step of a DeepSeek-V3 training setup.

From a ModelConfig, a mesh (pp, dp, ep, tp), a hardware profile and training settings it estimates, per device,
parameter, gradient, optimizer-state and activation memory, and per step the compute, pipeline-bubble,
expert-parallel all-to-all, pipeline p2p, data-parallel and optimizer times, then GPU-hours per trillion tokens
next to the paper's figures. Sources: paper §3.1-3.4 (DualPipe, node-limited all-to-all, FP8 recipe, memory
savers), §4.2 and Table 1 (batch, tokens, GPU-hours); reference §5.3 (what is FP8), §7 (numbers), §8.3 (bubble
and memory of the schedules), §11 (DeepEP). Every assumption is written down in docs/design.md ("Planner").

Plain Python arithmetic on the config fields (the mesh spec parser is sharding.mesh's); tests cross-check the counts against dsv3_jax.stats and
dsv3_jax.train.flops.
"""

from __future__ import annotations

import dataclasses
import math

from dsv3_jax.config import ModelConfig
from sharding.expert_parallel import ep_capacity, ep_worst_case_capacity
from sharding.mesh import MESH_AXES

SCHEDULES = ("dualpipe", "dualpipev", "1f1b", "zb1p", "gpipe")
PRECISIONS = ("fp8", "bf16")
MASTER_WEIGHTS = ("sharded", "whole")
EDGES = ("own", "replicated")
ACTIVATIONS = ("kept", "recomputed")
_OVERLAPPED = ("dualpipe", "dualpipev")  # schedules that pair a forward and a backward chunk (paper §3.2.1)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Per-GPU peak figures. Bandwidths are per GPU and per direction, as bytes / bandwidth = time uses them."""

    name: str
    bf16_tflops: float  # dense tensor-core peak
    fp8_tflops: float
    hbm_gb: float
    hbm_tbps: float
    nvlink_gbps: float
    ib_gbps: float
    gpus_per_node: int = 8
    sms: int = 132


# H800: the paper's own figures for NVLink (160 GB/s) and IB (50 GB/s) per GPU (§3.2.2); compute and HBM as H100
# SXM, which it equals except for NVLink. H100/H200 SXM: NVIDIA datasheet peaks (dense), NVLink 900 GB/s total =
# 450 per direction, one 400 Gb/s NDR NIC per GPU.
HARDWARE: dict[str, Hardware] = {
    "h800": Hardware("H800", 989.4, 1978.9, 80, 3.35, 160, 50),
    "h100": Hardware("H100", 989.4, 1978.9, 80, 3.35, 450, 50),
    "h200": Hardware("H200", 989.4, 1978.9, 141, 4.8, 450, 50),
}

# Paper Table 1 / §1 and §4.2; reference §7.
PAPER = {
    "gpus": 2048, "hardware": "h800", "tokens": 14.8e12, "gpu_hours_per_trillion": 180e3,
    "pretrain_gpu_hours": 2664e3, "context_extension_gpu_hours": 119e3, "post_training_gpu_hours": 5e3,
    "total_gpu_hours": 2788e3, "days_per_trillion": 3.7,
}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What the planner assumes about the run; the defaults are the paper's pre-training (§3.2, §4.2)."""

    global_batch: int = 15360  # sequences per step (after the ramp from 3072, which covers 469B of 14.8T tokens)
    seq_len: int = 4096
    micro_batch: int = 1  # sequences per micro-batch on one data-parallel rank (not in the paper)
    schedule: str = "dualpipe"
    precision: str = "fp8"
    # Achieved fraction of the dense peak by the kernels, on the SMs they get: DeepGEMM's first release reports
    # up to ~1350 of 1979 FP8 TFLOP/s (0.68) at its best shapes; FlashAttention-3-class attention kernels reach
    # ~0.6 of the BF16 peak forward and less backward.
    gemm_efficiency: float = 0.6
    attention_efficiency: float = 0.5
    comm_sms: int = 20  # SMs given to dispatch/combine while DualPipe overlaps them (paper §3.2.2)
    tokens: float = 14.8e12  # pre-training tokens
    # "sharded": the paper's ZeRO-1 (BF16 working weights held whole, FP32 master weights sharded with the
    # moments); "whole": this code's ZeRO-1 (sharding.rules 'zero1': FP32 weights held whole and cast to the
    # compute dtype where used, only the AdamW moments sharded), what `dsv3 plan --compile` measures
    master_weights: str = "sharded"
    # Where the units other than MoE blocks (embedding, dense blocks, MTP modules, head) live under pp: "own" on
    # their stages' ranks (the paper); "replicated" on every pp rank, as this code's pipeline state keeps them
    # (sharding/pipeline_transformer.py: only the MoE stack is sharded over pp), what `--compile` measures.
    edges: str = "own"
    # What a pipeline stage keeps for its backward pass (with pp > 1): "kept", each chunk in flight keeps its
    # activations (the paper, §3.2.1); "recomputed", as this code's executor does (sharding/pipeline_exec.py): each
    # micro-batch in flight keeps only its stage input and output gradient (BF16, in buffer slots), the backward
    # recomputes the stage forward, so one chunk's activations exist at a time, and the chunk's weight gradient
    # is produced whole (FP32) before it is added to the accumulators. What `--compile` measures.
    activations: str = "kept"

    def validate(self) -> "TrainSettings":
        """Raise ValueError naming the setting; return self."""
        for name in ("global_batch", "seq_len", "micro_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("gemm_efficiency", "attention_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"master_weights must be one of {MASTER_WEIGHTS}, got {self.master_weights!r}")
        if self.edges not in EDGES:
            raise ValueError(f"edges must be one of {EDGES}, got {self.edges!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if not (isinstance(self.tokens, (int, float)) and self.tokens > 0):
            raise ValueError(f"tokens must be positive, got {self.tokens!r}")
        return self


def resolve_mesh(mesh: dict, gpus: int | None = None) -> dict[str, int]:
    """All four axis sizes (absent axes are 1, an 'auto' axis takes the rest of `gpus`); checks the product."""
    for name in mesh:
        if name not in MESH_AXES:
            raise ValueError(f"mesh: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
    sizes = {a: mesh.get(a, 1) for a in MESH_AXES}
    if gpus is not None and (not isinstance(gpus, int) or gpus <= 0):
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    auto = [a for a, v in sizes.items() if v == "auto"]
    if auto:
        if gpus is None:
            raise ValueError(f"mesh axis {auto[0]}=auto needs the GPU count (--gpus)")
        rest = math.prod(v for a, v in sizes.items() if a != auto[0])
        if gpus % rest:
            raise ValueError(f"mesh: {gpus} GPUs are not a multiple of the other axes' product {rest}, so "
                             f"{auto[0]}=auto has no integer size")
        sizes[auto[0]] = gpus // rest
    for a, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"mesh axis {a} must be a positive integer, got {v!r}")
    product = math.prod(sizes.values())
    if gpus is not None and product != gpus:
        raise ValueError(f"mesh {_mesh_str(sizes)} multiplies to {product} devices, not the {gpus} GPUs")
    return sizes


def _mesh_str(sizes: dict[str, int]) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if a in sizes)


# ----- the model as a sequence of pipeline units -----

@dataclasses.dataclass(frozen=True)
class Unit:
    """One pipeline slot: the embedding, a dense or MoE block, an MTP module, or the final norm + head.

    FLOPs are forward FLOPs per token; act_bytes are bytes per token kept for the backward pass; hbm_bytes is the
    forward HBM traffic per token of the memory-bound (non-GEMM) operators.
    """

    kind: str
    params: int  # every parameter held by the unit
    expert_params: int  # of which routed experts (sharded over ep)
    fp8_flops: float  # GEMMs that run in FP8 under the paper's recipe (every Linear of a block)
    bf16_flops: float  # GEMMs kept in BF16: output head, MoE gate
    attn_flops: float  # q.k and p.v (BF16 attention kernels)
    recompute_flops: float  # forward FLOPs repeated in the backward pass (MLA up-projections, §3.2.3)
    act_bytes: float
    hbm_bytes: float = 0.0
    a2a_layers: int = 0  # MoE all-to-all rounds (1 for a MoE block or an MoE MTP module)


def _attention(cfg: ModelConfig, seq_len: int, fp8: bool) -> dict:
    d, h, q, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    nope, r, vh = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q_up = q * h * (nope + r) if q else d * h * (nope + r)
    kv_up = kv * h * (nope + vh)
    matrices = (d * q if q else 0) + q_up + d * (kv + r) + kv_up + h * vh * d
    vectors = (q if q else 0) + kv + 2 * d  # q/kv latent norms and the block's two RMSNorm scales
    # Kept for backward: block input (its RMSNorm is recomputed), c_Q, c_KV + k_pe (the up-projections are
    # recomputed), the attention output (input of W^O, E5M6 = 1.5 bytes under FP8) and the softmax LSE (fp32),
    # and the residual after attention (input of the FFN RMSNorm).
    out_bytes = 1.5 if fp8 else 2.0
    act = 2 * d + 2 * q + 2 * (kv + r) + out_bytes * h * vh + 4 * h + 2 * d
    # Memory-bound traffic: RMSNorms on x, c_Q, c_KV (read + write BF16), RoPE on q_pe and k_pe, the attention
    # output converted for W^O, the residual add (read 2, write 1).
    hbm = 4 * d + 4 * q + 4 * kv + 4 * (h * r + r) + (2 + out_bytes) * h * vh + 6 * d
    return dict(params=matrices + vectors, fp8_flops=2.0 * matrices,
                attn_flops=2.0 * h * (cfg.qk_head_dim + vh) * (seq_len + 1) / 2,
                recompute_flops=2.0 * (q_up + kv_up), act_bytes=act, hbm_bytes=hbm)


def _moe(cfg: ModelConfig, fp8: bool) -> dict:
    d, f, e, k, s = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok,
                     cfg.n_shared_experts)
    routed = 3 * e * d * f
    other = 3 * s * d * f + d * e + (e if cfg.expert_bias else 0)
    val = 1 + 4 / 128 if fp8 else 2.0  # an FP8 value with its share of a 1x128 fp32 scale, else BF16
    # Kept: router probabilities (fp32) and top-K ids/weights; the K dispatched FP8 copies of the token (they
    # live on the expert ranks); the SwiGLU inputs of the K routed + shared experts in FP8 (§3.3.4), the SwiGLU
    # output being recomputed. The gate weight scales the SwiGLU output, so no K x D expert output is kept.
    act = 4 * e + 8 * k + k * d * val + (k + s) * 2 * f * val
    # Traffic: the RMSNorm, router scores (fp32), SwiGLU (reads gate and up, writes its output), the FP8 copy
    # of the SwiGLU inputs kept for backward, quantizing the down-projection input, the residual add.
    n = k + s
    hbm = 4 * d + 8 * e + 6 * n * f + 2 * n * f * val + (2 + val) * n * f + 6 * d
    return dict(params=routed + other, expert_params=routed, fp8_flops=2.0 * 3 * (k + s) * d * f,
                bf16_flops=2.0 * d * e, act_bytes=act, hbm_bytes=hbm)


def _dense_ffn(cfg: ModelConfig) -> dict:
    d, i = cfg.hidden_size, cfg.intermediate_size
    # SwiGLU inputs kept in BF16; traffic: RMSNorm, SwiGLU, residual add
    return dict(params=3 * d * i, fp8_flops=2.0 * 3 * d * i, act_bytes=2 * 2 * i, hbm_bytes=4 * d + 6 * i + 6 * d)


def _block(kind: str, cfg: ModelConfig, seq_len: int, fp8: bool) -> Unit:
    attn = _attention(cfg, seq_len, fp8)
    ffn = _moe(cfg, fp8) if kind == "moe" else _dense_ffn(cfg)
    return Unit(kind, params=attn["params"] + ffn["params"], expert_params=ffn.get("expert_params", 0),
                fp8_flops=attn["fp8_flops"] + ffn["fp8_flops"], bf16_flops=ffn.get("bf16_flops", 0.0),
                attn_flops=attn["attn_flops"], recompute_flops=attn["recompute_flops"],
                act_bytes=attn["act_bytes"] + ffn["act_bytes"], hbm_bytes=attn["hbm_bytes"] + ffn["hbm_bytes"],
                a2a_layers=int(kind == "moe"))


def model_units(cfg: ModelConfig, seq_len: int, fp8: bool = True) -> list[Unit]:
    """The model in pipeline order: embedding, dense blocks, MoE blocks, MTP modules, head (each one slot)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    head_params = d + (0 if cfg.tie_word_embeddings else v * d)  # final norm + head
    units = [Unit("embed", v * d, 0, 0.0, 0.0, 0.0, 0.0, 0.0)]
    units += [_block("dense", cfg, seq_len, fp8) for _ in range(cfg.num_dense_layers)]
    units += [_block("moe", cfg, seq_len, fp8) for _ in range(cfg.num_moe_layers)]
    block = _block("moe" if cfg.mtp_layer_is_moe else "dense", cfg, seq_len, fp8)
    for _ in range(cfg.num_mtp_layers):
        # enorm, hnorm, eh_proj [2D -> D], a block, its head norm; the embedding and head are shared (§2.2), so
        # the module pays the head's FLOPs but not its parameters. Kept: the embedded shifted token and h (2 x D,
        # their norms recomputed), the head input and the LSE of a fused cross-entropy.
        units.append(dataclasses.replace(
            block, kind="mtp", params=block.params + 3 * d + 2 * d * d, fp8_flops=block.fp8_flops + 2.0 * 2 * d * d,
            bf16_flops=block.bf16_flops + 2.0 * v * d, act_bytes=block.act_bytes + 2 * 2 * d + 2 * d + 4,
            hbm_bytes=block.hbm_bytes + 3 * 4 * d))
    # Kept for the head: the final hidden state (its norm recomputed) and the LSE of a fused (chunked)
    # cross-entropy, so no [T, V] logits are stored.
    units.append(Unit("head", head_params, 0, 0.0, 2.0 * v * d, 0.0, 0.0, 2 * d + 4, hbm_bytes=4 * d))
    return units


# ----- the plan -----

def _bubble(schedule: str, stages: int, f: float, b: float, w: float) -> float:
    """Pipeline bubble of reference §8.3 (stages = pipeline stages, PP in the table)."""
    if schedule == "none":
        return 0.0
    if schedule in ("1f1b", "gpipe"):
        return (stages - 1) * (f + b)
    if schedule == "zb1p":
        return (stages - 1) * (f + b - 2 * w)
    return (stages // 2 - 1) * ((f + b) + b - 3 * w)  # DualPipe(V): F&B = F + B (its communication hidden)


def _ring_bytes(size: float, group: int) -> float:
    """Bytes one rank sends in a ring reduce-scatter (or all-gather) of `size` bytes over `group` ranks."""
    return size * (group - 1) / group if group > 1 else 0.0


def plan(cfg: ModelConfig, mesh: dict, hardware: str | Hardware = "h800",
         settings: TrainSettings | None = None, gpus: int | None = None) -> dict:
    """Estimate memory per device and time per step; returns a flat dict of numbers (see format_plan)."""
    s = (settings or TrainSettings()).validate()
    hw = hardware if isinstance(hardware, Hardware) else _hardware(hardware)
    m = resolve_mesh(mesh, gpus)
    pp, dp, ep, tp = (m[a] for a in MESH_AXES)
    n_gpus = pp * dp * ep * tp
    fp8 = s.precision == "fp8"
    schedule = s.schedule if pp > 1 else "none"

    # --- validation of the layout ---
    if cfg.n_routed_experts and cfg.n_routed_experts % ep:
        raise ValueError(f"mesh ep={ep} does not divide the {cfg.n_routed_experts} routed experts")
    if not cfg.n_routed_experts and ep > 1:
        raise ValueError(f"mesh ep={ep} needs routed experts; the config has none")
    if tp > 1:
        for name in ("num_attention_heads", "moe_intermediate_size", "intermediate_size"):
            if getattr(cfg, name) % tp:
                raise ValueError(f"mesh tp={tp} does not divide ModelConfig.{name} ({getattr(cfg, name)})")
    units = model_units(cfg, s.seq_len, fp8)
    n_stages = 2 * pp if schedule == "dualpipev" else pp
    if len(units) < n_stages:
        raise ValueError(
            f"the model's {len(units)} pipeline units ({cfg.num_hidden_layers} layers + {cfg.num_mtp_layers} MTP "
            f"+ embedding + head) are fewer than the {n_stages} pipeline stages (pp={pp}, {schedule})")
    data_ranks = dp * ep
    if s.global_batch % (data_ranks * s.micro_batch):
        raise ValueError(f"global batch {s.global_batch} is not divisible by dp*ep*micro_batch = "
                         f"{dp}*{ep}*{s.micro_batch}")
    n_micro = s.global_batch // (data_ranks * s.micro_batch)  # micro-batches per pipeline per step
    if schedule == "dualpipe" and (pp % 2 or n_micro % 2 or n_micro < 2 * pp):
        raise ValueError(f"DualPipe needs an even pp and an even number of micro-batches >= 2*pp; got pp={pp}, "
                         f"{n_micro} micro-batches (global batch / (dp*ep*micro_batch))")
    if schedule == "dualpipev" and n_micro < 2 * pp:
        raise ValueError(f"DualPipeV needs at least 2*pp = {2 * pp} micro-batches, got {n_micro}")

    # contiguous stages of equal unit counts where they divide, else the first len % n_stages stages hold one
    # unit more (uneven stages; a cost-balanced split is not modelled)
    per_stage, extra = divmod(len(units), n_stages)
    bounds = [i * per_stage + min(i, extra) for i in range(n_stages + 1)]
    stages = [units[bounds[i]:bounds[i + 1]] for i in range(n_stages)]
    # (stage, passes per micro-batch) on each rank: a DualPipe micro-batch meets rank r in one of its two stages
    # (half of them flow each way); a DualPipeV micro-batch meets it twice (going down the V and coming back).
    if schedule == "dualpipe":
        rank_stages = [((r, 0.5), (pp - 1 - r, 0.5)) for r in range(pp)]
    elif schedule == "dualpipev":
        rank_stages = [((r, 1.0), (2 * pp - 1 - r, 1.0)) for r in range(pp)]
    else:
        rank_stages = [((r, 1.0),) for r in range(pp)]
    copies = 2 if schedule == "dualpipe" else 1  # ranks holding each stage within one data-parallel replica

    # --- compute per chunk (one stage, one micro-batch) ---
    mb_tokens = s.micro_batch * s.seq_len
    if not 0 <= s.comm_sms < hw.sms:
        raise ValueError(f"comm_sms must be in [0, {hw.sms}) for {hw.name}, got {s.comm_sms}")
    sm_share = (hw.sms - s.comm_sms) / hw.sms if schedule in _OVERLAPPED else 1.0
    gemm8 = (hw.fp8_tflops if fp8 else hw.bf16_tflops) * 1e12 * s.gemm_efficiency * sm_share
    gemm16 = hw.bf16_tflops * 1e12 * s.gemm_efficiency * sm_share
    attn = hw.bf16_tflops * 1e12 * s.attention_efficiency * sm_share

    def chunk(stage: list[Unit]) -> dict:
        fp8f, bf16f, attnf, recf = (sum(getattr(u, k) for u in stage) * mb_tokens / tp
                                    for k in ("fp8_flops", "bf16_flops", "attn_flops", "recompute_flops"))
        # memory-bound operators at the HBM bandwidth; backward moves twice the forward traffic (gradients in
        # and out, recomputed norms, the 128x1 re-quantization of GEMM inputs)
        mem_f = sum(u.hbm_bytes for u in stage) * mb_tokens / tp / (hw.hbm_tbps * 1e12)
        f = fp8f / gemm8 + bf16f / gemm16 + attnf / attn + mem_f
        w = fp8f / gemm8 + bf16f / gemm16  # weight-gradient GEMMs: as many FLOPs as the forward GEMMs
        b = 2 * f + recf / gemm8  # input + weight gradients, plus the recomputed up-projections
        a2a = sum(u.a2a_layers for u in stage)
        blocks = sum(u.kind in ("dense", "moe", "mtp") for u in stage)
        return dict(f=f, b=b, w=w, rec=recf / gemm8, membound=3 * mem_f, fp8=3 * fp8f + recf,
                    flops=3 * (fp8f + bf16f + attnf) + recf, a2a=a2a, blocks=blocks)

    chunks = [chunk(st) for st in stages]

    def per_rank(r: int, key: str) -> float:
        """A chunk quantity summed over one step's passes through rank r."""
        return n_micro * sum(v * chunks[i][key] for i, v in rank_stages[r])

    # --- memory per device ---
    zero_dense, zero_expert = copies * dp * ep, copies * dp  # ZeRO-1 groups: every rank holding the same weights

    def in_flight(r: int) -> int:
        """Stage chunks whose forward ran and whose backward has not, at the rank's peak (§8.3)."""
        if schedule in ("1f1b", "zb1p"):
            return min(pp - r, n_micro)  # rank r of 1F1B warms up with pp - r forwards
        return {"none": 1, "gpipe": n_micro, "dualpipe": pp + 1, "dualpipev": 2 * pp + 1}[schedule]

    # Expert-parallel dispatch buffers of one MoE layer (sharding/expert_parallel.py), live while the layer runs:
    # the send buffer and the receive buffer of a round, ep x C rows each of D values in BF16 (the token rows
    # travel in the compute dtype; the FP8 path quantizes them on the expert's rank). "worst case": the static
    # buffer before the bounded rounds, C = T x min(K, E / ep).
    ep_rows = ep_rows_worst = 0
    if ep > 1:
        ep_rows = ep * ep_capacity(cfg, mb_tokens, ep)
        ep_rows_worst = ep * ep_worst_case_capacity(cfg, mb_tokens, ep)
    ep_row_bytes = 2.0 * cfg.hidden_size

    def memory(r: int) -> dict:
        ids_r = [i for i, _ in rank_stages[r]]
        held = [u for i in ids_r for u in stages[i]]
        if s.edges == "replicated" and pp > 1:
            held = [u for u in held if u.kind == "moe"] + [u for st in stages for u in st if u.kind != "moe"]
        dense_p = sum(u.params - u.expert_params for u in held) / tp
        expert_p = sum(u.expert_params for u in held) / (ep * tp)
        sharded = dense_p / zero_dense + expert_p / zero_expert
        chunk_act = max(sum(u.act_bytes for u in stages[i]) for i in ids_r) * mb_tokens / tp
        whole = s.master_weights == "whole"  # FP32 weights held whole instead of BF16 + sharded FP32 master
        if s.activations == "recomputed" and pp > 1:
            # buffer slots (the executor's pool has about one per chunk in flight, plus a discard slot) for the
            # stage input and output gradient; one chunk's activations; its FP32 weight gradient
            chunk_params = max(sum(u.params - u.expert_params + u.expert_params / ep for u in stages[i])
                               for i in ids_r) / tp
            activations = ((in_flight(r) + 1) * 2 * 2.0 * mb_tokens * cfg.hidden_size / tp + chunk_act
                           + 4.0 * chunk_params)
        else:
            activations = in_flight(r) * chunk_act
        mem = dict(held=dense_p + expert_p, dense=dense_p, expert=expert_p, sharded=sharded, chunk_act=chunk_act,
                   params=(4.0 if whole else 2.0) * (dense_p + expert_p),  # FP32 or BF16 weights
                   grads=4.0 * (dense_p + expert_p),  # FP32 gradient accumulators (ZeRO-1 keeps them whole)
                   optimizer=(2 * 2.0 + (0.0 if whole else 4.0)) * sharded,  # BF16 AdamW m, v (+ FP32 master)
                   activations=activations, in_flight=in_flight(r),
                   dispatch=2 * ep_rows * ep_row_bytes if any(u.a2a_layers for i in ids_r for u in stages[i]) else 0.0)
        mem["state"] = mem["params"] + mem["optimizer"]  # what lives between steps (XLA: the step's arguments)
        mem["total"] = mem["params"] + mem["grads"] + mem["optimizer"] + mem["activations"] + mem["dispatch"]
        return mem

    # --- communication constants ---
    d, k, gpn = cfg.hidden_size, cfg.num_experts_per_tok, hw.gpus_per_node
    ep_nodes = max(1, math.ceil(ep * tp / gpn))  # ep ranks are laid out contiguously over nodes
    limit = cfg.topk_group * max(1, ep_nodes // cfg.n_group) if cfg.n_group > 1 else k
    nodes_reached = min(k, limit, ep_nodes)  # node-limited routing: at most topk_group nodes per token
    ib_copies = nodes_reached * (1 - 1 / ep_nodes)  # the source node is one of them with chance R / nodes
    per_node = max(1, min(gpn // tp, ep))
    # other GPUs of a reached node holding at least one of the token's K/R experts there (spread uniformly)
    nvl_copies = nodes_reached * (per_node - 1) * (1 - (1 - 1 / per_node) ** (k / nodes_reached))
    val = 1 + 4 / 128 if fp8 else 2.0
    # forward: dispatch (FP8) + combine (BF16); backward: the gradient dispatch before the down-projection (FP8)
    # and the combine of input gradients (BF16) (§3.3.4).
    token_bytes = (2 * d * val + 2 * 2 * d) / tp
    stage_gpus = dp * ep * tp
    pp_bw = (hw.ib_gbps if stage_gpus >= gpn else hw.nvlink_gbps) * 1e9
    dp_bw = (hw.ib_gbps if stage_gpus * copies > gpn else hw.nvlink_gbps) * 1e9
    tp_bw = (hw.nvlink_gbps if tp <= gpn else hw.ib_gbps) * 1e9
    overlapped = schedule in _OVERLAPPED

    def timing(r: int, mem: dict) -> dict:
        """Seconds per step on rank r: its compute, bubble, communication, then the data-parallel update."""
        passes = sum(v for _, v in rank_stages[r])
        t = dict(compute=per_rank(r, "f") + per_rank(r, "b"), recompute=per_rank(r, "rec"),
                 membound=per_rank(r, "membound"))
        t.update({k_: per_rank(r, k_) / (n_micro * passes) for k_ in ("f", "b", "w")})  # the rank's mean chunk
        t["bubble"] = _bubble(schedule, n_stages, t["f"], t["b"], t["w"])
        a2a_tokens = per_rank(r, "a2a") * mb_tokens  # token x MoE-layer passes
        t["ep_ib"], t["ep_nvl"] = a2a_tokens * ib_copies * token_bytes, a2a_tokens * nvl_copies * token_bytes
        t["ep"] = max(t["ep_ib"] / (hw.ib_gbps * 1e9), t["ep_nvl"] / (hw.nvlink_gbps * 1e9))
        # each pass through a stage sends its output on and its input gradient back (BF16)
        t["pp_bytes"] = n_micro * passes * mb_tokens * d * 2 * 2 / tp if pp > 1 else 0.0
        t["pp"] = t["pp_bytes"] / pp_bw
        # TP (with sequence parallelism): per block two all-reduces forward and two backward of BF16 activations
        t["tp_bytes"] = per_rank(r, "blocks") * mb_tokens * 4 * 2 * d * 2 * (tp - 1) / tp
        t["tp"] = t["tp_bytes"] / tp_bw
        comm = t["ep"] + t["pp"]
        t["exposed"] = max(0.0, comm - t["compute"]) if overlapped else comm
        t["pipeline"] = t["compute"] + t["bubble"] + t["exposed"] + t["tp"]
        # after the last backward: FP32 gradient reduce-scatter + BF16 parameter all-gather per ZeRO-1 group
        # (FP32 parameters all-gathered when they are held whole in FP32)
        sync = 8.0 if s.master_weights == "whole" else 6.0
        t["dp_bytes"] = _ring_bytes(sync * mem["dense"], zero_dense) + _ring_bytes(sync * mem["expert"], zero_expert)
        t["dp"] = t["dp_bytes"] / dp_bw
        # AdamW on the local shard: read grad (4), master (4), m, v (2+2); write master, m, v and the BF16 weight
        t["optimizer"] = mem["sharded"] * 22 / (hw.hbm_tbps * 1e12)
        return t

    mems = [memory(r) for r in range(pp)]
    times = [timing(r, mems[r]) for r in range(pp)]
    worst = max(range(pp), key=lambda r: mems[r]["total"])
    slow = max(range(pp), key=lambda r: times[r]["pipeline"])
    mem, t = mems[worst], times[slow]
    # the pipeline ends together on every rank; then each rank syncs its gradients and updates its shard
    step_s = t["pipeline"] + max(x["dp"] + x["optimizer"] for x in times)
    mean_compute = sum(x["compute"] for x in times) / pp

    tokens_step = s.global_batch * s.seq_len
    tokens_per_s = tokens_step / step_s
    gpu_h_per_t = n_gpus * 1e12 / tokens_per_s / 3600
    pretrain_h = gpu_h_per_t * s.tokens / 1e12
    flops_token = 3 * sum(u.fp8_flops + u.bf16_flops + u.attn_flops for u in units)
    paper_setup = (cfg == ModelConfig() and hw.name.lower() == PAPER["hardware"] and (pp, dp * ep, ep, tp) == (
        16, 128, 64, 1) and (schedule, s.precision, s.global_batch, s.seq_len) == ("dualpipe", "fp8", 15360, 4096))
    out = {
        "gpus": n_gpus, **{a: m[a] for a in MESH_AXES}, "hardware": hw.name, "schedule": schedule,
        "precision": s.precision, "global_batch": s.global_batch, "seq_len": s.seq_len,
        "micro_batch": s.micro_batch, "micro_batches_per_step": n_micro, "tokens_per_step": tokens_step,
        "pipeline_units": len(units), "stages": n_stages, "units_per_stage": per_stage + (extra > 0),
        "uneven_stages": extra,
        "gemm_efficiency": s.gemm_efficiency, "attention_efficiency": s.attention_efficiency,
        "compute_sm_share": sm_share,
        # memory (bytes) on the worst rank
        "mem_rank": worst, "params_per_device": mem["held"], "param_bytes": mem["params"],
        "grad_bytes": mem["grads"], "optimizer_bytes": mem["optimizer"], "activation_bytes": mem["activations"],
        "state_bytes": mem["state"], "master_weights": s.master_weights,
        "activation_bytes_per_chunk": mem["chunk_act"], "chunks_in_flight": mem["in_flight"],
        "activation_bytes_per_block": max(u.act_bytes for u in units) * mb_tokens / tp,  # one micro-batch
        "ep_dispatch_rows": ep_rows, "ep_dispatch_bytes": ep_rows * ep_row_bytes,  # one send buffer, one layer
        "ep_dispatch_rows_worst_case": ep_rows_worst, "ep_dispatch_bytes_worst_case": ep_rows_worst * ep_row_bytes,
        "ep_buffer_bytes": mem["dispatch"],  # send + receive buffers on the worst rank (in total_bytes)
        "total_bytes": mem["total"], "hbm_bytes": hw.hbm_gb * 1e9, "fits": mem["total"] <= hw.hbm_gb * 1e9,
        "zero_group_dense": zero_dense, "zero_group_expert": zero_expert,
        # time (seconds per step) on the slowest rank
        "time_rank": slow, "stage_imbalance": t["compute"] / mean_compute,
        "imbalance_s": t["compute"] - mean_compute,
        "chunk_f_s": t["f"], "chunk_b_s": t["b"], "chunk_w_s": t["w"], "compute_s": t["compute"],
        "recompute_s": t["recompute"], "memory_bound_s": t["membound"],
        "fp8_flop_share": sum(c["fp8"] for c in chunks) / sum(c["flops"] for c in chunks) if fp8 else 0.0,
        "bubble_s": t["bubble"], "ep_ib_bytes": t["ep_ib"], "ep_nvlink_bytes": t["ep_nvl"],
        "ep_nodes_per_token": nodes_reached, "ep_s": t["ep"], "pp_bytes": t["pp_bytes"], "pp_s": t["pp"],
        "tp_bytes": t["tp_bytes"], "tp_s": t["tp"], "comm_overlapped": overlapped, "exposed_comm_s": t["exposed"],
        "dp_bytes": t["dp_bytes"], "dp_s": t["dp"], "optimizer_s": t["optimizer"], "step_s": step_s,
        "tokens_per_s": tokens_per_s, "model_flops_per_token": flops_token,
        "mfu_bf16_peak": tokens_per_s * flops_token / (n_gpus * hw.bf16_tflops * 1e12),
        "gpu_hours_per_trillion": gpu_h_per_t, "days_per_trillion": gpu_h_per_t / n_gpus / 24,
        "pretrain_tokens": s.tokens, "pretrain_gpu_hours": pretrain_h,
        "total_gpu_hours": pretrain_h + PAPER["context_extension_gpu_hours"] + PAPER["post_training_gpu_hours"],
        "paper_setup": paper_setup,
    }
    for key in ("gpu_hours_per_trillion", "pretrain_gpu_hours", "total_gpu_hours", "days_per_trillion"):
        out[f"paper_{key}"] = PAPER[key]
        out[f"ratio_{key}"] = out[key] / PAPER[key]
    return out


def _hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}")
    return HARDWARE[name]


def format_plan(p: dict, model: str = "") -> str:
    """A readable table of a plan() result, with the paper's figures and the ratio estimate / paper."""
    gib = 2 ** 30

    def row(label: str, value: float) -> str:
        return f"  {label:<62}{value:10.2f}" if value == 0 or value >= 0.01 else f"  {label:<62}{value:10.1e}"

    mesh = _mesh_str({a: p[a] for a in MESH_AXES})
    whole = p.get("master_weights") == "whole"
    lines = [
        f"dsv3 plan: {model or 'model'} on {p['gpus']} x {p['hardware']} ({mesh}), {p['schedule']}, "
        f"{p['precision']}",
        f"  step: {p['global_batch']} sequences x {p['seq_len']} tokens = {p['tokens_per_step'] / 1e6:.1f}M tokens; "
        f"{p['micro_batches_per_step']} micro-batches of {p['micro_batch']} per pipeline",
        f"  {p['stages']} stages x {p['units_per_stage']} units"
        + (f" ({p['uneven_stages']} of them; the others one fewer)" if p.get("uneven_stages") else "")
        + f" ({p['pipeline_units']} = layers + MTP + embedding + head)",
        f"  assumed: GEMMs at {p['gemm_efficiency']:.0%} and attention at {p['attention_efficiency']:.0%} of peak, "
        f"on {p['compute_sm_share']:.0%} of the SMs; "
        + ("all-to-all and PP p2p overlapped with compute" if p["comm_overlapped"] else "communication not overlapped"),
        "",
        f"  {'memory per device (rank ' + str(p['mem_rank']) + ', the fullest)':<62}{'GiB':>10}",
        row(f"weights, {'FP32' if whole else 'BF16'} ({p['params_per_device'] / 1e9:.2f}B parameters held)",
            p["param_bytes"] / gib),
        row("gradients, FP32", p["grad_bytes"] / gib),
        row(f"{'' if whole else 'master FP32 + '}AdamW m, v BF16 (ZeRO-1 over {p['zero_group_dense']} / "
            f"{p['zero_group_expert']} ranks)", p["optimizer_bytes"] / gib),
        row(f"activations ({p['chunks_in_flight']} chunks x {p['activation_bytes_per_chunk'] / gib:.2f} GiB; "
            f"{p['activation_bytes_per_block'] / gib:.2f} GiB for the largest block)",
            p["activation_bytes"] / gib),
        row(f"EP send + receive buffers, one MoE layer (2 x {p['ep_dispatch_rows']:,} rows)",
            p["ep_buffer_bytes"] / gib),
        f"    (one buffer {p['ep_dispatch_rows']:,} rows = {p['ep_dispatch_bytes'] / 1e9:.2f} GB; the unbounded worst "
        f"case {p['ep_dispatch_rows_worst_case']:,} rows = {p['ep_dispatch_bytes_worst_case'] / 1e9:.2f} GB)",
        row(f"total (of {p['hbm_bytes'] / gib:.1f} GiB HBM: {'fits' if p['fits'] else 'DOES NOT FIT'})",
            p["total_bytes"] / gib),
        "",
        f"  {'time per step (rank ' + str(p['time_rank']) + ', the slowest)':<62}{'s':>10}",
        row(f"compute ({p['fp8_flop_share']:.0%} of FLOPs in FP8; incl. {p['recompute_s']:.2f} s recomputation)",
            p["compute_s"]),
        row("  of which memory-bound operators (norms, SwiGLU, quantization)", p["memory_bound_s"]),
        row(f"  of which stage imbalance ({p['stage_imbalance']:.2f} x the mean rank)", p["imbalance_s"]),
        row("pipeline bubble", p["bubble_s"]),
        row(f"EP all-to-all ({p['ep_ib_bytes'] / 1e9:.0f} GB IB, {p['ep_nvlink_bytes'] / 1e9:.0f} GB NVLink, "
            f"{p['ep_nodes_per_token']} node(s) per token)", p["ep_s"]),
        row(f"PP p2p ({p['pp_bytes'] / 1e9:.1f} GB)", p["pp_s"]),
        row("  exposed EP + PP communication", p["exposed_comm_s"]),
        row(f"TP all-reduce ({p['tp_bytes'] / 1e9:.1f} GB)", p["tp_s"]),
        row(f"DP reduce-scatter + all-gather ({p['dp_bytes'] / 1e9:.1f} GB)", p["dp_s"]),
        row("optimizer update", p["optimizer_s"]),
        row("step", p["step_s"]),
        f"  tokens/s {p['tokens_per_s']:,.0f} ({p['tokens_per_s'] / p['gpus']:,.0f} per GPU); "
        f"{p['model_flops_per_token'] / 1e9:.1f} GFLOP per token; MFU against the BF16 peak {p['mfu_bf16_peak']:.1%}",
        "",
        f"  {'':<44}{'estimate':>12}{'paper':>12}{'ratio':>8}",
    ]
    rows = [("GPU-hours per trillion tokens", "gpu_hours_per_trillion", 1e3, "K"),
            ("days per trillion tokens", "days_per_trillion", 1, " "),
            (f"pre-training, {p['pretrain_tokens'] / 1e12:g}T tokens, GPU-hours", "pretrain_gpu_hours", 1e3, "K"),
            ("+ context ext. 119K + post-training 5K", "total_gpu_hours", 1e3, "K")]
    for label, key, scale, unit in rows:
        ratio = f"{p['ratio_' + key]:8.2f}" if p["paper_setup"] else f"{'-':>8}"
        lines.append(f"  {label:<44}{p[key] / scale:11,.1f}{unit}{p['paper_' + key] / scale:11,.1f}{unit}{ratio}")
    if not p["paper_setup"]:
        lines.append("  (no ratio: the paper's figures are for DeepSeek-V3 on 2048 H800, pp=16, ep=64, DualPipe, FP8, "
                     "batch 15360 x 4096)")
    return "\n".join(lines)
