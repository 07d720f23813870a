"""Tests for dsv3_jax/safetensors_io.py against the reference ``safetensors`` package and hand-built files."""

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from dsv3_jax import safetensors_io
from dsv3_jax.safetensors_io import CheckpointReader, CheckpointWriter, SafetensorsFile

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
TORCH_OF = {np.dtype(np.float32): torch.float32, BF16: torch.bfloat16, E4M3: torch.float8_e4m3fn,
            np.dtype(np.int64): torch.int64, np.dtype(np.bool_): torch.bool}


def _raw_bytes(x) -> bytes:
    """Raw little-endian bytes of a NumPy array or torch tensor."""
    if isinstance(x, torch.Tensor):
        return x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(x).tobytes()


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    e4m3_special = np.array([448.0, -448.0, -0.0, 0.0, 2.0**-9, -2.0**-9, 2.0**-7, 1.5, np.nan], np.float32)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal((4, 7)).astype(BF16),
        "bf16.special": np.array([-0.0, np.inf, -np.inf, 1e-40, 3.0e38], np.float32).astype(BF16),
        "e4m3": rng.uniform(-448, 448, (2, 3, 4)).astype(E4M3),
        "e4m3.special": e4m3_special.astype(E4M3),
        "i64": np.array([[-(2**63), 2**63 - 1], [0, -1]], np.int64),
        "bool": np.array([True, False, True]),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 3), BF16),
    }


def _write(path, tensors, **kw):
    with CheckpointWriter(path, **kw) as w:
        for name, arr in tensors.items():
            w.add(name, arr)


def _raw_file(path, header, buffer=b"", header_len=None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + buffer)
    return path


# --- round trips --------------------------------------------------------------------------------------------------


def test_round_trip_bit_exact(tmp_path):
    tensors = _tensors()
    _write(tmp_path, tensors)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    with CheckpointReader(tmp_path) as r:
        assert r.keys() == list(tensors)
        for name, want in tensors.items():
            got = r.get(name)
            assert r.shape(name) == want.shape and got.shape == want.shape, name
            assert r.dtype(name) == want.dtype and got.dtype == want.dtype, name
            assert _raw_bytes(got) == _raw_bytes(want), name
        assert np.signbit(r.get("e4m3.special")[2])  # -0.0 survives
        assert float(r.get("e4m3.special")[0]) == 448.0
        assert float(r.get("e4m3.special")[4]) == 2.0**-9  # smallest E4M3 subnormal
        assert r.get("scalar").ndim == 0 and float(r.get("scalar")) == 3.5


def test_writer_accepts_non_contiguous_big_endian_and_jax(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"transposed": base.T, "big_endian": base.astype(">f4"),
               "jax_bf16": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)}
    _write(tmp_path, tensors)
    with CheckpointReader(tmp_path / "model.safetensors") as r:
        np.testing.assert_array_equal(r.get("transposed"), base.T)
        np.testing.assert_array_equal(r.get("big_endian"), base)
        assert r.dtype("jax_bf16") == BF16
        np.testing.assert_array_equal(r.get("jax_bf16").astype(np.float32), np.arange(6.0).reshape(2, 3))


def test_header_padded_to_8_bytes_and_metadata(tmp_path):
    _write(tmp_path, {"x": np.ones(3, np.float32)}, metadata={"format": "pt", "origin": "test"})
    with open(tmp_path / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    assert n % 8 == 0
    with SafetensorsFile(tmp_path / "model.safetensors") as f:
        assert f.metadata == {"format": "pt", "origin": "test"}
    _write(tmp_path / "default", {"x": np.ones(3, np.float32)})
    assert SafetensorsFile(tmp_path / "default" / "model.safetensors").metadata == {"format": "pt"}


# --- interop with the reference implementation --------------------------------------------------------------------


def test_reads_reference_files_bit_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ref = {
        "f32": torch.randn(3, 4, generator=gen),
        "bf16": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
        "e4m3": (torch.randn(4, 8, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
        "e4m3.special": torch.tensor([448.0, -0.0, 2.0**-9, -2.0**-8]).to(torch.float8_e4m3fn),
        "i64": torch.tensor([-(2**63), 7]),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    }
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(ref, str(path), metadata={"format": "pt"})
    with CheckpointReader(path) as r, SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}
        assert sorted(r.keys()) == sorted(ref)
        for name, t in ref.items():
            got = r.get(name)
            assert got.shape == tuple(t.shape), name
            assert TORCH_OF[got.dtype] == t.dtype, name
            assert _raw_bytes(got) == _raw_bytes(t), name


def test_reference_reads_our_files(tmp_path):
    tensors = _tensors()
    _write(tmp_path, tensors)
    path = str(tmp_path / "model.safetensors")
    loaded = safetensors.torch.load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, want in tensors.items():
        t = loaded[name]
        assert t.dtype == TORCH_OF[want.dtype] and tuple(t.shape) == want.shape, name
        assert _raw_bytes(t) == _raw_bytes(want), name
        if want.dtype != np.bool_:
            np.testing.assert_array_equal(t.float().numpy(), want.astype(np.float32), err_msg=name)
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert _raw_bytes(f.get_tensor("e4m3.special")) == _raw_bytes(tensors["e4m3.special"])
    np_only = safetensors.numpy.load_file(str(_write_return(tmp_path / "np", {"f32": tensors["f32"]})))
    np.testing.assert_array_equal(np_only["f32"], tensors["f32"])


def _write_return(path, tensors):
    _write(path, tensors)
    return path / "model.safetensors"


# --- sharding and the LRU -----------------------------------------------------------------------------------------


def test_sharding_index_and_reference_per_shard(tmp_path):
    tensors = {f"layers.{i}.w": np.full((4, 4), i, np.float32) for i in range(5)}  # 64 bytes each
    tensors["big"] = np.arange(100, dtype=np.float32).astype(BF16)  # 200 bytes > limit: a shard of its own
    tensors["tiny"] = np.array([1, 2], np.int64)
    _write(tmp_path, tensors, max_shard_bytes=150)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    # [layers.0, layers.1] [layers.2, layers.3] [layers.4] [big] [tiny]
    assert shards == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert sorted(os.listdir(tmp_path)) == shards + ["model.safetensors.index.json"]
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert list(index["weight_map"]) == list(tensors)
    assert index["weight_map"]["big"] == "model-00004-of-00005.safetensors"
    assert index["weight_map"]["layers.1.w"] == "model-00001-of-00005.safetensors"

    seen = {}
    for shard in shards:
        size = os.path.getsize(tmp_path / shard)
        with safetensors.safe_open(str(tmp_path / shard), "pt") as f:
            data = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
            assert data <= 150 or list(f.keys()) == ["big"]
            assert size > data
            for k in f.keys():
                assert index["weight_map"][k] == shard
                seen[k] = f.get_tensor(k)
    assert sorted(seen) == sorted(tensors)
    with CheckpointReader(tmp_path) as r:
        assert sorted(r.keys()) == sorted(tensors) and "big" in r and "nope" not in r
        for name, want in tensors.items():
            assert _raw_bytes(r.get(name)) == _raw_bytes(want) == _raw_bytes(seen[name]), name
    with CheckpointReader(tmp_path / "model.safetensors.index.json") as r:
        assert len(r) == len(tensors)


def test_get_is_a_read_only_memmap_view(tmp_path):
    _write(tmp_path, {"x": np.arange(1000, dtype=np.float32)})
    with CheckpointReader(tmp_path) as r:
        x = r.get("x")
    assert isinstance(x, np.memmap)
    assert not x.flags.writeable and not x.flags.owndata
    base = x
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, mmap.mmap)
    np.testing.assert_array_equal(x, np.arange(1000, dtype=np.float32))  # valid after reader.close()
    with pytest.raises(ValueError):
        x[0] = 1.0


def test_lru_bounds_open_shards(tmp_path, monkeypatch):
    tensors = {f"t{i}": np.full(8, i, np.int32) for i in range(12)}  # 32 bytes each: one per shard
    _write(tmp_path, tensors, max_shard_bytes=32)
    assert len(os.listdir(tmp_path)) == 13

    live, peak = set(), [0]
    real_init, real_close = SafetensorsFile.__init__, SafetensorsFile.close

    def init(self, path):
        real_init(self, path)
        live.add(id(self))
        peak[0] = max(peak[0], len(live))

    def close(self):
        live.discard(id(self))
        real_close(self)

    monkeypatch.setattr(SafetensorsFile, "__init__", init)
    monkeypatch.setattr(SafetensorsFile, "close", close)
    arrays = []
    with CheckpointReader(tmp_path, max_open_files=3) as r:
        for _ in range(2):
            for name in reversed(r.keys()):
                arrays.append((name, r.get(name)))
                assert r.shape(name) == (8,)
                assert len(r.open_shards) <= 3
    assert peak[0] == 3 and not live
    for name, arr in arrays:  # views of evicted shards stay valid
        np.testing.assert_array_equal(arr, tensors[name])


def test_copy_without_copy_file_range(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "_copy_file_range", None)
    monkeypatch.setattr(safetensors_io, "_COPY_CHUNK", 7)
    tensors = _tensors()
    _write(tmp_path, tensors)
    loaded = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert all(_raw_bytes(loaded[k]) == _raw_bytes(v) for k, v in tensors.items())


# --- errors -------------------------------------------------------------------------------------------------------


def test_error_directory_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*model\.safetensors\.index\.json") as e:
        CheckpointReader(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointReader(tmp_path / "missing")


def test_error_missing_shard(tmp_path):
    _write(tmp_path, {"a": np.zeros(8, np.float32), "b": np.zeros(8, np.float32)}, max_shard_bytes=32)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"'model-00002-of-00002\.safetensors'.*index\.json"):
        CheckpointReader(tmp_path)


def test_error_tensor_listed_but_absent_and_unknown_name(tmp_path):
    _write(tmp_path, {"a": np.zeros(8, np.float32), "b": np.zeros(8, np.float32)}, max_shard_bytes=32)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with CheckpointReader(tmp_path) as r:
        with pytest.raises(ValueError, match=r"'ghost'.*index\.json.*model-00001-of-00002\.safetensors"):
            r.get("ghost")
        with pytest.raises(KeyError, match="'nope'"):
            r.get("nope")
        with pytest.raises(KeyError, match="'nope'"):
            r.shape("nope")


def test_error_truncated_file(tmp_path):
    _write(tmp_path, {"a": np.zeros(8, np.float32)})
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:20])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or not a safetensors file"):
        CheckpointReader(tmp_path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        SafetensorsFile(path)
    path.write_bytes(data[:-4])  # header intact, buffer short
    with pytest.raises(ValueError, match=r"tensor 'a'.*out of range"):
        SafetensorsFile(path)
    (tmp_path / "text.safetensors").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        SafetensorsFile(tmp_path / "text.safetensors")


def test_error_corrupted_offsets(tmp_path):
    buf = bytes(16)
    bad_range = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    with pytest.raises(ValueError, match=r"tensor 'w'.*bad\.safetensors.*out of range"):
        SafetensorsFile(_raw_file(tmp_path / "bad.safetensors", bad_range, buf))
    bad_size = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}
    with pytest.raises(ValueError, match=r"tensor 'w'.*span 16 bytes.*needs 24"):
        SafetensorsFile(_raw_file(tmp_path / "size.safetensors", bad_size, buf))
    negative = {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}
    with pytest.raises(ValueError, match=r"tensor 'w'.*shape"):
        SafetensorsFile(_raw_file(tmp_path / "neg.safetensors", negative, buf))
    with pytest.raises(ValueError, match="JSON"):
        SafetensorsFile(_raw_file(tmp_path / "json.safetensors", {"w": 1}, buf, header_len=5))


def test_error_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "F4_E2M1", "shape": [2], "data_offsets": [0, 1]}}
    with pytest.raises(ValueError, match=r"tensor 'w'.*odd\.safetensors.*'F4_E2M1'"):
        SafetensorsFile(_raw_file(tmp_path / "odd.safetensors", header, b"\0"))
    with CheckpointWriter(tmp_path / "out") as w:
        with pytest.raises(ValueError, match=r"tensor 'c'.*complex64.*not supported"):
            w.add("c", np.zeros(2, np.complex64))


def test_error_duplicate_name(tmp_path):
    with CheckpointWriter(tmp_path) as w:
        w.add("a", np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="'a' was already added"):
            w.add("a", np.ones(2, np.float32))
    with CheckpointReader(tmp_path) as r:
        np.testing.assert_array_equal(r.get("a"), np.zeros(2, np.float32))


def test_refuses_to_overwrite_unless_asked(tmp_path):
    _write(tmp_path, {f"t{i}": np.full(4, i, np.float32) for i in range(3)}, max_shard_bytes=16)
    with pytest.raises(FileExistsError, match=r"model\.safetensors\.index\.json.*overwrite=True"):
        CheckpointWriter(tmp_path)
    _write(tmp_path / "single", {"a": np.zeros(1, np.float32)})
    with pytest.raises(FileExistsError, match=r"single.model\.safetensors.*overwrite=True"):
        CheckpointWriter(tmp_path / "single")

    _write(tmp_path, {"new": np.ones(2, BF16)}, overwrite=True)  # sharded -> single: old shards removed
    assert sorted(p for p in os.listdir(tmp_path) if p != "single") == ["model.safetensors"]
    with CheckpointReader(tmp_path) as r:
        assert r.keys() == ["new"]


def test_exception_in_writer_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, max_shard_bytes=16) as w:
            for i in range(5):  # several shards already finished when the error hits
                w.add(f"t{i}", np.zeros(4, np.float32))
            raise RuntimeError("boom")
    assert os.listdir(out) == []

    _write(out, {"old": np.zeros(2, np.float32)})
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(out, overwrite=True) as w:
            w.add("new", np.ones(2, np.float32))
            raise KeyboardInterrupt
    assert os.listdir(out) == ["model.safetensors"]  # the old checkpoint is untouched
    with CheckpointReader(out) as r:
        assert r.keys() == ["old"]
    with pytest.raises(ValueError, match="closed"):
        w.add("late", np.ones(1, np.float32))
