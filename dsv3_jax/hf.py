"""Hugging Face checkpoint interop: `from_pretrained` / `save_pretrained` in the released DeepSeek-V3 format
(reference §2.1): config.json plus model.safetensors or shards listed by model.safetensors.index.json.

The one table `_block_entries` maps every parameter of a block to its checkpoint name with the layout change
(our weights are [in, ..., out]; the checkpoint's are torch Linear [out, in]). Stacked layers map to
model.layers.{i}; the MTP modules to model.layers.{num_hidden_layers + k}. FP8 tensors (float8_e4m3fn with a
`weight_scale_inv` per 128x128 block) are dequantized on load. Reading is tensor by tensor from memory-mapped
files: peak host memory is one parameter array beyond the model itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import weight_dequant_np
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.precision import Precision
from dsv3_jax.safetensors_io import CheckpointReader, CheckpointWriter

Transform = Callable[[np.ndarray], np.ndarray]
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)
_FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))  # recomputed from the config, never stored as parameters


def _t(a: np.ndarray) -> np.ndarray:
    return a.T


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One parameter: its path in the model state, checkpoint name template and layout maps."""

    path: tuple[str, ...]  # inside the block (or top level)
    name: str  # checkpoint name, "{p}" = layer prefix, "{e}" = expert index
    to_ours: Transform
    to_hf: Transform
    per_expert: bool = False


def _heads_in(out_last: int) -> tuple[Transform, Transform]:
    """[H*X, In] <-> [In, H, X]."""

    def to_ours(a):
        return a.reshape(-1, out_last, a.shape[-1]).transpose(2, 0, 1)

    def to_hf(a):
        return a.transpose(1, 2, 0).reshape(-1, a.shape[0])

    return to_ours, to_hf


def _heads_out(cfg: ModelConfig) -> tuple[Transform, Transform]:
    """o_proj [D, H*V] <-> [H, V, D]."""
    h, v = cfg.num_attention_heads, cfg.v_head_dim

    def to_ours(a):
        return a.reshape(a.shape[0], h, v).transpose(1, 2, 0)

    def to_hf(a):
        return a.transpose(2, 0, 1).reshape(a.shape[2], -1)

    return to_ours, to_hf


def _block_entries(cfg: ModelConfig, moe: bool) -> list[_Entry]:
    ident = (lambda a: a, lambda a: a)
    lin = (_t, _t)
    e = [
        _Entry(("attn_norm", "weight"), "{p}.input_layernorm.weight", *ident),
        _Entry(("ffn_norm", "weight"), "{p}.post_attention_layernorm.weight", *ident),
        _Entry(("attn", "wkv_a"), "{p}.self_attn.kv_a_proj_with_mqa.weight", *lin),
        _Entry(("attn", "kv_norm"), "{p}.self_attn.kv_a_layernorm.weight", *ident),
        _Entry(("attn", "wkv_b"), "{p}.self_attn.kv_b_proj.weight",
               *_heads_in(cfg.qk_nope_head_dim + cfg.v_head_dim)),
        _Entry(("attn", "wo"), "{p}.self_attn.o_proj.weight", *_heads_out(cfg)),
    ]
    if cfg.q_lora_rank:
        e += [
            _Entry(("attn", "wq_a"), "{p}.self_attn.q_a_proj.weight", *lin),
            _Entry(("attn", "q_norm"), "{p}.self_attn.q_a_layernorm.weight", *ident),
            _Entry(("attn", "wq_b"), "{p}.self_attn.q_b_proj.weight", *_heads_in(cfg.qk_head_dim)),
        ]
    else:
        e.append(_Entry(("attn", "wq"), "{p}.self_attn.q_proj.weight", *_heads_in(cfg.qk_head_dim)))
    if not moe:
        return e + [
            _Entry(("ffn", "w_gate"), "{p}.mlp.gate_proj.weight", *lin),
            _Entry(("ffn", "w_up"), "{p}.mlp.up_proj.weight", *lin),
            _Entry(("ffn", "w_down"), "{p}.mlp.down_proj.weight", *lin),
        ]
    e += [
        _Entry(("ffn", "router"), "{p}.mlp.gate.weight", *lin),
        _Entry(("ffn", "w_gate"), "{p}.mlp.experts.{e}.gate_proj.weight", *lin, per_expert=True),
        _Entry(("ffn", "w_up"), "{p}.mlp.experts.{e}.up_proj.weight", *lin, per_expert=True),
        _Entry(("ffn", "w_down"), "{p}.mlp.experts.{e}.down_proj.weight", *lin, per_expert=True),
    ]
    if cfg.expert_bias:
        e.append(_Entry(("ffn", "expert_bias"), "{p}.mlp.gate.e_score_correction_bias", *ident))
    if cfg.n_shared_experts:
        e += [
            _Entry(("ffn", "shared", "w_gate"), "{p}.mlp.shared_experts.gate_proj.weight", *lin),
            _Entry(("ffn", "shared", "w_up"), "{p}.mlp.shared_experts.up_proj.weight", *lin),
            _Entry(("ffn", "shared", "w_down"), "{p}.mlp.shared_experts.down_proj.weight", *lin),
        ]
    return e


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one checkpoint tensor goes: model-state path, index into the stacked array, layout maps."""

    name: str
    path: tuple[str, ...]
    index: tuple[int, ...]
    to_ours: Transform
    to_hf: Transform


def checkpoint_slots(cfg: ModelConfig) -> Iterator[_Slot]:
    """Every checkpoint tensor of a model with this config (the MTP copies of embedding and head excluded)."""
    ident = (lambda a: a, lambda a: a)
    yield _Slot("model.embed_tokens.weight", ("embed",), (), *ident)
    yield _Slot("model.norm.weight", ("norm", "weight"), (), *ident)
    if not cfg.tie_word_embeddings:
        yield _Slot("lm_head.weight", ("head",), (), _t, _t)
    stacks = [("dense_layers", 0, cfg.num_dense_layers, False),
              ("moe_layers", cfg.first_k_dense_replace, cfg.num_moe_layers, True)]
    for stack, first, count, moe in stacks:
        for i in range(count):
            yield from _layer_slots(cfg, _block_entries(cfg, moe), (stack,), i, f"model.layers.{first + i}")
    for k in range(cfg.num_mtp_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        yield _Slot(f"{prefix}.enorm.weight", ("mtp", "enorm", "weight"), (k,), *ident)
        yield _Slot(f"{prefix}.hnorm.weight", ("mtp", "hnorm", "weight"), (k,), *ident)
        yield _Slot(f"{prefix}.eh_proj.weight", ("mtp", "eh_proj"), (k,), _t, _t)
        yield _Slot(f"{prefix}.shared_head.norm.weight", ("mtp", "head_norm", "weight"), (k,), *ident)
        entries = _block_entries(cfg, cfg.mtp_layer_is_moe)
        yield from _layer_slots(cfg, entries, ("mtp", "block"), k, prefix)


def _layer_slots(cfg, entries, stack_path, i, prefix) -> Iterator[_Slot]:
    for ent in entries:
        path = stack_path + ent.path
        if ent.per_expert:
            for x in range(cfg.n_routed_experts):
                yield _Slot(ent.name.format(p=prefix, e=x), path, (i, x), ent.to_ours, ent.to_hf)
        else:
            yield _Slot(ent.name.format(p=prefix), path, (i,), ent.to_ours, ent.to_hf)


def _mtp_copies(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(MTP copy name, main tensor name) pairs: the released format repeats embedding and head per MTP layer."""
    out = []
    for k in range(cfg.num_mtp_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        out.append((f"{prefix}.embed_tokens.weight", "model.embed_tokens.weight"))
        out.append((f"{prefix}.shared_head.head.weight",
                    "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# loading


def _expected_hf_shape(slot: _Slot, our_slice_shape: tuple[int, ...]) -> tuple[int, ...]:
    return slot.to_hf(np.broadcast_to(np.zeros((), np.float32), our_slice_shape)).shape


def _read_tensor(reader: _ExpertView, name: str, used: set[str], dtype) -> np.ndarray:
    """One checkpoint tensor as a NumPy array of `dtype`, FP8 blocks dequantized with weight_scale_inv."""
    raw = reader.get(name)
    used.add(name)
    if raw.dtype in _FP8_DTYPES:
        scale_name = name + "_scale_inv"
        if scale_name not in reader:
            raise ValueError(f"tensor {name} is {raw.dtype} but its block scale {scale_name} is missing")
        used.add(scale_name)
        if raw.ndim != 2:
            raise ValueError(f"tensor {name} is {raw.dtype} with shape {list(raw.shape)}; FP8 weights must be 2-D")
        try:
            return weight_dequant_np(raw, np.asarray(reader.get(scale_name)), dtype=np.float32).astype(dtype)
        except ValueError as e:
            raise ValueError(f"tensor {name}: {e}") from None
    return np.asarray(raw).astype(dtype)


class _ExpertView:
    """The checkpoint with transformers' fused in-memory expert tensors (as written by saving a model's
    state_dict directly) presented under the released per-expert names:
    `mlp.experts.gate_up_proj` [E, 2F, D] -> experts.{e}.gate_proj / up_proj, `mlp.experts.down_proj` [E, D, F]
    -> experts.{e}.down_proj."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.virtual: dict[str, tuple[str, int, slice]] = {}
        for name in reader.keys():
            if name.endswith(".mlp.experts.gate_up_proj"):
                e, two_f, _ = reader.shape(name)
                base = name[: -len("gate_up_proj")]
                for x in range(e):
                    self.virtual[f"{base}{x}.gate_proj.weight"] = (name, x, slice(0, two_f // 2))
                    self.virtual[f"{base}{x}.up_proj.weight"] = (name, x, slice(two_f // 2, two_f))
            elif name.endswith(".mlp.experts.down_proj"):
                base = name[: -len("down_proj")]
                for x in range(reader.shape(name)[0]):
                    self.virtual[f"{base}{x}.down_proj.weight"] = (name, x, slice(None))
        fused = {src for src, _, _ in self.virtual.values()}
        self._keys = [k for k in reader.keys() if k not in fused] + list(self.virtual)

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, name: str) -> bool:
        return name in self.virtual or name in self.reader

    def shape(self, name: str) -> tuple[int, ...]:
        return self.get(name).shape if name in self.virtual else self.reader.shape(name)

    def get(self, name: str) -> np.ndarray:
        if name in self.virtual:
            src, x, rows = self.virtual[name]
            return self.reader.get(src)[x, rows]
        return self.reader.get(name)


def _mtp_present(reader: _ExpertView, cfg: ModelConfig) -> bool:
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    return any(k.startswith(prefix) for k in reader.keys())


def from_pretrained(path: str | os.PathLike, dtype=jnp.float32, precision: Precision | None = None) -> Transformer:
    """Load a released-format checkpoint directory; returns the model (`m.config`, `m(tokens)` -> logits).

    The MTP layer (model.layers.{num_hidden_layers}) is loaded into the MTP modules when the checkpoint has it;
    a checkpoint without it (transformers drops it on save) loads with num_mtp_layers=0 and a warning.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    cfg = ModelConfig.from_json_file(cfg_path)
    _check_released_attention(cfg, cfg_path)
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    _check_quantization(hf_cfg.get("quantization_config"), cfg_path)
    precision = precision or Precision.uniform(dtype)
    with CheckpointReader(path) as file_reader:
        reader = _ExpertView(file_reader)
        if cfg.num_mtp_layers and not _mtp_present(reader, cfg):
            warnings.warn(f"{path}: config.json declares {cfg.num_mtp_layers} MTP layer(s) but the checkpoint has no "
                          f"model.layers.{cfg.num_hidden_layers}.* tensors; loading without MTP modules")
            cfg = dataclasses.replace(cfg, num_mtp_layers=0)
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), precision))
        graphdef, state = nnx.split(abstract)
        flat = dict(nnx.to_flat_state(state))
        slots_by_path: dict[tuple[str, ...], list[_Slot]] = {}
        for slot in checkpoint_slots(cfg):
            slots_by_path.setdefault(slot.path, []).append(slot)
        used: set[str] = set()
        for path_key, var in flat.items():
            slots = slots_by_path.pop(path_key, None)
            if slots is None:
                raise RuntimeError(f"internal: model parameter {'.'.join(path_key)} has no checkpoint mapping")
            var.set_value(jnp.asarray(_fill(reader, slots, var.get_value(), used)))
        if slots_by_path:
            raise RuntimeError(f"internal: checkpoint mapping for unknown parameters {list(slots_by_path)}")
        _check_copies(reader, cfg, used)
        unexpected = [k for k in reader.keys() if k not in used and not k.endswith(_DERIVED_SUFFIXES)]
        if unexpected:
            shown = ", ".join(sorted(unexpected)[:8])
            more = f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else ""
            raise ValueError(f"{path}: unexpected tensor(s) not used by a model with this config.json: {shown}{more}")
        return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _fill(reader: _ExpertView, slots: list[_Slot], abstract: jax.ShapeDtypeStruct, used: set[str]) -> np.ndarray:
    np_dtype = np.dtype(abstract.dtype)
    out = np.empty(abstract.shape, np_dtype)
    for slot in slots:
        slice_shape = out[slot.index].shape
        expected = _expected_hf_shape(slot, slice_shape)
        if slot.name not in reader:
            raise ValueError(f"missing tensor {slot.name} (expected shape {list(expected)})")
        got = reader.shape(slot.name)
        if tuple(got) != tuple(expected):
            raise ValueError(f"tensor {slot.name} has shape {list(got)}, expected {list(expected)}")
        out[slot.index] = slot.to_ours(_read_tensor(reader, slot.name, used, np_dtype))
    return out


def _check_copies(reader: _ExpertView, cfg: ModelConfig, used: set[str]) -> None:
    """The MTP layers' embed/head copies must equal the shared tensors (the model keeps one of each)."""
    for copy_name, main_name in _mtp_copies(cfg):
        if copy_name not in reader:
            continue
        a = _read_tensor(reader, copy_name, used, np.float32)
        b = _read_tensor(reader, main_name, set(), np.float32)
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ValueError(f"tensor {copy_name} differs from {main_name}; DeepSeek-V3's MTP modules share the "
                             "embedding and output head, so the checkpoint's copies must be identical")


def _check_released_attention(cfg: ModelConfig, where: str) -> None:
    """The released layout exists for MLA only; an MHA/GQA ablation model has none to read or write."""
    if cfg.attention != "mla":
        raise ValueError(f"{where}: attention={cfg.attention!r} has no released checkpoint layout (the DeepSeek "
                         "format stores MLA only); keep MHA/GQA models as training work directories")


def _check_quantization(qc, cfg_path: str) -> None:
    if not qc:
        return
    if qc.get("quant_method", "fp8") != "fp8" or qc.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{cfg_path}: quantization_config {qc} is not supported (fp8 e4m3 only)")
    if list(qc.get("weight_block_size", [128, 128])) != [128, 128]:
        raise ValueError(f"{cfg_path}: quantization_config.weight_block_size {qc['weight_block_size']} is not "
                         "supported (128x128 only)")


# ----------------------------------------------------------------------------------------------------------------
# saving


def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
                    overwrite: bool = False) -> None:
    """Write config.json and safetensors (sharded past max_shard_bytes) in the released layout, tensor by tensor,
    in the parameters' own dtype; from_pretrained reads it back exactly."""
    path = os.fspath(path)
    cfg = model.config
    _check_released_attention(cfg, "the model's config")
    os.makedirs(path, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path) and not overwrite:
        raise FileExistsError(f"{cfg_path} exists; pass overwrite=True to replace the checkpoint")
    dtype_name = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        str(model.precision.param_dtype), str(model.precision.param_dtype))
    with CheckpointWriter(path, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        tensors: dict[str, np.ndarray] = {}
        for slot in checkpoint_slots(cfg):
            value = np.asarray(flat[slot.path].get_value()[slot.index])
            array = np.ascontiguousarray(slot.to_hf(value))
            writer.add(slot.name, array)
            if slot.name in ("model.embed_tokens.weight", "lm_head.weight"):
                tensors[slot.name] = array
        for copy_name, main_name in _mtp_copies(cfg):
            writer.add(copy_name, tensors[main_name])
    hf = cfg.to_hf() | {"torch_dtype": dtype_name}
    tmp = cfg_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(hf, f, indent=2)
    os.replace(tmp, cfg_path)
