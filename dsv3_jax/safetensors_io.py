"""Streaming reader and writer for Hugging Face safetensors checkpoints, float8 included.

DeepSeek-V3's released checkpoint (BF16, F32 ``weight_scale_inv`` and F8_E4M3 weights in 163 shards listed by
``model.safetensors.index.json``) is far larger than host memory, and the ``safetensors`` package's NumPy API has
no float8. So we read the format ourselves: every tensor comes back as a read-only ``np.memmap`` view of its bytes
(no copy), with ``ml_dtypes`` supplying bfloat16 and float8, and only a few shards are mapped at a time. The writer
streams one tensor at a time to temporary files in the target directory and renames them into place only when the
whole checkpoint is written, so an interrupted save never looks complete.

File format: an 8-byte little-endian u64 header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the byte buffer;
offsets are relative to the buffer start and tensors are C-contiguous little-endian.
"""

from __future__ import annotations

import collections
import json
import math
import os
import struct
import uuid
from typing import Iterator, Mapping, Optional

import ml_dtypes
import numpy as np

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_METADATA_KEY = "__metadata__"
_COPY_CHUNK = 64 * 2**20
_copy_file_range = getattr(os, "copy_file_range", None)  # Linux in-kernel copy; tests patch it out


def _safetensors_code(dtype: np.dtype) -> Optional[str]:
    """The safetensors dtype code of a NumPy dtype, or None."""
    for code, dt in _DTYPES.items():
        if dt == dtype:
            return code
    return None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed on open, tensors memory-mapped on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mm: Optional[np.memmap] = None
        self._closed = False
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"safetensors file {self.path} does not exist") from None
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path}: truncated or not a safetensors file ({size} bytes, "
                                 "shorter than the 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if 8 + header_len > size:
                raise ValueError(f"{self.path}: truncated or not a safetensors file (header claims {header_len} "
                                 f"bytes but the file has {size})")
            raw = f.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: header is not valid UTF-8 JSON ({e}); truncated or not a "
                             "safetensors file") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: header must be a JSON object, got {type(header).__name__}")
        self._data_start = 8 + header_len
        buffer_len = size - self._data_start

        metadata = header.pop(_METADATA_KEY, None) or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"{self.path}: {_METADATA_KEY} must map str to str, got {metadata!r}")
        self.metadata: dict[str, str] = dict(metadata)

        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self._entries[name] = self._parse_entry(name, info, buffer_len)

    def _parse_entry(self, name: str, info, buffer_len: int):
        where = f"tensor {name!r} in {self.path}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"{where}: header entry must have dtype, shape and data_offsets, got {info!r}")
        code = info["dtype"]
        if code not in _DTYPES:
            raise ValueError(f"{where}: unsupported dtype {code!r}; expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[code]
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        offsets = info["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise ValueError(f"{where}: data_offsets must be [begin, end] ints, got {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= buffer_len:
            raise ValueError(f"{where}: data_offsets {offsets} out of range for a {buffer_len}-byte data buffer "
                             "(file truncated or header corrupted)")
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise ValueError(f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {shape} of "
                             f"{code} needs {expected}")
        return dtype, tuple(shape), begin, end

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in {self.path}") from None

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``."""
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        """NumPy dtype of tensor ``name`` (ml_dtypes for bfloat16/float8)."""
        return self._entry(name)[0]

    def get(self, name: str) -> np.memmap:
        """Tensor ``name`` as a read-only memmap view of the file (no copy); stays valid after close()."""
        dtype, shape, begin, end = self._entry(name)
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + begin
        return self._mm[start:start + (end - begin)].view(dtype).reshape(shape)

    def close(self) -> None:
        """Drop this file's mapping; arrays already returned keep it alive until they are freed."""
        # mmap.close() would fail (or invalidate) while views exist, so we only drop our reference.
        self._mm = None
        self._closed = True

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckpointReader:
    """All tensors of a (possibly sharded) safetensors checkpoint, with at most ``max_open_files`` shards mapped."""

    def __init__(self, path: str | os.PathLike, max_open_files: int = 4):
        if not _is_int(max_open_files) or max_open_files < 1:
            raise ValueError(f"max_open_files must be a positive int, got {max_open_files!r}")
        self.path = os.fspath(path)
        self.max_open_files = max_open_files
        self._open: collections.OrderedDict[str, SafetensorsFile] = collections.OrderedDict()
        self._index_path: Optional[str] = None
        if os.path.isdir(self.path):
            single = os.path.join(self.path, SINGLE_FILE_NAME)
            index = os.path.join(self.path, INDEX_FILE_NAME)
            if os.path.isfile(single):
                self._weight_map = self._single_file_map(single)
            elif os.path.isfile(index):
                self._weight_map = self._read_index(index)
            else:
                raise FileNotFoundError(f"{self.path}: no checkpoint found; expected {SINGLE_FILE_NAME!r} or "
                                        f"{INDEX_FILE_NAME!r} in this directory")
        elif os.path.isfile(self.path):
            if self.path.endswith(".json"):
                self._weight_map = self._read_index(self.path)
            else:
                self._weight_map = self._single_file_map(self.path)
        else:
            raise FileNotFoundError(f"checkpoint path {self.path} does not exist; expected a directory holding "
                                    f"{SINGLE_FILE_NAME!r} or {INDEX_FILE_NAME!r}, or a .safetensors file")

    def _single_file_map(self, file_path: str) -> dict[str, str]:
        f = SafetensorsFile(file_path)
        self._open[file_path] = f
        return {name: file_path for name in f.keys()}

    def _read_index(self, index_path: str) -> dict[str, str]:
        self._index_path = index_path
        try:
            with open(index_path, encoding="utf-8") as fh:
                index = json.load(fh)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"index {index_path} is not valid JSON: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"index {index_path} must hold a 'weight_map' object mapping tensor name to shard "
                             "file name")
        base = os.path.dirname(index_path)
        shard_paths = {shard: os.path.join(base, shard) for shard in set(weight_map.values())}
        for shard in sorted(shard_paths):
            if not os.path.isfile(shard_paths[shard]):
                raise FileNotFoundError(f"shard {shard!r} listed in index {index_path} does not exist "
                                        f"(expected at {shard_paths[shard]})")
        return {name: shard_paths[shard] for name, shard in weight_map.items()}

    def _file_for(self, name: str) -> SafetensorsFile:
        try:
            shard_path = self._weight_map[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.path}") from None
        f = self._open.get(shard_path)
        if f is None:
            while len(self._open) >= self.max_open_files:  # evict first: never more than the limit mapped
                self._open.popitem(last=False)[1].close()
            f = SafetensorsFile(shard_path)
            self._open[shard_path] = f
        else:
            self._open.move_to_end(shard_path)
        if name not in f:
            raise ValueError(f"tensor {name!r} is listed in index {self._index_path} under shard "
                             f"{os.path.basename(shard_path)!r} but is absent from {shard_path}")
        return f

    @property
    def open_shards(self) -> tuple[str, ...]:
        """Paths of the shards currently mapped, least recently used first."""
        return tuple(self._open)

    def keys(self) -> list[str]:
        """All tensor names (index or header order)."""
        return list(self._weight_map)

    def __contains__(self, name) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``."""
        return self._file_for(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        """NumPy dtype of tensor ``name``."""
        return self._file_for(name).dtype(name)

    def get(self, name: str) -> np.memmap:
        """Tensor ``name`` as a read-only memmap view (no copy)."""
        return self._file_for(name).get(name)

    def close(self) -> None:
        """Unmap every open shard (arrays already returned stay valid)."""
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _append_file(dst_fd: int, src_path: str, nbytes: int) -> None:
    """Append the first ``nbytes`` of ``src_path`` to ``dst_fd`` at its current offset, in bounded memory."""
    src_fd = os.open(src_path, os.O_RDONLY)
    try:
        copied = 0
        if _copy_file_range is not None:
            try:
                while copied < nbytes:
                    n = _copy_file_range(src_fd, dst_fd, min(nbytes - copied, 2**30))
                    if n == 0:
                        break
                    copied += n
            except OSError:  # e.g. EXDEV/ENOSYS/EINVAL on some filesystems: finish in user space
                os.lseek(src_fd, copied, os.SEEK_SET)
        while copied < nbytes:
            chunk = os.read(src_fd, min(_COPY_CHUNK, nbytes - copied))
            if not chunk:
                raise ValueError(f"temporary shard data {src_path} ended after {copied} of {nbytes} bytes")
            _write_all(dst_fd, chunk)
            copied += len(chunk)
    finally:
        os.close(src_fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class CheckpointWriter:
    """Streams tensors into a (sharded) safetensors checkpoint directory, published atomically on close()."""

    def __init__(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
                 metadata: Optional[Mapping[str, str]] = None, overwrite: bool = False):
        if not _is_int(max_shard_bytes) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        metadata = {"format": "pt"} if metadata is None else dict(metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"metadata must map str to str, got {metadata!r}")
        self.path = os.fspath(path)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata
        self.overwrite = overwrite
        if not overwrite:
            self._check_no_existing()
        os.makedirs(self.path, exist_ok=True)
        self._token = uuid.uuid4().hex[:12]
        self._names: set[str] = set()
        self._shards: list[tuple[str, dict[str, dict]]] = []  # finished (temp path, header entries)
        self._temps: list[str] = []  # every temporary path created, for cleanup
        self._data_fd: Optional[int] = None
        self._data_path = ""
        self._entries: dict[str, dict] = {}
        self._shard_bytes = 0
        self._total_bytes = 0
        self._done = False

    def _check_no_existing(self) -> None:
        for name in (SINGLE_FILE_NAME, INDEX_FILE_NAME):
            existing = os.path.join(self.path, name)
            if os.path.exists(existing):
                raise FileExistsError(f"{existing} already exists; pass overwrite=True to replace that checkpoint")

    def _temp(self, suffix: str) -> str:
        path = os.path.join(self.path, f".tmp-{self._token}-{suffix}")
        self._temps.append(path)
        return path

    def add(self, name: str, array) -> None:
        """Write tensor ``name`` (NumPy, ml_dtypes or JAX array) to the current shard; nothing is kept in memory."""
        if self._done:
            raise ValueError(f"checkpoint writer for {self.path} is already closed")
        if not isinstance(name, str) or not name or name == _METADATA_KEY:
            raise ValueError(f"tensor name must be a non-empty str other than {_METADATA_KEY!r}, got {name!r}")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already added to checkpoint {self.path}")
        array = np.asarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        code = _safetensors_code(array.dtype)
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} is not supported by safetensors; expected one "
                             f"of {[str(d) for d in _DTYPES.values()]}")
        nbytes = array.nbytes
        if self._entries and self._shard_bytes + nbytes > self.max_shard_bytes:
            self._finish_shard()
        if self._data_fd is None:
            self._data_path = self._temp(f"{len(self._shards):05d}.data")
            self._data_fd = os.open(self._data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if nbytes:
            _write_all(self._data_fd, np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self._entries[name] = {"dtype": code, "shape": list(array.shape),
                               "data_offsets": [self._shard_bytes, self._shard_bytes + nbytes]}
        self._names.add(name)
        self._shard_bytes += nbytes
        self._total_bytes += nbytes

    def _finish_shard(self) -> None:
        """Write header + buffered data of the current shard to a temporary .safetensors file."""
        header = {_METADATA_KEY: self.metadata} if self.metadata else {}
        header.update(self._entries)
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        shard_path = self._temp(f"{len(self._shards):05d}.safetensors")
        fd = os.open(shard_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, struct.pack("<Q", len(raw)) + raw)
            if self._data_fd is not None:
                os.close(self._data_fd)
                self._data_fd = None
                _append_file(fd, self._data_path, self._shard_bytes)
                _remove_quietly(self._data_path)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._shards.append((shard_path, self._entries))
        self._entries = {}
        self._shard_bytes = 0

    def _old_files(self) -> list[str]:
        """Paths of the checkpoint already in the directory: its index and single file first, then its shards."""
        single = os.path.join(self.path, SINGLE_FILE_NAME)
        index = os.path.join(self.path, INDEX_FILE_NAME)
        old = [p for p in (index, single) if os.path.exists(p)]
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh).get("weight_map", {})
                shards = set(weight_map.values())
            except (ValueError, AttributeError, TypeError):
                shards = set()  # unreadable old index: nothing more we can safely remove
            for shard in sorted(s for s in shards if isinstance(s, str)):
                if os.path.basename(shard) == shard:  # never follow an index outside the directory
                    old.append(os.path.join(self.path, shard))
        return old

    def close(self) -> None:
        """Finish the last shard, then rename shards and index into place (index last)."""
        if self._done:
            return
        try:
            if self._entries or not self._shards:
                self._finish_shard()
            if not self.overwrite:
                self._check_no_existing()
            n = len(self._shards)
            if n == 1:
                final_names = [SINGLE_FILE_NAME]
            else:
                final_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            index_tmp = None
            if n > 1:
                weight_map = {name: final for (_, entries), final in zip(self._shards, final_names)
                              for name in entries}
                index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
                index_tmp = self._temp("index.json")
                with open(index_tmp, "w", encoding="utf-8") as fh:
                    json.dump(index, fh, indent=2)
                    fh.write("\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            # Old index/single file go first so the directory never looks complete with mixed shards.
            for old in self._old_files() if self.overwrite else []:
                _remove_quietly(old)
            renames = [(tmp, os.path.join(self.path, final)) for (tmp, _), final in zip(self._shards, final_names)]
            if index_tmp is not None:
                renames.append((index_tmp, os.path.join(self.path, INDEX_FILE_NAME)))
            for tmp, final in renames:
                os.replace(tmp, final)
            self._fsync_dir()
            self._temps.clear()
        except BaseException:
            self.abort()
            raise
        self._done = True

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Discard everything written so far; an existing checkpoint in the directory is left untouched."""
        if self._data_fd is not None:
            os.close(self._data_fd)
            self._data_fd = None
        for tmp in self._temps:
            _remove_quietly(tmp)
        self._temps.clear()
        self._done = True

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


__all__ = ["SafetensorsFile", "CheckpointReader", "CheckpointWriter", "SINGLE_FILE_NAME", "INDEX_FILE_NAME"]
