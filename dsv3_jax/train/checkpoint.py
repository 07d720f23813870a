"""Training checkpoints: asynchronous, atomic, keep-last-K saves of the train state, with fallback on restore.

`Checkpointer` wraps orbax-checkpoint's CheckpointManager (0.12) with two items per step: "state" (the pytree of
arrays: parameters, optimizer state, expert biases, raw uint32 PRNG key data; StandardSave/StandardRestore) and
"meta" (JSON: step, data position, tokenizer, config, CLI arguments; JsonSave/JsonRestore).

On disk (local POSIX paths) a step is `<directory>/<step>/{state,meta,_CHECKPOINT_METADATA,commit_success.txt}`.
Orbax writes it as `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` only once every item is written, so a
crash mid-save leaves a tmp directory that step discovery ignores, never a half-written `<step>/`.

Orbax does not detect silent corruption of array bytes (its zstd chunks carry no checksum), so `meta` also holds a
record (key "_checkpoint") with the step and a per-leaf uint32 fingerprint of the saved arrays, computed on the
device; `restore` recomputes it. A newest checkpoint that cannot be read, whose arrays do not match the target's
structure, shapes and dtypes, or whose fingerprint or step disagrees, is skipped with a warning for the previous one.
With several processes every process calls save/restore (orbax writes each array shard once); process 0 alone
clears stale tmp directories; setting unrestorable steps aside has no cross-host barrier.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

_STATE, _META = "state", "meta"
_RECORD = "_checkpoint"  # reserved meta key: {"step": int, "fingerprints": {leaf path: "%08x"}}
_TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's name mark for an uncommitted save (atomicity_types.TMP_DIR_SUFFIX)
_SET_ASIDE = "unrestorable"  # subdirectory that unrestorable steps are moved into (not a step name, so orbax skips it)
_OPEN: set = set()  # Checkpointers not yet closed (held, like open files, until close or exit)
_exit_hook_registered = False


def _close_all_at_exit() -> None:
    """Commits pending saves of unclosed Checkpointers when the interpreter exits.

    Registered with threading's exit hooks, which run before concurrent.futures refuses new work: a plain atexit
    handler runs after that, when orbax's writer can no longer schedule its file operations, fails, and then blocks
    on a 300 s barrier timeout, leaving only the uncommitted tmp directory.
    """
    for ckpt in list(_OPEN):
        try:
            ckpt.close()
        except Exception:  # noqa: BLE001 - report and go on closing the others
            log.exception("%s: pending checkpoint save failed at interpreter exit", ckpt.directory)


def _register_exit_hook() -> None:
    global _exit_hook_registered
    register = getattr(threading, "_register_atexit", None)  # private but stable since Python 3.9
    if not _exit_hook_registered and register is not None:
        register(_close_all_at_exit)
        _exit_hook_registered = True


def _key_name(key) -> str:
    """One jax key-path entry as orbax names it: dict key, attribute (namedtuple field) or sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_name(path) -> str:
    return "/".join(_key_name(k) for k in path)


def _flatten(tree, is_leaf=None) -> dict[str, Any]:
    """{"a/b/0": leaf} for the non-None leaves of a pytree (namedtuples, dicts, tuples and lists alike)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {_path_name(path): leaf for path, leaf in flat}


def _check_state(state) -> None:
    """Every leaf is an array (jax or NumPy) of a plain dtype; a typed PRNG key must be stored as its key data."""
    for name, leaf in _flatten(state).items():
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            raise ValueError(f"checkpoint state leaf {name!r} is a {type(leaf).__name__}, expected a jax or NumPy "
                             "array (put Python scalars in meta)")
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise ValueError(f"checkpoint state leaf {name!r} is a typed PRNG key ({dtype}); save "
                             "jax.random.key_data(key) (uint32) and rebuild it with jax.random.wrap_key_data")


_DEVICE_MIN_WORDS = 1 << 24  # leaves this large are fingerprinted on their device, smaller ones on the host
_HOST_CHUNK = 1 << 22  # words per NumPy pass (bounds the temporaries)


def _words(x):
    """The array's bit pattern as uint32 words, one per element (two for 8-byte dtypes): NumPy or jax alike."""
    xp = np if isinstance(x, np.ndarray) else jnp
    if x.dtype == np.bool_:
        return x.astype(xp.uint32)
    if x.dtype.itemsize == 8:
        return x.view(np.uint32) if xp is np else jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = np.dtype(f"uint{8 * x.dtype.itemsize}")
    bits = x.view(unsigned) if xp is np else jax.lax.bitcast_convert_type(x, unsigned)
    return bits.astype(xp.uint32)


@jax.jit
def _fingerprint_device(x):
    """sum_i words[i] * (2 i + 1) mod 2**32 over the flat words: any single changed word changes it."""
    words = _words(x)
    # Flat index mod 2**32 from per-axis iotas: a leaf may hold more than 2**32 elements (stacked experts).
    index, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _fingerprint_many(xs):
    return [_fingerprint_device(x) for x in xs]


def _fingerprint_host(x: np.ndarray) -> int:
    """The same sum as _fingerprint_device, in NumPy (uint32 arithmetic wraps mod 2**32), chunk by chunk."""
    words = _words(np.ascontiguousarray(x)).reshape(-1)
    total = 0
    for start in range(0, words.size, _HOST_CHUNK):
        chunk = words[start:start + _HOST_CHUNK]
        odd = (np.arange(start, start + chunk.size, dtype=np.uint64) * 2 + 1).astype(np.uint32)
        total = (total + int(np.sum(chunk * odd, dtype=np.uint32))) % 2**32
    return total


def _fingerprints(state) -> dict[str, str]:
    """{leaf path: 8 hex digits}. Small leaves are copied to the host in one batch and summed there (no compiles);
    large ones are summed on their device (one compile per shape, no large copy)."""
    flat = _flatten(state)
    n_words = {name: int(np.prod(x.shape)) * (2 if x.dtype.itemsize == 8 else 1) for name, x in flat.items()}
    # Leaves split over several processes cannot be copied to one host: summed on their devices too, all in one
    # program (CPU processes deadlock with several cross-process programs in flight at once).
    big = [name for name, x in flat.items()
           if n_words[name] >= _DEVICE_MIN_WORDS or not getattr(x, "is_fully_addressable", True)]
    on_device = dict(zip(big, _fingerprint_many([flat[name] for name in big]))) if big else {}
    on_host = jax.device_get({name: x for name, x in flat.items() if name not in on_device})
    values = {name: _fingerprint_host(np.asarray(x)) for name, x in on_host.items()}
    values.update({name: int(v) for name, v in jax.device_get(on_device).items()})
    return {name: f"{values[name]:08x}" for name in flat}


def _target(abstract_state):
    """The restore target: each leaf's shape, dtype and sharding (one local device where it has none)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf_target(path, leaf):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise ValueError(f"abstract_state leaf {_path_name(path)!r} is a {type(leaf).__name__}, expected a "
                             "jax.ShapeDtypeStruct or an array")
        sharding = getattr(leaf, "sharding", None)
        sharding = sharding if isinstance(sharding, jax.sharding.Sharding) else default
        return jax.ShapeDtypeStruct(tuple(leaf.shape), np.dtype(leaf.dtype), sharding=sharding)

    return jax.tree_util.tree_map_with_path(leaf_target, abstract_state)


def _describe(shape, dtype) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _compare(saved: dict[str, Any], wanted: dict[str, jax.ShapeDtypeStruct]) -> str | None:
    """Why the saved arrays (name -> orbax ArrayMetadata) do not fit the target, or None when they do."""
    problems = []
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing:
        problems.append(f"{len(missing)} leaf(s) of abstract_state not in the checkpoint (e.g. {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} leaf(s) in the checkpoint not in abstract_state (e.g. {extra[:3]})")
    mismatched = []
    for name in sorted(set(saved) & set(wanted)):
        have, want = saved[name], wanted[name]
        shape, dtype = getattr(have, "shape", None), getattr(have, "dtype", None)
        if shape is None or dtype is None:
            mismatched.append(f"{name}: saved as {type(have).__name__}, not an array")
        elif tuple(shape) != tuple(want.shape) or np.dtype(dtype) != np.dtype(want.dtype):
            mismatched.append(f"{name}: saved {_describe(shape, dtype)}, expected {_describe(want.shape, want.dtype)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape/dtype mismatch(es): {'; '.join(mismatched[:3])}")
    return "; ".join(problems) or None


def _whole_shard_saves_on_cpu() -> None:
    """On several CPU devices, orbax writes each replicated shard whole (once per process, idempotent)."""
    global _whole_shards
    if not _whole_shards and jax.default_backend() == "cpu" and jax.device_count() > 1:
        # Replica-parallel saving slices every replicated shard with eager ops, one compile per slice shape:
        # ~40 s on the first save of the tiny model over 8 CPU devices.
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
        _whole_shards = True


_whole_shards = False


class Checkpointer:
    """Saves and restores (state, meta) per training step under `directory`; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
        """Opens (does not create) the checkpoint directory; keeps the newest `max_to_keep` steps when saving."""
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"Checkpointer: max_to_keep must be a positive int, got {max_to_keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"{self.directory}: checkpoint directory is a file, expected a directory")
        _whole_shard_saves_on_cpu()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=False)
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._unrestorable: dict[int, str] = {}  # step -> reason, found by restore(); set aside at the next save
        self._saved_before = False
        self._closed = False
        _register_exit_hook()
        _OPEN.add(self)

    # ---- queries ----

    def all_steps(self) -> list[int]:
        """Committed steps plus this process's saves still in flight, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step (None when there is none); an unrestorable newest step still counts until set aside."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ---- saving ----

    def save(self, step: int, state, meta: dict, force: bool = False) -> None:
        """Starts saving (state, meta) as `step` (async by default); an existing step is replaced only with force."""
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"{self.directory}: checkpoint step must be a non-negative int, got {step!r}")
        step = int(step)
        self._check_meta(step, meta)
        _check_state(state)
        self._prepare_directory()
        steps = self.all_steps()
        if step in steps:
            if not force:
                raise ValueError(f"{self.directory}: a checkpoint for step {step} already exists; pass force=True to "
                                 "replace it")
            log.warning("%s: replacing the existing checkpoint for step %d (force=True)", self.directory, step)
            self._manager.wait_until_finished()
            self._manager.delete(step)
        elif steps and step < steps[-1] and not force:
            raise ValueError(f"{self.directory}: step {step} is older than the newest checkpoint (step {steps[-1]}); "
                             "saves must go forward (pass force=True, or use a fresh directory)")
        record = {**meta, _RECORD: {"step": step, "fingerprints": _fingerprints(state)}}
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(record)})
        if not self._manager.save(step, args=args, force=True):
            raise ValueError(f"{self.directory}: orbax declined to save step {step}")

    def _check_meta(self, step: int, meta: dict) -> None:
        """Fails now, not later in orbax's writer thread, on meta that cannot be saved or contradicts the step."""
        if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
            raise ValueError(f"{self.directory}: checkpoint meta must be a dict with str keys, got "
                             f"{type(meta).__name__}")
        if _RECORD in meta:
            raise ValueError(f"{self.directory}: checkpoint meta key {_RECORD!r} is reserved")
        if "step" in meta and meta["step"] != step:
            raise ValueError(f"{self.directory}: meta['step'] is {meta['step']!r} but saving as step {step}")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.directory}: checkpoint meta for step {step} is not JSON-serializable: {e}") from e

    def _prepare_directory(self) -> None:
        """Creates the directory; on the first save drops stale tmp saves; sets unrestorable steps aside."""
        os.makedirs(self.directory, exist_ok=True)
        if not self._saved_before and jax.process_index() == 0:
            # No save of ours is in flight yet, so every tmp directory here is left over from a crashed run
            # (process 0 only: with several processes the others wait for it inside orbax's save).
            for name in sorted(os.listdir(self.directory)):
                if _TMP_MARK in name:
                    log.warning("%s: removing %s, an uncommitted save left by an earlier run", self.directory, name)
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            self._saved_before = True
        if self._unrestorable:
            # They would shadow the steps this run saves next (latest_step, pruning, "already exists").
            aside = os.path.join(self.directory, _SET_ASIDE)
            os.makedirs(aside, exist_ok=True)
            for step, reason in sorted(self._unrestorable.items()):
                src = os.path.join(self.directory, str(step))
                if os.path.isdir(src):
                    dst = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9}")
                    os.rename(src, dst)
                    log.warning("%s: moved unrestorable checkpoint step %d to %s (%s)", self.directory, step, dst,
                                reason)
            self._unrestorable.clear()
            self._manager.reload()

    def wait(self) -> None:
        """Blocks until every pending save is committed (renamed into place); raises if a background save failed."""
        if not self._closed:
            self._manager.wait_until_finished()

    # ---- restoring ----

    def restore(self, abstract_state) -> tuple[int, Any, dict]:
        """(step, state, meta) from the newest restorable checkpoint, into abstract_state's structure and dtypes."""
        target = _target(abstract_state)
        steps = self._steps_on_disk()
        tried = []
        for step in reversed(steps):
            try:
                state, meta = self._restore(step, target)
            except Exception as e:  # noqa: BLE001 - any failure to read a step is a reason to try the one before
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
                log.warning("%s: checkpoint step %d is not restorable (%s); trying the previous one",
                            self.directory, step, reason)
                self._unrestorable[step] = reason
                tried.append(f"step {step}: {reason}")
                continue
            if tried:
                log.warning("%s: restored step %d after skipping %d unrestorable newer checkpoint(s)",
                            self.directory, step, len(tried))
            return step, state, meta
        raise ValueError(f"{self.directory}: no restorable checkpoint among steps {steps}:\n  " + "\n  ".join(tried))

    def restore_step(self, step: int, abstract_state) -> tuple[Any, dict]:
        """(state, meta) of one given step; no fallback."""
        target = _target(abstract_state)
        steps = self._steps_on_disk()
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step}; available steps: {steps}")
        return self._restore(step, target)

    def _steps_on_disk(self) -> list[int]:
        self._check_open()
        self._manager.wait_until_finished()  # our own saves first, so that reload() sees them
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoints found (directory "
                                    f"{'is empty' if os.path.isdir(self.directory) else 'does not exist'})")
        return steps

    def _restore(self, step: int, target) -> tuple[Any, dict]:
        """One step, checked: saved arrays fit the target exactly, the record matches the step and the data."""
        saved = self._manager.item_metadata(step)[_STATE]
        if saved is None:
            raise ValueError("its 'state' item has no readable metadata")
        saved_tree = getattr(saved, "tree", saved)
        mismatch = _compare(_flatten(saved_tree, is_leaf=lambda x: hasattr(x, "shape")), _flatten(target))
        if mismatch:
            raise ValueError(f"does not match abstract_state: {mismatch}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}))
        state, meta = restored[_STATE], restored[_META]
        if not isinstance(meta, dict) or not isinstance(meta.get(_RECORD), dict):
            raise ValueError(f"meta has no {_RECORD!r} record (not written by dsv3_jax Checkpointer, or damaged)")
        meta = dict(meta)
        record = meta.pop(_RECORD)
        if record.get("step") != step or meta.get("step", step) != step:
            raise ValueError(f"meta says step {meta.get('step')!r} / record step {record.get('step')!r}, but the "
                             f"directory is step {step}")
        expected, actual = record.get("fingerprints"), _fingerprints(state)
        if expected != actual:
            bad = sorted(k for k in actual if expected.get(k) != actual[k]) if isinstance(expected, dict) else ["all"]
            raise ValueError(f"array data fingerprint mismatch in {len(bad)} leaf(s) (e.g. {bad[:3]}): "
                             "corrupted on disk")
        return state, meta

    # ---- lifetime ----

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.directory}: Checkpointer is closed")

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads; idempotent."""
        if not self._closed:
            try:
                self._manager.wait_until_finished()
            finally:
                self._closed = True
                _OPEN.discard(self)
                self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
