"""Tests for dsv3_jax/train/checkpoint.py: bit-exact round trips, async saves, keep-last-K, fallback past corrupted
or mismatched checkpoints, crashes mid-save (a killed child process) and the no-overwrite rule.

Each step's state is drawn from its own seed, so a restore is checked against an independent rebuild of the state it
claims to be, bit for bit.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv3_jax.train import checkpoint as ckpt_mod
from dsv3_jax.train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A failed read leaves orbax coroutines that Python reports as "Exception ignored" at collection; that is noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
_OPT = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, mu_dtype=jnp.bfloat16))


def _state(step: int, w_shape=(32, 48)) -> dict:
    """A training-state-like pytree: float32 params, optax state (bfloat16 mu, int32 count), uint32 key data."""
    rng = np.random.default_rng(step)
    params = {"embed": jnp.asarray(rng.standard_normal(w_shape), jnp.float32),
              "layers": {"0": {"w": jnp.asarray(rng.standard_normal((48, 16)), jnp.float32)}}}
    opt = _OPT.init(params)
    opt = jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), x.dtype) if x.ndim else x + step, opt)
    return {"params": params, "opt": opt, "expert_bias": jnp.asarray(rng.standard_normal((8,)), jnp.float32),
            "count": jnp.asarray(rng.integers(-2**31, 2**31 - 1, (3, 5)), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(step))}


def _meta(step: int) -> dict:
    return {"step": step, "data_position": 1000 * step, "tokenizer": '{"vocab": ["a", "b"]}',
            "config": {"hidden_size": 32, "rope": {"type": "yarn", "factor": 40.0}}, "args": ["--steps", "10"]}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _assert_bit_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(g, jax.Array)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


def _save_steps(directory, steps, **kwargs) -> None:
    with Checkpointer(directory, **kwargs) as c:
        for s in steps:
            c.save(s, _state(s), _meta(s))


def _array_files(step_dir: str) -> list[str]:
    """The OCDBT data files of the state item, largest first (arrays over 1 KiB live in them, not inline)."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    assert files, f"no array data files under {step_dir}"
    return sorted(files, key=os.path.getsize, reverse=True)


def test_round_trip_bit_exact(tmp_path):
    d = tmp_path / "ckpt"
    state = _state(7)
    dtypes = {x.dtype for x in jax.tree.leaves(state)}
    assert {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int32), jnp.dtype(jnp.uint32)} <= dtypes
    with Checkpointer(d, async_save=False) as c:
        c.save(7, state, _meta(7))
        assert c.latest_step() == 7 and c.all_steps() == [7]
    with Checkpointer(d) as c:
        step, got, meta = c.restore(_abstract(state))
        got2, meta2 = c.restore_step(7, state)  # arrays as the target work too
    assert step == 7 and meta == _meta(7) and meta2 == meta
    _assert_bit_equal(got, state)
    _assert_bit_equal(got2, state)


def test_async_save_commits_on_wait_and_on_close(tmp_path):
    d = tmp_path / "ckpt"
    c = Checkpointer(d, async_save=True)
    c.save(1, _state(1), _meta(1))
    c.wait()
    assert sorted(os.listdir(d)) == ["1"]
    with Checkpointer(d) as other:
        _assert_bit_equal(other.restore(_abstract(_state(1)))[1], _state(1))
    c.save(2, _state(2), _meta(2))
    c.close()  # waits
    c.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        c.save(3, _state(3), _meta(3))
    with Checkpointer(d) as other:
        step, got, meta = other.restore(_abstract(_state(2)))
    assert step == 2 and meta["data_position"] == 2000
    _assert_bit_equal(got, _state(2))


def test_keeps_last_k(tmp_path):
    d = tmp_path / "ckpt"
    _save_steps(d, [10, 20, 30, 40, 50], max_to_keep=2)
    assert sorted(os.listdir(d), key=int) == ["40", "50"]
    with Checkpointer(d, max_to_keep=2) as c:
        assert c.all_steps() == [40, 50] and c.latest_step() == 50


def _delete_array_file(step_dir):
    os.remove(_array_files(step_dir)[0])


def _truncate_array_file(step_dir):
    f = _array_files(step_dir)[0]
    os.truncate(f, os.path.getsize(f) // 2)


def _garbage_meta(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as fh:
        fh.write('{"step": 3, "data_posi')


def _flip_array_bytes(step_dir):
    f = _array_files(step_dir)[0]
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x10  # random float data is stored uncompressed, so this decodes to a wrong value
    open(f, "wb").write(bytes(data))


def _remove_tree_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _remove_state_item(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


def _wrong_step_in_meta(step_dir):
    # A well-formed checkpoint copied under the wrong step name: arrays fine, meta says step 2.
    shutil.rmtree(step_dir)
    shutil.copytree(os.path.join(os.path.dirname(step_dir), "2"), step_dir)


CORRUPTIONS = [_delete_array_file, _truncate_array_file, _garbage_meta, _flip_array_bytes, _remove_tree_metadata,
               _remove_state_item, _wrong_step_in_meta]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupted_newest_falls_back_to_previous(tmp_path, caplog, corrupt):
    d = tmp_path / "ckpt"
    _save_steps(d, [1, 2, 3])
    corrupt(str(d / "3"))
    with caplog.at_level(logging.WARNING, logger=ckpt_mod.__name__), Checkpointer(d) as c:
        assert c.latest_step() == 3  # still listed: only reading it shows the damage
        step, got, meta = c.restore(_abstract(_state(3)))
    assert step == 2 and meta == _meta(2)
    _assert_bit_equal(got, _state(2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3 is not restorable" in w for w in warnings), warnings
    # a flipped byte is caught either by our fingerprint or, when it lands in zstd framing, by orbax's decoder;
    # both must end in the fallback checked above


def test_all_corrupted_raises_listing_each_step(tmp_path, caplog):
    d = tmp_path / "ckpt"
    _save_steps(d, [1, 2])
    _garbage_meta(str(d / "2"))
    _truncate_array_file(str(d / "1"))
    with Checkpointer(d) as c, pytest.raises(ValueError) as err:
        c.restore(_abstract(_state(1)))
    msg = str(err.value)
    assert str(d) in msg and "steps [1, 2]" in msg
    assert "step 2: JSONDecodeError" in msg and "step 1: " in msg


def test_fallback_then_resumed_run_can_save_the_skipped_step(tmp_path, caplog):
    d = tmp_path / "ckpt"
    _save_steps(d, [1, 2, 3])
    _garbage_meta(str(d / "3"))
    with Checkpointer(d) as c:
        assert c.restore(_abstract(_state(3)))[0] == 2
        c.save(3, _state(3), _meta(3))  # not "already exists": the unrestorable step 3 is set aside, not deleted
        c.wait()
        assert c.all_steps() == [1, 2, 3]
    aside = os.listdir(d / "unrestorable")
    assert len(aside) == 1 and aside[0].startswith("3-")
    with Checkpointer(d) as c:
        step, got, _ = c.restore(_abstract(_state(3)))
    assert step == 3
    _assert_bit_equal(got, _state(3))


def test_uncommitted_tmp_directory_is_ignored_then_cleaned(tmp_path, caplog):
    # What orbax leaves when a save dies before its final rename: "<step>.orbax-checkpoint-tmp" holding every item.
    d = tmp_path / "ckpt"
    _save_steps(d, [1, 2])
    shutil.copytree(d / "2", d / "3.orbax-checkpoint-tmp")
    with Checkpointer(d) as c:
        assert c.latest_step() == 2 and c.all_steps() == [1, 2]
        step, got, _ = c.restore(_abstract(_state(2)))
        assert step == 2
        _assert_bit_equal(got, _state(2))
        c.save(4, _state(4), _meta(4))
    assert sorted(os.listdir(d)) == ["1", "2", "4"]
    assert any("uncommitted save" in r.getMessage() for r in caplog.records)


def _child_state(step: int, rows: int) -> dict:
    """The child runs' state, numpy only (few compiles); _CHILD builds the same."""
    return {"w": np.random.default_rng(step).standard_normal((rows, 512)).astype(np.float32),
            "key": np.arange(4, dtype=np.uint32) + step}


_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from dsv3_jax.train.checkpoint import Checkpointer

    def child_state(step, rows):  # as _child_state in the test module
        return {"w": np.random.default_rng(step).standard_normal((rows, 512)).astype(np.float32),
                "key": np.arange(4, dtype=np.uint32) + step}

    mode, directory = sys.argv[1], sys.argv[2]
    c = Checkpointer(directory)
    c.save(1, child_state(1, 4), {"step": 1})
    c.wait()
    if mode == "kill_before_rename":  # every file written, the commit rename not done
        async def die(self):
            os.kill(os.getpid(), signal.SIGKILL)
        atomicity.AtomicRenameTemporaryPath.finalize = die
    c.save(2, child_state(2, 1024), {"step": 2})  # 2 MiB: the write takes a while
    if mode == "kill_during_write":
        tmp = os.path.join(directory, "2.orbax-checkpoint-tmp", "state")
        deadline = time.time() + 20
        while not os.path.isdir(tmp) and time.time() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "kill_before_rename":
        c.wait()
    # mode "exit_without_close": leave with the save in flight; the exit hook must commit it
""")


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """The three child runs, started together (each pays ~3 s of imports): mode -> (returncode, stderr, directory)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = {}
    for mode in ("kill_during_write", "kill_before_rename", "exit_without_close"):
        d = tmp_path_factory.mktemp(mode) / "ckpt"
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(d)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        runs[mode] = (proc, d)
    out = {}
    for mode, (proc, d) in runs.items():
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        out[mode] = (proc.returncode, err, d)
    return out


@pytest.mark.parametrize("mode", ["kill_during_write", "kill_before_rename"])
def test_crash_mid_save_leaves_previous_checkpoint(children, mode):
    returncode, stderr, d = children[mode]
    assert returncode == -signal.SIGKILL, stderr[-3000:]
    assert "1" in os.listdir(d) and "2" not in os.listdir(d)
    assert "2.orbax-checkpoint-tmp" in os.listdir(d)  # the crash really hit the save in flight
    with Checkpointer(d) as c:
        assert c.latest_step() == 1
        step, got, meta = c.restore(_child_state(1, 4))
        assert step == 1 and meta == {"step": 1}
        _assert_bit_equal(got, _child_state(1, 4))
        c.save(2, _child_state(2, 4), {"step": 2})  # the resumed run saves step 2 again, over nothing
    assert sorted(os.listdir(d)) == ["1", "2"]


def test_exit_without_close_commits_pending_save(children):
    returncode, stderr, d = children["exit_without_close"]
    assert returncode == 0, stderr[-3000:]
    with Checkpointer(d) as c:
        step, got, _ = c.restore(_child_state(2, 1024))
    assert step == 2
    _assert_bit_equal(got, _child_state(2, 1024))


def test_shape_mismatch_falls_back_then_errors(tmp_path, caplog):
    d = tmp_path / "ckpt"
    with Checkpointer(d) as c:
        c.save(1, _state(1), _meta(1))
        c.save(2, _state(2, w_shape=(32, 50)), _meta(2))  # e.g. a changed vocabulary
    with Checkpointer(d) as c:
        step, got, _ = c.restore(_abstract(_state(1)))
        assert step == 1
        _assert_bit_equal(got, _state(1))
        assert any("params/embed: saved float32[32, 50], expected float32[32, 48]" in r.getMessage()
                   for r in caplog.records)
        with pytest.raises(ValueError, match=r"step 2: .*params/embed: saved float32\[32, 50\], expected "
                                             r"float32\[32, 64\][\s\S]*step 1: .*expected float32\[32, 64\]"):
            c.restore(_abstract(_state(1, w_shape=(32, 64))))


def test_dtype_and_structure_mismatch_are_errors_not_casts(tmp_path):
    # orbax itself would cast float32 -> bfloat16 silently; a resumed run must not change dtypes.
    d = tmp_path / "ckpt"
    _save_steps(d, [1])
    target = _abstract(_state(1))
    target["expert_bias"] = jax.ShapeDtypeStruct((8,), jnp.bfloat16)
    with Checkpointer(d) as c:
        with pytest.raises(ValueError, match=r"expert_bias: saved float32\[8\], expected bfloat16\[8\]"):
            c.restore(target)
        extra = {**_abstract(_state(1)), "new_leaf": jax.ShapeDtypeStruct((2,), jnp.float32)}
        with pytest.raises(ValueError, match=r"not in the checkpoint \(e.g. \['new_leaf'\]\)"):
            c.restore_step(1, extra)


def test_no_silent_overwrite(tmp_path):
    d = tmp_path / "ckpt"
    with Checkpointer(d) as c:
        c.save(5, _state(5), _meta(5))
        with pytest.raises(ValueError, match=r"step 5 already exists; pass force=True"):
            c.save(5, _state(6), _meta(5))
        c.wait()
        with pytest.raises(ValueError, match=r"step 5 already exists"):
            c.save(5, _state(6), _meta(5))
        with pytest.raises(ValueError, match=r"step 4 is older than the newest checkpoint \(step 5\)"):
            c.save(4, _state(4), _meta(4))
        c.save(5, _state(6), _meta(5), force=True)
    with Checkpointer(d) as c:
        _, got, _ = c.restore(_abstract(_state(5)))
    _assert_bit_equal(got, _state(6))


def test_bad_inputs_fail_at_save_time(tmp_path):
    d = tmp_path / "ckpt"
    with Checkpointer(d) as c:
        with pytest.raises(ValueError, match="typed PRNG key.*key_data"):
            c.save(1, {"rng": jax.random.key(0)}, {"step": 1})
        with pytest.raises(ValueError, match="not JSON-serializable"):
            c.save(1, _state(1), {"step": 1, "bad": object()})
        with pytest.raises(ValueError, match=r"meta\['step'\] is 2 but saving as step 1"):
            c.save(1, _state(1), {"step": 2})
        with pytest.raises(ValueError, match="reserved"):
            c.save(1, _state(1), {"_checkpoint": 0})
        with pytest.raises(ValueError, match="'x' is a int"):
            c.save(1, {"x": 3}, {})
        with pytest.raises(ValueError, match="non-negative int"):
            c.save(-1, _state(1), {})
        assert c.all_steps() == []
        with pytest.raises(ValueError, match="abstract_state leaf 'params/embed' is a int"):
            c.restore({"params": {"embed": 3}})
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(d, max_to_keep=0)


def test_missing_or_empty_directory(tmp_path):
    missing = tmp_path / "nope" / "checkpoints"
    with Checkpointer(missing) as c:
        assert c.latest_step() is None and c.all_steps() == []
        with pytest.raises(FileNotFoundError, match=f"{missing}: no checkpoints found.*does not exist"):
            c.restore(_abstract(_state(1)))
    assert not missing.exists()  # opening to restore creates nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    with Checkpointer(empty) as c:
        assert c.latest_step() is None
        with pytest.raises(FileNotFoundError, match=f"{empty}: no checkpoints found.*is empty"):
            c.restore(_abstract(_state(1)))
        c.save(3, _state(3), _meta(3))
        c.wait()
        with pytest.raises(FileNotFoundError, match=rf"{empty}: no checkpoint for step 4; available steps: \[3\]"):
            c.restore_step(4, _abstract(_state(3)))


def test_background_write_failure_surfaces_in_wait(tmp_path, monkeypatch):
    atomicity = pytest.importorskip("orbax.checkpoint._src.path.atomicity")  # private: the commit step, to break it
    d = tmp_path / "ckpt"
    with Checkpointer(d) as c:
        c.save(1, _state(1), _meta(1))
        c.wait()

        async def fail(self):
            raise OSError("disk full (injected)")

        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail)
        c.save(2, _state(2), _meta(2))
        with pytest.raises(OSError, match="disk full"):
            c.wait()
        monkeypatch.undo()
        assert c.all_steps() == [1]
        c.save(2, _state(2), _meta(2))  # the failed attempt's tmp directory does not block a retry
    with Checkpointer(d) as c:
        assert c.restore(_abstract(_state(2)))[0] == 2


def test_fingerprint_sees_every_bit():
    words = np.random.default_rng(1).integers(0, 2**32, (3, 5, 7), dtype=np.uint32)
    ref = (words.reshape(-1).astype(np.uint64) * (2 * np.arange(words.size, dtype=np.uint64) + 1)).sum() % 2**32
    assert ckpt_mod._fingerprints({"w": words})["w"] == f"{int(ref):08x}"  # the definition, in numpy
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    ref = ckpt_mod._fingerprints({"x": x})["x"]
    for i in range(x.size):
        for bit in (0, 17, 31):
            y = x.copy().reshape(-1).view(np.uint32)
            y[i] ^= np.uint32(1 << bit)
            assert ckpt_mod._fingerprints({"x": y.view(np.float32).reshape(4, 5)})["x"] != ref
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert ckpt_mod._fingerprints({"x": swapped})["x"] != ref


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint32, jnp.int8,
                                   jnp.float8_e4m3fn, jnp.bool_])
def test_fingerprint_host_and_device_paths_agree(dtype, monkeypatch):
    # Small leaves are summed in NumPy, large ones on the device; a checkpoint must verify whichever path runs.
    x = np.random.default_rng(2).standard_normal((3, 70, 5)) * 40
    x = jnp.asarray(x > 0 if dtype == jnp.bool_ else x, dtype)
    monkeypatch.setattr(ckpt_mod, "_HOST_CHUNK", 256)  # several chunks on the host path
    host = ckpt_mod._fingerprints({"x": x})["x"]
    monkeypatch.setattr(ckpt_mod, "_DEVICE_MIN_WORDS", 1)
    assert ckpt_mod._fingerprints({"x": x})["x"] == host
