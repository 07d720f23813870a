"""`dsv3 train`: the pretraining loop (paper §4): data, schedules, checkpoints, metrics, spike guard, a sample.

Everything a run needs to continue lives in WORKDIR: checkpoints/ (orbax: parameters, optimizer state, expert
bias, step, data position, tokenizer, config and run arguments), metrics.jsonl (one object per step), events.jsonl
(skipped updates, restores, saves), tokenizer and token caches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig, apply_overrides, get_preset
from dsv3_jax.inference.generate import generate_text
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.options import key_values
from dsv3_jax.precision import Precision
from dsv3_jax.train.checkpoint import Checkpointer
from dsv3_jax.train.flops import measure_peak_flops, training_flops_per_token
from dsv3_jax.train.heldout import Evaluator, eval_windows
from dsv3_jax.train.inputs import TEXT_KINDS, default_corpus_files, resolve_inputs
from dsv3_jax.train.optim import (PAPER_FINAL_LR, PAPER_MTP_WEIGHT_LATE, PAPER_PEAK_LR, batch_size_schedule,
                                  bias_update_speed_schedule, constant_schedule, lr_schedule, make_optimizer,
                                  mtp_weight_schedule)
from dsv3_jax.train.packing import PackedBatches, check_seq_len
from dsv3_jax.train.step import BALANCE_SCOPES, StepConfig, init_state, make_train_step, split_model
from dsv3_jax.train.tokenizer import Tokenizer, train_or_load_tokenizer
from dsv3_jax.train.tokens import prepare_tokens
from sharding.mesh import build_mesh, default_devices, initialize_distributed, parse_mesh_spec
from sharding.pipeline import SCHEDULES, make_schedule
from sharding.pipeline_transformer import pipeline_layout, pipeline_state
from sharding.stage_layout import tree_from_pipeline
from sharding.rules import ZERO_MODES, batch_spec, train_state_shardings

DEFAULT_LR = {"tiny": 3e-3, "small": 1e-3}  # the paper's 2.2e-4 is for the 671B model; small models take more


@dataclasses.dataclass
class RunArgs:
    """The arguments of one run (what `dsv3 train` parses); saved with every checkpoint."""

    workdir: str
    steps: int
    preset: str | None = "tiny"
    config: str | None = None
    batch: int = 16
    micro_batch: int | None = None
    seq_len: int = 128
    seed: int = 0
    data: list[str] | None = None
    data_field: str = "text"
    data_dtype: str = "uint16"
    corpus_bytes: int = 4_000_000
    precision: str = "fp32"
    lr: float | None = None
    remat: str = "none"
    unroll_layers: bool = False
    resume: bool = False
    stop_at: int | None = None
    save_every: int = 100
    keep: int = 3
    spike_factor: float = 3.0
    spike_warmup: int = 20
    max_spikes: int = 3
    prompt: str = "def "
    sample_tokens: int = 64
    progress: bool = True
    mesh: str | None = None  # e.g. "dp=2,ep=4" (sharding/mesh.py); None: all devices on dp
    zero: str = "zero1"  # "zero1": optimizer moments split over the data axes; "fsdp": parameters too
    pipeline: str | None = None  # schedule over the mesh's pp axis (sharding/pipeline.py SCHEDULES); needs pp > 1
    microbatches: int | None = None  # pipeline micro-batches per --micro-batch (default 2 * pp)
    stage_layers: str | None = None  # transformer layers per pipeline stage "N0,N1,..." (default: cost-balanced)
    init: str | None = None  # continue pretraining from this work directory / released checkpoint's weights
    yarn_factor: float | None = None  # with init: switch the rope to YaRN with this scale factor (paper §4.3)
    yarn_original_len: int | None = None  # YaRN's original length (default: the init run's --seq-len)
    # research switches (issue 11): load balancing, MTP, model-config overrides, FIM, held-out evaluation
    balance: str = "aux-free"  # "aux-free" (bias rule + alpha 1e-4), "aux-loss" (no bias, alpha 1e-3), "none"
    balance_scope: str = "sequence"  # balance term over each sequence (eqs. 17-20) or the batch (§4.5.3)
    balance_alpha: float | None = None  # override of the strategy's alpha
    gamma: float | None = None  # constant bias update speed (aux-free only; default the paper's schedule)
    mtp_depth: int | None = None  # ModelConfig.num_mtp_layers override (0: no MTP)
    mtp_weight: float | None = None  # constant MTP loss weight (default the 0.3 -> 0.1 schedule)
    set: list[str] | None = None  # ModelConfig overrides "KEY=VALUE"
    fim_rate: float = 0.1  # paper §4.1: Prefix-Suffix-Middle rate of text documents (0: off)
    eval_fraction: float = 0.01  # held-out fraction of whole documents (0: no held-out split)
    eval_every: int = 0  # held-out evaluation every N steps and at the end (0: off)
    eval_batches: int = 4  # micro-batches per evaluated set
    eval_data: list[str] | None = None  # extra evaluation sets "NAME=PATH" (per-domain expert loads)


BALANCE_MODES = ("aux-free", "aux-loss", "none")
DEFAULT_BALANCE_ALPHA = {"aux-free": 1e-4, "aux-loss": 1e-3, "none": 0.0}  # aux-loss: our choice (paper: none given)


class TrainingInterrupted(Exception):
    pass


def _validate(args: RunArgs) -> None:
    for name in ("steps", "batch", "seq_len", "save_every", "keep", "max_spikes"):
        value = getattr(args, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if args.micro_batch is not None and (args.micro_batch <= 0 or args.batch % args.micro_batch):
        raise ValueError(f"--micro-batch {args.micro_batch} must be positive and divide --batch {args.batch}")
    if args.stop_at is not None and not 0 < args.stop_at <= args.steps:
        raise ValueError(f"--stop-at {args.stop_at} must be in [1, --steps {args.steps}]")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.sample_tokens < 0:
        raise ValueError(f"--sample-tokens must be >= 0, got {args.sample_tokens}")
    _validate_pipeline(args)
    if args.zero not in ZERO_MODES:
        raise ValueError(f"zero must be one of {ZERO_MODES}, got {args.zero!r}")
    _validate_switches(args)


def _validate_switches(args: RunArgs) -> None:
    """ValueError naming the flag for a bad research switch (balance, MTP, FIM, held-out evaluation)."""
    if args.balance not in BALANCE_MODES:
        raise ValueError(f"--balance must be one of {', '.join(BALANCE_MODES)}, got {args.balance!r}")
    if args.balance_scope not in BALANCE_SCOPES:
        raise ValueError(f"--balance-scope must be one of {', '.join(BALANCE_SCOPES)}, got {args.balance_scope!r}")
    if args.balance_scope != "sequence" and args.pipeline is not None:
        raise ValueError("--balance-scope batch is not implemented with --pipeline (the pipeline executor computes "
                         "the sequence-wise term)")
    if args.balance_alpha is not None:
        if not args.balance_alpha >= 0:
            raise ValueError(f"--balance-alpha must be >= 0, got {args.balance_alpha}")
        if args.balance == "none" and args.balance_alpha != 0:
            raise ValueError("--balance none has no balance loss; drop --balance-alpha")
    if args.gamma is not None:
        if not args.gamma >= 0:
            raise ValueError(f"--gamma must be >= 0, got {args.gamma}")
        if args.balance != "aux-free" and args.gamma != 0:
            raise ValueError(f"--gamma is the expert-bias update speed of --balance aux-free; --balance {args.balance} "
                             "keeps the bias at zero")
    if args.mtp_depth is not None and (not isinstance(args.mtp_depth, int) or args.mtp_depth < 0):
        raise ValueError(f"--mtp-depth must be an integer >= 0, got {args.mtp_depth!r}")
    if args.mtp_weight is not None and not args.mtp_weight >= 0:
        raise ValueError(f"--mtp-weight must be >= 0, got {args.mtp_weight}")
    if not 0 <= args.fim_rate <= 1:
        raise ValueError(f"--fim-rate must be in [0, 1], got {args.fim_rate}")
    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if not isinstance(args.eval_every, int) or args.eval_every < 0:
        raise ValueError(f"--eval-every must be an integer >= 0, got {args.eval_every!r}")
    if not isinstance(args.eval_batches, int) or args.eval_batches <= 0:
        raise ValueError(f"--eval-batches must be a positive integer, got {args.eval_batches!r}")
    if args.eval_every and args.eval_fraction == 0 and not args.eval_data:
        raise ValueError("--eval-every needs something to evaluate: --eval-fraction > 0 or --eval-data NAME=PATH")
    if args.eval_data and not args.eval_every:
        raise ValueError("--eval-data is evaluated every --eval-every steps; pass --eval-every N")
    _eval_data_sets(args)


def _eval_data_sets(args: RunArgs) -> dict[str, str]:
    """{name: path} of --eval-data NAME=PATH items; ValueError for a malformed, duplicate or reserved name."""
    out = key_values(args.eval_data, "--eval-data", "NAME=PATH")
    if "heldout" in out:
        raise ValueError("--eval-data heldout: the name 'heldout' is reserved for the run's own held-out split")
    return out


def balance_settings(args: RunArgs) -> tuple[float, float | None]:
    """(balance-loss alpha, constant bias speed or None for the schedule) of --balance/--balance-alpha/--gamma:
    aux-loss and none keep the zero-initialised expert bias at zero (speed 0), so routing runs without bias."""
    alpha = DEFAULT_BALANCE_ALPHA[args.balance] if args.balance_alpha is None else args.balance_alpha
    return alpha, (0.0 if args.balance != "aux-free" else args.gamma)


def _switch_config(args: RunArgs, cfg: ModelConfig) -> ModelConfig:
    """cfg with --set KEY=VALUE and --mtp-depth applied (validated)."""
    if args.set:
        cfg = apply_overrides(cfg, args.set)
    if args.mtp_depth is not None:
        cfg = cfg.replace(num_mtp_layers=args.mtp_depth)
    return cfg


def _check_resumed_data(args: RunArgs, saved: dict | None) -> None:
    """ValueError when a resumed run's data switches differ from the checkpoint's (its data position would point
    into another token stream). Runs saved before a switch existed used the value that means off."""
    if saved is None:
        return
    for name, before in (("fim_rate", 0.0), ("eval_fraction", 0.0)):
        old, new = saved.get(name, before), getattr(args, name)
        if old != new:
            raise ValueError(f"--resume: the run was trained with --{name.replace('_', '-')} {old}, got {new} (it "
                             "changes the token stream)")


def _validate_pipeline(args: RunArgs):
    """The pipeline schedule of --pipeline/--microbatches over --mesh's pp axis (None without pp), or ValueError."""
    sizes = parse_mesh_spec(args.mesh) if args.mesh is not None else {"pp": 1, "dp": 1, "ep": 1}
    pp = sizes["pp"]
    if pp > 1 and args.pipeline is None:
        raise ValueError(f"--mesh {args.mesh}: pipeline parallelism (pp > 1) runs through the pipeline executor; "
                         f"choose its schedule with --pipeline ({'|'.join(SCHEDULES)})")
    if args.pipeline is None:
        if args.microbatches is not None:
            raise ValueError("--microbatches is the pipeline's micro-batch count; it needs --pipeline")
        if args.stage_layers is not None:
            raise ValueError("--stage-layers lays out pipeline stages; it needs --pipeline")
        return None
    if args.pipeline not in SCHEDULES:
        raise ValueError(f"--pipeline {args.pipeline!r}: unknown schedule; expected one of {', '.join(SCHEDULES)}")
    if pp == 1:
        raise ValueError(f"--pipeline {args.pipeline} needs a mesh with a pp axis > 1 (e.g. --mesh pp=2,dp=2,ep=2), "
                         f"got --mesh {args.mesh}")
    m = 2 * pp if args.microbatches is None else args.microbatches
    if not isinstance(m, int) or m <= 0:
        raise ValueError(f"--microbatches must be a positive integer, got {m!r}")
    micro = args.micro_batch or args.batch
    data_ranks = sizes["dp"] * sizes["ep"]
    if micro % m or (micro // m) % data_ranks:
        raise ValueError(f"--microbatches {m}: each micro-batch of {micro} sequences (--micro-batch, or --batch "
                         f"without it) splits into {m} pipeline micro-batches, each of which must split over dp x ep "
                         f"= {data_ranks} ranks; {micro} must be a multiple of {m} * {data_ranks} = {m * data_ranks}")
    try:
        return make_schedule(args.pipeline, pp, m)
    except ValueError as e:
        raise ValueError(f"--pipeline {args.pipeline} with pp={pp}, --microbatches {m}: {e}") from None


class _Log:
    """metrics.jsonl / events.jsonl appenders (line-buffered; a resumed run truncates lines past its step)."""

    def __init__(self, workdir: pathlib.Path, start_step: int, enabled: bool = True):
        self.metrics_path = workdir / "metrics.jsonl"
        self.events_path = workdir / "events.jsonl"
        self.enabled = enabled  # with several processes only process 0 writes
        if enabled:
            _truncate_after(self.metrics_path, start_step)
            self.metrics = open(self.metrics_path, "a", buffering=1)
            self.events = open(self.events_path, "a", buffering=1)

    def metric(self, row: dict) -> None:
        if self.enabled:
            self.metrics.write(json.dumps(row) + "\n")

    def event(self, step: int, kind: str, **info) -> None:
        if not self.enabled:
            return
        row = {"step": step, "event": kind, "time": time.time(), **info}
        self.events.write(json.dumps(row) + "\n")
        print(f"\n[step {step}] {kind}: {info}", file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.events.close()


def _truncate_after(path: pathlib.Path, step: int) -> None:
    """Drop metric rows past `step` (written after the checkpoint a resumed run restarts from)."""
    if not path.exists():
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _model_config(args: RunArgs) -> tuple[ModelConfig, str]:
    if args.config:
        return ModelConfig.from_json_file(args.config), os.path.basename(args.config)
    return get_preset(args.preset), args.preset


def _tokenizer_and_tokens(args: RunArgs, cfg: ModelConfig, workdir: pathlib.Path, saved_tokenizer: str | None,
                          new_tokenizer_ok: bool = True):
    cache = workdir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    inputs = args.data or [str(p) for p in default_corpus_files(args.corpus_bytes)]
    resolved = resolve_inputs(inputs, text_key=args.data_field, bin_dtype=args.data_dtype)
    has_text = any(inp.kind in TEXT_KINDS for inp in resolved)
    if saved_tokenizer is not None:
        tokenizer = Tokenizer.from_json(saved_tokenizer)
    elif has_text and not new_tokenizer_ok:
        raise ValueError(f"--init {args.init}: the checkpoint has no tokenizer, so --data must be pre-tokenized "
                         "(.bin/.npy) token ids of its vocabulary")
    elif has_text:
        tokenizer = train_or_load_tokenizer(resolved, cfg.vocab_size, cache, text_key=args.data_field)
    else:
        tokenizer = None
    fim_rate = args.fim_rate if tokenizer is not None else 0.0  # pre-tokenized data: no FIM
    tokens = prepare_tokens(resolved, tokenizer, cache, cfg.vocab_size, text_key=args.data_field,
                            bin_dtype=args.data_dtype, fim_rate=fim_rate, fim_seed=args.seed,
                            heldout_fraction=args.eval_fraction, split="train")
    return tokenizer, tokens


def _eval_sets(args: RunArgs, cfg: ModelConfig, workdir: pathlib.Path, tokenizer, micro: int) -> dict:
    """{name: windows [batches, micro, S]}: the held-out split (no FIM) and each --eval-data set."""
    if not args.eval_every:
        return {}
    cache = workdir / "cache"
    inputs = args.data or [str(p) for p in default_corpus_files(args.corpus_bytes)]
    streams = {}
    if args.eval_fraction > 0:
        streams["heldout"] = prepare_tokens(inputs, tokenizer, cache, cfg.vocab_size,
                                            text_key=args.data_field, bin_dtype=args.data_dtype,
                                            heldout_fraction=args.eval_fraction, split="heldout")
    for name, path in _eval_data_sets(args).items():
        streams[name] = prepare_tokens([path], tokenizer, cache, cfg.vocab_size, text_key=args.data_field,
                                       bin_dtype=args.data_dtype)
    return {name: eval_windows(t, args.seq_len, args.eval_batches, micro, name) for name, t in streams.items()}


def _abstract(tree):
    """Shapes and dtypes, and the sharding of placed arrays (a restore lands where the state lives)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding if isinstance(
        a, jax.Array) else None), tree)


def _place(tree, shardings):
    """Host or single-device arrays (equal on every process) as global arrays laid out by `shardings`."""
    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def _to_host(tree):
    """Full NumPy copies of (possibly sharded, multi-process) arrays on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flat_state(state) -> dict[str, Any]:
    """The train state as a flat {'params.moe_layers.attn.wq_a': array} dict: plain names on disk, independent of
    the pytree node classes (nnx.State, optax NamedTuples) that hold the arrays in memory."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return {".".join(_key_name(e) for e in path): leaf for path, leaf in leaves}


def unflat_state(flat: dict[str, Any], like):
    """Inverse of flat_state, into the structure of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[".".join(_key_name(e) for e in p)] for p, _ in paths])


class BatchSource(Protocol):
    """What the loop draws its data from: `batch(position, size) -> (rows, new_position)`, rows an int32 array
    [size, S] or a step.Batch of such arrays; `position` (an int) is saved with every checkpoint, so a resumed run
    continues with the very same rows."""

    def batch(self, position: int, size: int) -> tuple[Any, int]: ...


@dataclasses.dataclass
class Session:
    """A run's set-up: its work directory and checkpointer, device mesh, model graph, optimizer and train state
    (fresh, from `init`, or restored with --resume), the step and data position it starts at."""

    workdir: pathlib.Path
    ckpt: Checkpointer
    mesh: Any
    shardings: Any
    graphdef: Any
    optimizer: Any
    state: Any
    start: int = 0
    position: int = 0
    meta: dict | None = None  # the restored checkpoint's metadata (None for a fresh run)
    main_process: bool = True
    pipeline: tuple | None = None  # (StageLayout, homes) when the state holds the MoE stack in the pipeline layout

    def model_tree(self, state):
        """(params, bias) of `state` in the model's tree (the pipeline layout converted back, padding dropped)."""
        if self.pipeline is None:
            return state["params"], state["bias"]
        layout, homes = self.pipeline
        return tree_from_pipeline(state["params"], layout, homes), tree_from_pipeline(state["bias"], layout, homes)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """How the shared step loop runs: last step, batch shape, schedules, saving and the spike guard."""

    stop: int
    batch: int
    micro: int
    seq_len: int
    lr: Callable
    batch_size: Callable
    mtp: Callable
    gamma: Callable
    save_every: int = 100
    max_spikes: int = 3
    progress: bool = True
    flops_per_token: float = 0.0
    peak_flops: float = 1.0


def open_workdir(workdir: str | os.PathLike, resume: bool, keep: int) -> tuple[pathlib.Path, Checkpointer]:
    """The work directory and its Checkpointer; ValueError/FileNotFoundError when --resume and the directory's
    checkpoints disagree. Points the persistent compilation cache into it (a resumed run reuses the step)."""
    workdir = pathlib.Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    # Several CPU processes save synchronously: gloo deadlocks when the background save's device work and the
    # next step's collectives are in flight together.
    ckpt = Checkpointer(ckpt_dir, max_to_keep=keep,
                        async_save=jax.process_count() == 1 or jax.default_backend() != "cpu")
    existing = ckpt.latest_step()
    if existing is not None and not resume:
        ckpt.close()
        raise ValueError(f"{ckpt_dir} already holds checkpoints (latest step {existing}); pass --resume to continue "
                         "the run, or choose another --workdir")
    if resume and existing is None:
        ckpt.close()
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
    workdir.mkdir(parents=True, exist_ok=True)
    if not jax.config.jax_compilation_cache_dir:  # a resumed run reuses the compiled step
        jax.config.update("jax_compilation_cache_dir", str(workdir / "cache" / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return workdir, ckpt


def _initial_params(cfg: ModelConfig, precision: Precision, seed: int, init):
    """(graphdef, params, bias): a fresh model's, or `init`'s (params, bias) checked against the config's shapes
    and cast to its dtypes."""
    if init is None:
        return split_model(Transformer(cfg, nnx.Rngs(seed), precision))
    graphdef, like_params, like_bias = split_model(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(seed),
                                                                                      precision)))
    init_params, init_bias = init
    out = []
    for name, like, given in (("parameters", like_params, init_params), ("expert bias", like_bias, init_bias)):
        want, have = flat_state(like), flat_state(given)
        if want.keys() != have.keys():
            diff = sorted(set(want) ^ set(have))[:5]
            raise ValueError(f"--init: the initial {name} do not match the model config (differing names: {diff})")
        for k, w in want.items():
            if tuple(w.shape) != tuple(np.shape(have[k])):
                raise ValueError(f"--init: {name} {k} has shape {tuple(np.shape(have[k]))}, the config wants "
                                 f"{tuple(w.shape)}")
        out.append(unflat_state({k: jnp.asarray(have[k], want[k].dtype) for k in want}, like))
    return graphdef, out[0], out[1]


def initial_state(cfg: ModelConfig, precision: Precision, *, seed: int, lr: Callable, mesh=None,
                  zero: str = "zero1", init=None, abstract: bool = False, pipeline: tuple | None = None):
    """(graphdef, optimizer, state, shardings) of a run's first step: a fresh model's train state (or `init` =
    (params, bias)'s). Under a mesh the fresh state is built by one jit with out_shardings, so each device
    materialises only its own shards (the values equal the unsharded init: the init is deterministic from the
    seed); `init` (already on the host) is placed shard by shard. With `abstract`, jax.ShapeDtypeStructs (with
    their shardings under a mesh) and nothing allocated. With `pipeline` = (StageLayout, homes) the MoE stack is
    in the pipeline layout (sharding.pipeline_transformer.pipeline_state), sharded over 'pp'."""
    if pipeline is not None and mesh is None:
        raise ValueError("a pipeline-layout train state needs a mesh with a pp axis")
    graphdef, like_params, like_bias = split_model(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(seed),
                                                                                      precision)))
    optimizer = make_optimizer(like_params, 0.0, 1, schedule=lr)

    def build(params, bias):
        return (init_state(params, bias, optimizer) if pipeline is None
                else pipeline_state(params, bias, optimizer, *pipeline))

    like = jax.eval_shape(build, like_params, like_bias)
    shardings = None if mesh is None else train_state_shardings(like, mesh, zero)
    if abstract:
        state = like if mesh is None else jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, shardings)
        return graphdef, optimizer, state, shardings
    if init is not None:
        _, params, bias = _initial_params(cfg, precision, seed, init)
        state = build(params, bias)
        del params, bias
        if mesh is None:
            return graphdef, optimizer, jax.device_put(state, jax.devices()[0]), None
        return graphdef, optimizer, _place(state, shardings), shardings

    def fresh():
        _, params, bias = split_model(Transformer(cfg, nnx.Rngs(seed), precision))
        return build(params, bias)

    # committed to one device without a mesh, like restored arrays, so a restore does not trigger a recompile
    out = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None else shardings
    return graphdef, optimizer, jax.jit(fresh, out_shardings=out)(), shardings


def build_session(workdir: pathlib.Path, ckpt: Checkpointer, cfg: ModelConfig, precision: Precision, *, seed: int,
                  lr: Callable, mesh_spec: str | None, micro: int, zero: str, resume: bool, init=None,
                  pipeline: tuple | None = None) -> Session:
    """Mesh, model and train state (fresh or from `init` = (params, bias)), restored from the newest checkpoint
    with `resume` (whose model config must equal `cfg`). With `pipeline` = (StageLayout, homes) the state keeps
    the MoE stack in the pipeline layout (sharding.pipeline_transformer.pipeline_state), sharded over 'pp'."""
    main_process = jax.process_index() == 0
    # One device keeps the plain jit step; several (or an explicit --mesh) run over a mesh.
    mesh = None if mesh_spec is None and len(default_devices()) == 1 else build_mesh(mesh_spec, cfg, batch=micro)
    graphdef, optimizer, state, shardings = initial_state(cfg, precision, seed=seed, lr=lr, mesh=mesh, zero=zero,
                                                          init=init, pipeline=pipeline)
    session = Session(workdir, ckpt, mesh, shardings, graphdef, optimizer, state, main_process=main_process,
                      pipeline=pipeline)
    if resume:
        saved_layout = (_meta_of_latest(ckpt) or {}).get("stage_layout")
        here = None if pipeline is None else _layout_meta(*pipeline)
        if saved_layout != here:
            raise ValueError(f"--resume: the checkpoint in {ckpt.directory} holds the train state in pipeline layout "
                             f"{saved_layout} (null: the model's), this run would use {here}; resume with the run's "
                             "--mesh, --pipeline and --stage-layers")
        session.start, restored, meta = ckpt.restore(flat_state(_abstract(state)))
        session.state = unflat_state(restored, state)
        session.position, session.meta = meta["position"], meta
        if meta.get("model_config") != cfg.to_hf():
            raise ValueError(f"--resume: the checkpoint in {ckpt.directory} was trained with a different model config")
    return session


def _layout_meta(layout, homes) -> dict:
    """The pipeline layout as saved in checkpoint metadata (a resume must use the same)."""
    return {"moe_counts": list(layout.moe_counts), "num_dense": layout.num_dense,
            "homes": np.asarray(homes).tolist()}


def _meta_of_latest(ckpt: Checkpointer) -> dict | None:
    step = ckpt.latest_step()
    path = pathlib.Path(ckpt.directory) / str(step) / "meta" / "metadata"
    try:
        return json.loads(path.read_text()) if step is not None else None
    except (OSError, ValueError):
        return None


def _put_rows(rows, spec: LoopSpec, size: int, sharding):
    """Host rows [size, S] (an array or a Batch of arrays) as [K, M, S] device arrays (global with a mesh)."""

    def put(a):
        a = np.asarray(a).reshape(size // spec.micro, spec.micro, -1)
        if sharding is None:
            return jnp.asarray(a)
        # every process holds the whole global batch and hands over its devices' rows
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(put, rows)


def run_loop(session: Session, source: BatchSource, step_fn: Callable, spec: LoopSpec, meta_for: Callable[[int], dict],
             metrics_extra: Callable[[Any], dict] | None = None,
             after_step: Callable[[int, Any], None] | None = None) -> dict[str, Any]:
    """The step loop shared by every run: draw rows, step, log metrics.jsonl, skip/restore on spikes, save every
    spec.save_every steps and at spec.stop, save and raise TrainingInterrupted on Ctrl-C/SIGTERM. Returns
    {"state", "first_loss", "last_loss"}; `meta_for(step)` is the checkpoint metadata (it may read
    session.position); `after_step(step, state)` (e.g. held-out evaluation) runs after each step's log row."""
    ckpt, mesh = session.ckpt, session.mesh
    state, start = session.state, session.start
    row_sharding = None if mesh is None else jax.sharding.NamedSharding(mesh, batch_spec(3, batch_dim=1))
    log = _Log(session.workdir, start, enabled=session.main_process)
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(signum)

    previous_handlers = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}
    consecutive_skips, step, last_loss, first_loss = 0, start, None, None
    try:
        t_last = time.perf_counter()
        for step in range(start, spec.stop):
            bsz = max(spec.micro, int(spec.batch_size(step)) // spec.micro * spec.micro)
            rows, new_position = source.batch(session.position, bsz)
            rows = _put_rows(rows, spec, bsz, row_sharding)
            state, m = step_fn(state, rows, float(spec.mtp(step)), float(spec.gamma(step)))
            m = jax.device_get(m)
            session.position = new_position
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            tokens_per_s = bsz * spec.seq_len / dt
            row = {"step": step + 1, "loss": float(m.loss), "ce": float(m.ce), "mtp_loss": float(m.mtp_loss),
                   "balance_loss": float(m.balance_loss), "grad_norm": float(m.grad_norm),
                   "lr": float(spec.lr(step)), "batch": bsz, "tokens_per_s": tokens_per_s,
                   "mfu": tokens_per_s * spec.flops_per_token / spec.peak_flops, "max_vio": float(m.max_vio),
                   "mtp_weight": float(spec.mtp(step)), "gamma": float(spec.gamma(step)),
                   "skipped": bool(m.skipped), "step_time": dt}
            if metrics_extra is not None:
                row.update(metrics_extra(m))
            log.metric(row)
            first_loss = row["ce"] if first_loss is None else first_loss
            last_loss = row["ce"]
            if m.skipped:
                consecutive_skips += 1
                log.event(step + 1, "skipped_update", loss=row["loss"], grad_norm=row["grad_norm"],
                          nonfinite=bool(m.nonfinite))
                if consecutive_skips >= spec.max_spikes and ckpt.latest_step() is not None:
                    restored_step, restored, _ = ckpt.restore(flat_state(_abstract(state)))
                    state = unflat_state(restored, state)
                    log.event(step + 1, "restored_checkpoint", from_step=restored_step,
                              note="data position kept: the batches that spiked are skipped")
                    consecutive_skips = 0
            else:
                consecutive_skips = 0
            if spec.progress and session.main_process:
                _progress(step + 1, spec.stop, row)
            if after_step is not None:
                after_step(step + 1, state)
            done = step + 1
            if done % spec.save_every == 0 or done == spec.stop:
                ckpt.save(done, flat_state(state), meta_for(done))
            if interrupted:
                raise TrainingInterrupted
    except TrainingInterrupted:
        done = step + 1  # the flag is only checked after a completed step
        if done not in ckpt.all_steps():
            ckpt.save(done, flat_state(state), meta_for(done))
        ckpt.wait()
        log.event(done, "interrupted", note="checkpoint saved; continue with --resume")
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        ckpt.wait()
        log.close()
        if spec.progress and session.main_process:
            print(file=sys.stderr)
    session.state = state
    return {"state": state, "first_loss": first_loss, "last_loss": last_loss}


def final_model(session: Session) -> Transformer:
    """The session's trained model (parameters gathered onto one local device under a mesh)."""
    state = session.state
    params, bias = (state["params"], state["bias"]) if session.mesh is None else jax.device_put(
        session.model_tree(_to_host({"params": state["params"], "bias": state["bias"]})), jax.local_devices()[0])
    return nnx.merge(session.graphdef, params, bias)


def _read_init(path: str):
    """(model, tokenizer, run_args or None) of an --init work directory or released-format checkpoint."""
    from dsv3_jax.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, tokenizer_required=False)
    return model, tokenizer, workdir_run_args(path)


def workdir_run_args(path: str | os.PathLike) -> dict | None:
    """The run arguments saved with the newest checkpoint of a work directory (None for other directories)."""
    ckpt_dir = pathlib.Path(path) / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    for step in reversed(steps):
        meta_path = ckpt_dir / str(step) / "meta" / "metadata"
        if meta_path.is_file():
            try:
                return json.loads(meta_path.read_text())["run_args"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{meta_path}: cannot read the run arguments ({e})") from None
    return None


def _extension_config(args: RunArgs, cfg: ModelConfig, init_run: dict | None) -> ModelConfig:
    """The --init model config with YaRN switched on (paper §4.3, reference §3.4) when --yarn-factor is given."""
    if args.yarn_factor is None:
        if args.yarn_original_len is not None:
            raise ValueError("--yarn-original-len needs --yarn-factor")
        return cfg
    if not args.yarn_factor > 1:
        raise ValueError(f"--yarn-factor must be > 1, got {args.yarn_factor}")
    original = args.yarn_original_len
    if original is None:
        if init_run is None or not isinstance(init_run.get("seq_len"), int):
            raise ValueError("--yarn-factor: pass --yarn-original-len (the --init checkpoint is not a work directory "
                             "recording its training sequence length)")
        original = init_run["seq_len"]
    if not isinstance(original, int) or original <= 0:
        raise ValueError(f"--yarn-original-len must be a positive integer, got {original!r}")
    if args.seq_len > original * args.yarn_factor:
        raise ValueError(f"--seq-len {args.seq_len} exceeds --yarn-original-len {original} x --yarn-factor "
                         f"{args.yarn_factor:g}")
    return cfg.replace(rope_type="yarn", rope_factor=float(args.yarn_factor),
                       rope_original_max_position_embeddings=original, rope_beta_fast=32.0, rope_beta_slow=1.0,
                       rope_mscale=1.0, rope_mscale_all_dim=1.0,
                       max_position_embeddings=max(cfg.max_position_embeddings, args.seq_len))


def _run_model(args: RunArgs):
    """(config, name for the log, (params, bias) or None, tokenizer or None, run arguments or None): a preset /
    --config model with the switches applied, or the --init checkpoint's model (YaRN-extended with --yarn-factor)."""
    if args.init is None:
        if args.yarn_factor is not None or args.yarn_original_len is not None:
            raise ValueError("--yarn-factor extends a trained run's context: it needs --init DIR")
        cfg, model_name = _model_config(args)
        return _switch_config(args, cfg), model_name, None, None, None
    if args.config is not None:
        raise ValueError("--init takes the model config from the checkpoint; drop --config")
    init_model, init_tokenizer, init_run = _read_init(args.init)
    cfg = _extension_config(args, init_model.config, init_run)
    if args.set or args.mtp_depth is not None:
        raise ValueError("--set / --mtp-depth change the model; --init continues a checkpoint's model as it is")
    _, init_params, init_bias = split_model(init_model)
    return cfg, f"init {args.init}", (init_params, init_bias), init_tokenizer, init_run


def pipeline_schedule(args: RunArgs, cfg: ModelConfig):
    """(Schedule, (StageLayout, homes)) of --mesh/--pipeline/--microbatches/--stage-layers, or (None, None) without
    a pp axis; ValueError naming the flags."""
    schedule = _validate_pipeline(args)
    if schedule is None:
        return None, None
    try:
        return schedule, pipeline_layout(cfg, schedule, args.stage_layers, args.seq_len)
    except ValueError as e:
        raise ValueError(f"--pipeline {args.pipeline} with pp={schedule.ranks}: {e}") from None


def step_config(args: RunArgs) -> StepConfig:
    """The train step's StepConfig of a run's switches (balance, remat, layer unrolling, spike guard)."""
    alpha, _ = balance_settings(args)
    return StepConfig(balance_alpha=alpha, balance_scope=args.balance_scope, remat=args.remat,
                      unroll_layers=args.unroll_layers, spike_factor=args.spike_factor,
                      spike_warmup=args.spike_warmup)


def _schedules(args: RunArgs, continued: bool, init_run: dict | None) -> tuple[float, dict[str, Callable]]:
    """(peak LR, {"lr", "batch", "mtp", "gamma": step -> value}): the paper's schedules scaled to --steps, or for
    continued pretraining (paper §4.3) constants; --gamma (or --balance aux-loss / none) and --mtp-weight override
    theirs."""
    if not continued:
        peak_lr = args.lr or DEFAULT_LR.get(args.preset or "", 2.2e-4)
        schedules = dict(lr=lr_schedule(peak_lr, args.steps), batch=batch_size_schedule(args.batch, args.steps),
                         mtp=mtp_weight_schedule(args.steps), gamma=bias_update_speed_schedule(args.steps))
    else:  # constant LR (the pretraining's final 7.3e-6, scaled), batch fixed, lambda 0.1, gamma 0
        run_lr = (init_run or {}).get("lr") or DEFAULT_LR.get((init_run or {}).get("preset") or "", PAPER_PEAK_LR)
        peak_lr = args.lr or run_lr * PAPER_FINAL_LR / PAPER_PEAK_LR
        schedules = dict(lr=constant_schedule(peak_lr), batch=constant_schedule(args.batch),
                         mtp=constant_schedule(PAPER_MTP_WEIGHT_LATE), gamma=constant_schedule(0.0))
    _, gamma = balance_settings(args)
    if gamma is not None:
        schedules["gamma"] = constant_schedule(gamma)
    if args.mtp_weight is not None:
        schedules["mtp"] = constant_schedule(args.mtp_weight)
    return peak_lr, schedules


def train(args: RunArgs) -> dict[str, Any]:
    """Run (or resume) a pretraining run, or with --init a continued-pretraining (context-extension) run from a
    checkpoint's weights; returns a summary dict. Under several processes (sharding.mesh.initialize_distributed's
    environment) every process runs it; process 0 writes the logs."""
    _validate(args)
    initialize_distributed()
    cfg, model_name, init, init_tokenizer, init_run = _run_model(args)
    workdir, ckpt = open_workdir(args.workdir, args.resume, args.keep)
    check_seq_len(args.seq_len, cfg)
    precision = Precision.named(args.precision)
    micro = args.micro_batch or args.batch
    schedule, layout = pipeline_schedule(args, cfg)
    peak_lr, schedules = _schedules(args, continued=init is not None, init_run=init_run)
    alpha, _ = balance_settings(args)
    session = build_session(workdir, ckpt, cfg, precision, seed=args.seed, lr=schedules["lr"], mesh_spec=args.mesh,
                            micro=micro, zero=args.zero, resume=args.resume, init=init, pipeline=layout)
    if args.resume:
        _check_resumed_data(args, (session.meta or {}).get("run_args"))
    mesh, main_process = session.mesh, session.main_process
    saved_tokenizer = (session.meta or {}).get("tokenizer")
    if saved_tokenizer is None and init_tokenizer is not None:
        if not isinstance(init_tokenizer, Tokenizer):
            raise ValueError(f"--init {args.init}: its tokenizer.json is not in this project's layout (<|bos|> = 0, "
                             "<|eos|> = 1); continued pretraining needs it")
        saved_tokenizer = init_tokenizer.to_json()
    if not main_process:
        _barrier("dsv3_data_ready")  # process 0 builds the tokenizer and token caches first
    tokenizer, tokens = _tokenizer_and_tokens(args, cfg, workdir, saved_tokenizer, new_tokenizer_ok=init is None)
    eval_sets = _eval_sets(args, cfg, workdir, tokenizer, micro)
    if main_process:
        _barrier("dsv3_data_ready")
    batches = PackedBatches(tokens, args.seq_len, args.seed)
    stop = args.stop_at or args.steps

    step_fn = make_train_step(session.graphdef, session.optimizer, step_config(args), mesh, session.shardings,
                              schedule, layout=None if layout is None else layout[0])
    spec = LoopSpec(stop=stop, batch=args.batch, micro=micro, seq_len=args.seq_len,
                    lr=schedules["lr"], batch_size=schedules["batch"], mtp=schedules["mtp"], gamma=schedules["gamma"],
                    save_every=args.save_every, max_spikes=args.max_spikes, progress=args.progress,
                    flops_per_token=training_flops_per_token(cfg, args.seq_len),
                    peak_flops=measure_peak_flops(dtype=precision.compute_dtype))
    mesh_note = "" if mesh is None else ", mesh " + ",".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1)
    if schedule is not None:
        mesh_note += (f", pipeline {args.pipeline} x {schedule.microbatches} micro-batches, layers per stage "
                      f"{layout[0].describe()}")
    if (args.balance, args.balance_scope) != ("aux-free", "sequence") or args.balance_alpha is not None:
        mesh_note += f", balance {args.balance} ({args.balance_scope}-wise, alpha {alpha:g})"
    if args.eval_every:
        mesh_note += f", held-out evaluation every {args.eval_every} steps on {', '.join(eval_sets)}"
    if cfg.uses_yarn and init is not None:
        mesh_note += (f", YaRN factor {cfg.rope_factor:g} over original length "
                      f"{cfg.rope_original_max_position_embeddings}")
    print(f"dsv3 train: {model_name}, {args.steps} steps x {args.batch} x {args.seq_len} tokens, corpus "
          f"{len(tokens):,} tokens, lr {peak_lr:g}{' constant' if init is not None else ''}, precision "
          f"{args.precision}, workdir {workdir}" + mesh_note + (f", resuming at step {session.start}"
                                                                if session.start else ""))
    if micro == args.batch and init is None:
        print("  batch-size ramp inactive: it grows the number of accumulated micro-batches, so it needs "
              "--micro-batch smaller than --batch")

    def meta_for(step: int) -> dict:
        return {"step": step, "position": session.position, "model_config": cfg.to_hf(),
                "run_args": dataclasses.asdict(args), "tokenizer": None if tokenizer is None else tokenizer.to_json(),
                "stage_layout": None if layout is None else _layout_meta(*layout)}

    evaluator = None
    if eval_sets:
        eval_path = workdir / "eval.jsonl"
        if main_process:
            _truncate_after(eval_path, session.start)
        evaluator = Evaluator(session.graphdef, eval_sets, args.eval_every, stop, eval_path, mesh, main_process)
        if layout is not None:  # the evaluation runs the model's tree
            to_tree = jax.jit(lambda p, b: session.model_tree({"params": p, "bias": b}))
            evaluator = _on_model_tree(evaluator, to_tree)
    switches = {"balance": args.balance, "balance_scope": args.balance_scope, "balance_alpha": alpha}
    result = run_loop(session, batches, step_fn, spec, meta_for, metrics_extra=lambda m: switches,
                      after_step=evaluator)
    summary = {"steps_done": stop, "first_loss": result["first_loss"], "last_loss": result["last_loss"],
               "workdir": str(workdir)}
    if stop == args.steps and tokenizer is not None and args.sample_tokens:
        summary["sample"] = generate_text(final_model(session), tokenizer, args.prompt, args.sample_tokens)
        if main_process:
            print(f"\nsample ({args.sample_tokens} tokens, greedy) from prompt {args.prompt!r}:\n"
                  f"{summary['sample']}\n")
    ckpt.close()
    return summary


def _on_model_tree(evaluator: Evaluator, to_tree: Callable):
    """after_step calling `evaluator` on the model-tree view of a pipeline-layout state when it is due."""
    def after(step: int, state) -> None:
        if evaluator.due(step):
            params, bias = to_tree(state["params"], state["bias"])
            evaluator(step, {"params": params, "bias": bias})
    return after


def _progress(step: int, total: int, row: dict) -> None:
    width = 30
    filled = int(width * step / total)
    bar = "#" * filled + "-" * (width - filled)
    print(f"\r[{bar}] {step}/{total} loss {row['loss']:.4f} ce {row['ce']:.4f} "
          f"{row['tokens_per_s']:,.0f} tok/s mfu {row['mfu']:.1%}", end="", file=sys.stderr, flush=True)


def load_workdir(workdir: str | os.PathLike):
    """(model, tokenizer) from the newest restorable checkpoint of a `dsv3 train` work directory."""
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    ckpt = Checkpointer(ckpt_dir)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (not a dsv3 train work directory?)")
    meta_path = ckpt_dir / str(steps[-1]) / "meta" / "metadata"
    try:
        meta = json.loads(meta_path.read_text())
        cfg = ModelConfig.from_hf(meta["model_config"])
        run = meta["run_args"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{meta_path}: cannot read the run's model config ({e})") from None
    precision = Precision.named(run.get("precision", "fp32"))
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), precision))
    graphdef, params, bias = split_model(abstract)
    optimizer = make_optimizer(params, run.get("lr") or 1e-3, run["steps"])
    saved_layout = meta.get("stage_layout")
    if saved_layout is None:
        like = jax.eval_shape(lambda p, b: init_state(p, b, optimizer), params, bias)
    else:  # a --pipeline run's state: the MoE stack in its pipeline layout, converted back below
        from sharding.stage_layout import StageLayout

        pipeline = (StageLayout(tuple(saved_layout["moe_counts"]), saved_layout["num_dense"]),
                    np.array(saved_layout["homes"], np.int32))
        like = jax.eval_shape(lambda p, b: pipeline_state(p, b, optimizer, *pipeline), params, bias)
    _, restored, meta = ckpt.restore(flat_state(_abstract(like)))
    ckpt.close()
    state = unflat_state(restored, like)
    if saved_layout is not None:
        state["params"], state["bias"] = (tree_from_pipeline(state[k], *pipeline) for k in ("params", "bias"))
    model = nnx.merge(graphdef, state["params"], state["bias"])
    tokenizer = None if meta.get("tokenizer") is None else Tokenizer.from_json(meta["tokenizer"])
    return model, tokenizer
