"""`dsv3 sft`: supervised fine-tuning on chat data (paper §5.1), optionally with logit distillation from a teacher.

Data: JSONL files, one conversation per line ({"messages": [{"role", "content"}, ...]}), rendered with the chat
template (posttrain.chat: loss on assistant tokens and their closing <|eos|> only). Conversations are shuffled by
the seed and packed greedily, in that order, into rows of seq_len + 1 tokens with segment ids 1, 2, ... per row
(0 = padding): attention stays within a conversation and positions restart (sample masking, §5.1). Each epoch
visits the rows in a fresh permutation of (seed, epoch). A conversation longer than a row is an error, or with
`truncate` is cut to the row (counted and reported). Role tokens past the model's vocabulary are an error, or with
`resize_vocab` new embedding rows and head columns (the mean of the existing ones).

Schedule (§5.1): cosine from --lr 5e-6 to --min-lr 1e-6 over the run (optional --warmup steps, 0 by default),
2 epochs by default. The expert bias is frozen by default (--gamma 0: the value pretraining ends with, §4.2);
the MTP loss keeps weight 0.1 (the late pretraining value; --mtp-weight 0 turns the term off).
Distillation (issue item 4): `--teacher DIR --distill-weight w` adds w * tau^2 * KL(teacher || student) on the
trained tokens to (1 - w) * CE (train.step's DistillSpec; losses.distill_kl).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from dsv3_jax.jsonl import read_objects
from dsv3_jax.posttrain.chat import chat_tokenizer, check_messages, render
from dsv3_jax.precision import Precision
from dsv3_jax.train.optim import constant_schedule, cosine_lr_schedule
from dsv3_jax.train.packing import check_seq_len
from dsv3_jax.train.tokenizer import Tokenizer
from sharding.mesh import parse_mesh_spec
from sharding.rules import ZERO_MODES


class Conversation(NamedTuple):
    where: str  # "file:line"
    ids: list[int]
    mask: list[int]


class PackedChat(NamedTuple):
    """Packed rows [N, S] (S = seq_len + 1): tokens, loss mask (float32) and segment ids (int32, 0 = padding)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    conversations: int
    truncated: int  # conversations cut to the row length (only with truncate)


def read_chat_jsonl(paths) -> list[tuple[str, list[dict]]]:
    """[(file:line, messages)] of chat JSONL files (blank lines skipped); ValueError naming file:line otherwise."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for path in paths:
        for where, row in read_objects(path, "chat data"):
            if "messages" not in row:
                raise ValueError(f"{where}: expected an object with a 'messages' list")
            out.append((where, check_messages(row["messages"], where)))
    if not out:
        raise ValueError(f"no conversations in {', '.join(map(os.fspath, paths))}")
    return out


def encode_conversations(rows, tokenizer) -> list[Conversation]:
    """Render each (where, messages) with the chat template; ValueError for one without an assistant turn."""
    out = []
    for where, messages in rows:
        ids, mask = render(messages, tokenizer)
        if not any(mask):
            raise ValueError(f"{where}: no assistant message, so nothing to train on")
        out.append(Conversation(where, ids, mask))
    return out


def pack_conversations(convs: list[Conversation], seq_len: int, seed: int = 0, truncate: bool = False) -> PackedChat:
    """Shuffle by `seed`, then pack greedily (in order; a conversation that does not fit starts a new row) into
    rows of seq_len + 1 tokens with per-row segment ids 1, 2, ... and the train mask as loss mask."""
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not convs:
        raise ValueError("no conversations to pack")
    width = seq_len + 1
    order = np.random.default_rng(seed).permutation(len(convs))
    rows: list[list[Conversation]] = []
    used = width  # forces a first row
    truncated = 0
    for i in order:
        c = convs[i]
        if len(c.ids) > width:
            if not truncate:
                raise ValueError(f"{c.where}: the conversation has {len(c.ids)} tokens, more than a row of --seq-len "
                                 f"+ 1 = {width}; raise --seq-len, shorten it, or pass --truncate")
            c = Conversation(c.where, c.ids[:width], c.mask[:width])
            truncated += 1
            if not any(c.mask[1:]):
                raise ValueError(f"{c.where}: truncated to {width} tokens it has no trained token left")
        if used + len(c.ids) > width:
            rows.append([])
            used = 0
        rows[-1].append(c)
        used += len(c.ids)
    tokens = np.zeros((len(rows), width), np.int32)
    loss_mask = np.zeros((len(rows), width), np.float32)
    segment_ids = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, c in enumerate(row, 1):
            n = len(c.ids)
            tokens[r, at:at + n] = c.ids
            loss_mask[r, at:at + n] = c.mask
            segment_ids[r, at:at + n] = s
            at += n
    return PackedChat(tokens, loss_mask, segment_ids, len(convs), truncated)


def packed_fingerprint(packed: PackedChat) -> str:
    """sha256 of the packed rows (tokens, loss mask, segment ids): a resumed run must see the same rows."""
    h = hashlib.sha256()
    for a in (packed.tokens, packed.loss_mask, packed.segment_ids):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class ChatBatches:
    """Batch source over packed chat rows: `batch(position, size)` -> (step.Batch [size, S], new position), rows
    visited in a per-epoch permutation seeded by (seed, epoch) (train.loop.BatchSource)."""

    def __init__(self, packed: PackedChat, seed: int = 0):
        self.packed = packed
        self.seed = seed
        self.num_rows = packed.tokens.shape[0]

    def permutation(self, epoch: int) -> np.ndarray:
        """Row indices in the order epoch `epoch` visits them."""
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_rows)

    def batch(self, position: int, size: int):
        """The `size` rows after `position` rows consumed, and the new position."""
        from dsv3_jax.train.step import Batch

        if int(position) != position or position < 0 or int(size) != size or size <= 0:
            raise ValueError(f"position must be >= 0 and size > 0, got {position!r}, {size!r}")
        steps = np.arange(position, position + size)
        epochs, offsets = np.divmod(steps, self.num_rows)
        index = np.empty(size, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            index[sel] = self.permutation(int(epoch))[offsets[sel]]
        p = self.packed
        return Batch(p.tokens[index], p.loss_mask[index], p.segment_ids[index]), int(position + size)


@dataclasses.dataclass
class SFTArgs:
    """The arguments of one `dsv3 sft` run; saved with every checkpoint."""

    workdir: str
    init: str
    data: list[str]
    steps: int | None = None
    epochs: float | None = None  # default 2 (the paper's) when --steps is not given
    batch: int = 16
    micro_batch: int | None = None
    seq_len: int = 128
    seed: int = 0
    lr: float = 5e-6
    min_lr: float = 1e-6
    warmup: int = 0
    precision: str = "fp32"
    remat: str = "none"
    unroll_layers: bool = False
    truncate: bool = False
    resize_vocab: bool = False  # grow the embedding and head when the role tokens need ids past vocab_size
    gamma: float = 0.0
    mtp_weight: float = 0.1
    teacher: str | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    resume: bool = False
    stop_at: int | None = None
    save_every: int = 100
    keep: int = 3
    spike_factor: float = 3.0
    spike_warmup: int = 20
    max_spikes: int = 3
    progress: bool = True
    mesh: str | None = None
    zero: str = "zero1"


def _validate(args: SFTArgs) -> None:
    if not args.data:
        raise ValueError("--data: at least one chat JSONL file is needed")
    if args.steps is not None and args.epochs is not None:
        raise ValueError("pass --steps or --epochs, not both")
    for name in ("batch", "seq_len", "save_every", "keep", "max_spikes"):
        value = getattr(args, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if args.steps is not None and (not isinstance(args.steps, int) or args.steps <= 0):
        raise ValueError(f"--steps must be a positive integer, got {args.steps!r}")
    if args.epochs is not None and not args.epochs > 0:
        raise ValueError(f"--epochs must be > 0, got {args.epochs!r}")
    if args.micro_batch is not None and (args.micro_batch <= 0 or args.batch % args.micro_batch):
        raise ValueError(f"--micro-batch {args.micro_batch} must be positive and divide --batch {args.batch}")
    if not args.lr > 0 or not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"need --lr > 0 and 0 <= --min-lr <= --lr, got {args.lr}, {args.min_lr}")
    if args.gamma < 0 or args.mtp_weight < 0:
        raise ValueError(f"--gamma and --mtp-weight must be >= 0, got {args.gamma}, {args.mtp_weight}")
    if not 0 <= args.distill_weight <= 1:
        raise ValueError(f"--distill-weight must be in [0, 1], got {args.distill_weight}")
    if not args.distill_temperature > 0:
        raise ValueError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if args.distill_weight > 0 and args.teacher is None:
        raise ValueError("--distill-weight needs --teacher DIR")
    if args.teacher is not None and args.distill_weight == 0:
        raise ValueError("--teacher is only used for logit distillation; give --distill-weight > 0")
    if args.mesh is not None and parse_mesh_spec(args.mesh)["pp"] > 1:
        raise ValueError(f"--mesh {args.mesh}: dsv3 sft does not run pipeline parallelism (pp); use dp, ep and tp")
    if args.zero not in ZERO_MODES:
        raise ValueError(f"zero must be one of {ZERO_MODES}, got {args.zero!r}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")


def sft_tokenizer(tokenizer, vocab_size: int, where: str, resize_ok: bool = False):
    """The init's tokenizer with the chat role tokens; ValueError if they fall outside the model's vocabulary
    (unless resize_ok: the caller grows the model with resize_vocab)."""
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"{where}: its tokenizer.json is not in this project's layout (<|bos|> = 0, <|eos|> = 1); "
                         "the chat template needs it")
    tok = chat_tokenizer(tokenizer)
    if tok.vocab_size > vocab_size and not resize_ok:
        raise ValueError(f"{where}: the chat role tokens need ids up to {tok.vocab_size - 1}, beyond the model's "
                         f"vocab_size {vocab_size} (a tokenizer trained by this project reserves them); pass "
                         "--resize-vocab to grow the embedding and head")
    return tok


def resize_vocab(cfg, params, vocab_size: int):
    """(config, params) with vocab_size rows of the embedding and columns of the head: the new ones start at the
    mean of the existing ones (a new token is embedded and scored like an average token)."""
    from dsv3_jax.train.loop import flat_state, unflat_state

    if vocab_size < cfg.vocab_size:
        raise ValueError(f"resize_vocab: cannot shrink the vocabulary from {cfg.vocab_size} to {vocab_size}")
    flat = dict(flat_state(params))
    for name, axis in (("embed", 0), ("head", 1)):
        keys = [k for k in flat if k.split(".")[0] == name]
        if len(keys) != 1 or flat[keys[0]].shape[axis] != cfg.vocab_size:
            raise ValueError(f"resize_vocab: expected one {name} parameter with {cfg.vocab_size} entries on axis "
                             f"{axis}, got {keys}")
        w = np.asarray(flat[keys[0]])
        extra = np.repeat(w.mean(axis=axis, keepdims=True), vocab_size - cfg.vocab_size, axis=axis)
        flat[keys[0]] = np.concatenate([w, extra.astype(w.dtype)], axis=axis)
    shapes = {k: v.shape for k, v in flat.items()}
    new = unflat_state(flat, params)
    if any(tuple(np.shape(v)) != shapes[k] for k, v in flat_state(new).items()):
        raise ValueError("resize_vocab: the resized parameters did not land in the model's structure")
    return cfg.replace(vocab_size=vocab_size), new


def _teacher(args: SFTArgs, student_cfg, student_tokenizer):
    """(graphdef, params, bias) of the frozen teacher; ValueError when its vocabulary differs from the student's."""
    from dsv3_jax.load import load_model_and_tokenizer
    from dsv3_jax.train.step import split_model

    model, tokenizer = load_model_and_tokenizer(args.teacher)
    if model.config.vocab_size != student_cfg.vocab_size:
        raise ValueError(f"--teacher {args.teacher}: vocab_size {model.config.vocab_size} differs from the student's "
                         f"{student_cfg.vocab_size}; logit distillation needs the same vocabulary")
    teacher_tok = chat_tokenizer(tokenizer) if isinstance(tokenizer, Tokenizer) else tokenizer
    if getattr(teacher_tok, "to_json", None) is None or teacher_tok.to_json() != student_tokenizer.to_json():
        raise ValueError(f"--teacher {args.teacher}: its tokenizer differs from the student's; logit distillation "
                         "needs the same vocabulary")
    if args.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--teacher {args.teacher}: --seq-len {args.seq_len} exceeds its max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    return split_model(model)


def sft(args: SFTArgs) -> dict[str, Any]:
    """Run (or resume) supervised fine-tuning from args.init on chat JSONL data; returns a summary dict."""
    from dsv3_jax.load import load_model_and_tokenizer
    from dsv3_jax.train.flops import measure_peak_flops, training_flops_per_token
    from dsv3_jax.train.loop import LoopSpec, build_session, open_workdir, run_loop
    from dsv3_jax.train.step import StepConfig, make_train_step, split_model
    from sharding.mesh import initialize_distributed

    _validate(args)
    initialize_distributed()
    model, tokenizer = load_model_and_tokenizer(args.init)
    cfg = model.config
    tokenizer = sft_tokenizer(tokenizer, cfg.vocab_size, f"--init {args.init}", resize_ok=args.resize_vocab)
    check_seq_len(args.seq_len, cfg)
    precision = Precision.named(args.precision)
    packed = pack_conversations(encode_conversations(read_chat_jsonl(args.data), tokenizer), args.seq_len,
                                args.seed, args.truncate)
    rows = packed.tokens.shape[0]
    epochs = 2.0 if args.steps is None and args.epochs is None else args.epochs
    steps = args.steps if args.steps is not None else max(1, math.ceil(epochs * rows / args.batch))
    if args.stop_at is not None and not 0 < args.stop_at <= steps:
        raise ValueError(f"--stop-at {args.stop_at} must be in [1, the run's {steps} steps]")
    if args.warmup >= steps:
        raise ValueError(f"--warmup {args.warmup} must be smaller than the run's {steps} steps")
    lr = cosine_lr_schedule(args.lr, args.min_lr, steps, args.warmup)
    micro = args.micro_batch or args.batch
    _, params, bias = split_model(model)
    del model
    if tokenizer.vocab_size > cfg.vocab_size:  # --resize-vocab (sft_tokenizer refuses it otherwise)
        old = cfg.vocab_size
        cfg, params = resize_vocab(cfg, params, tokenizer.vocab_size)
        print(f"dsv3 sft: vocabulary resized {old} -> {cfg.vocab_size} for the chat role tokens")
    teacher = None if args.teacher is None else _teacher(args, cfg, tokenizer)

    workdir, ckpt = open_workdir(args.workdir, args.resume, args.keep)
    session = build_session(workdir, ckpt, cfg, precision, seed=args.seed, lr=lr, mesh_spec=args.mesh, micro=micro,
                            zero=args.zero, resume=args.resume, init=(params, bias))
    del params, bias
    if session.meta is not None and session.meta.get("tokenizer") != tokenizer.to_json():
        raise ValueError(f"--resume: the checkpoint in {ckpt.directory} was trained with another tokenizer")
    rows_sha = packed_fingerprint(packed)
    if session.meta is not None and session.meta.get("rows_sha256") != rows_sha:
        raise ValueError(f"--resume: the packed rows differ from the checkpoint's run (other --data, --seq-len, "
                         f"--seed or --truncate); its data position would point elsewhere. Use the run's data")
    sc = StepConfig(remat=args.remat, unroll_layers=args.unroll_layers, spike_factor=args.spike_factor,
                    spike_warmup=args.spike_warmup)
    step_fn = make_train_step(session.graphdef, session.optimizer, sc, session.mesh, session.shardings)
    metrics_extra = None
    if teacher is not None:
        step_fn, metrics_extra = _with_teacher(session, sc, teacher, args)
    stop = args.stop_at or steps
    spec = LoopSpec(stop=stop, batch=args.batch, micro=micro, seq_len=args.seq_len, lr=lr,
                    batch_size=constant_schedule(args.batch), mtp=constant_schedule(args.mtp_weight),
                    gamma=constant_schedule(args.gamma), save_every=args.save_every, max_spikes=args.max_spikes,
                    progress=args.progress, flops_per_token=training_flops_per_token(cfg, args.seq_len),
                    peak_flops=measure_peak_flops(dtype=precision.compute_dtype))
    trained = int(packed.loss_mask[:, 1:].sum())
    if session.main_process:
        print(f"dsv3 sft: from {args.init}, {packed.conversations} conversations -> {rows} rows of {args.seq_len + 1} "
              f"tokens ({trained:,} trained tokens, {packed.truncated} truncated), {steps} steps x {args.batch} "
              f"({steps * args.batch / rows:.2f} epochs), lr cosine {args.lr:g} -> {args.min_lr:g}, gamma "
              f"{args.gamma:g}, MTP weight {args.mtp_weight:g}"
              + (f", distilling from {args.teacher} (w {args.distill_weight:g}, tau {args.distill_temperature:g})"
                 if teacher is not None else "")
              + f", workdir {workdir}" + (f", resuming at step {session.start}" if session.start else ""))
    run_args = dataclasses.asdict(dataclasses.replace(args, steps=steps))

    def meta_for(step: int) -> dict:
        return {"step": step, "position": session.position, "model_config": cfg.to_hf(), "run_args": run_args,
                "tokenizer": tokenizer.to_json(), "rows_sha256": rows_sha}

    result = run_loop(session, ChatBatches(packed, args.seed), step_fn, spec, meta_for, metrics_extra)
    ckpt.close()
    return {"steps_done": stop, "steps": steps, "first_loss": result["first_loss"], "last_loss": result["last_loss"],
            "workdir": str(workdir), "rows": rows, "conversations": packed.conversations,
            "truncated": packed.truncated, "trained_tokens": trained}


def _with_teacher(session, sc, teacher, args: SFTArgs):
    """The distillation step (train.step.make_train_step with a DistillSpec) bound to the teacher's weights."""
    from dsv3_jax.train.loop import _place
    from dsv3_jax.train.step import DistillSpec, make_train_step

    t_graphdef, t_params, t_bias = teacher
    if session.mesh is None:
        t_state = jax.device_put((t_params, t_bias), jax.devices()[0])
    else:
        from jax.sharding import NamedSharding, PartitionSpec

        rep = NamedSharding(session.mesh, PartitionSpec())
        t_state = _place((t_params, t_bias), jax.tree.map(lambda _: rep, (t_params, t_bias)))
    distill = DistillSpec(t_graphdef, args.distill_weight, args.distill_temperature)
    step = make_train_step(session.graphdef, session.optimizer, sc, session.mesh, session.shardings, distill=distill)

    def call(state, rows, mtp_weight, gamma):
        return step(state, rows, mtp_weight, gamma, teacher=t_state)

    return call, lambda m: {"distill_kl": float(m.distill_kl)}


def default_report(summary: dict) -> str:
    """One line for the CLI."""
    first, last = summary["first_loss"], summary["last_loss"]
    return (f"dsv3 sft: steps {summary['steps_done']}/{summary['steps']}, masked CE {first:.4f} -> {last:.4f}; "
            f"{summary['conversations']} conversations in {summary['rows']} rows ({summary['truncated']} truncated); "
            f"metrics in {summary['workdir']}/metrics.jsonl")

