"""ModelConfig: every architecture field of DeepSeek-V3 (paper §2, §4.2; reference §1), named presets and the
mapping to and from Hugging Face ``config.json``.

Field names follow the Hugging Face config keys where one exists, so a researcher can read a released
``config.json`` next to this file. Presets are plain instances; variants are ``dataclasses.replace(cfg, ...)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax")
ROPE_TYPES = ("default", "yarn")
ATTENTIONS = ("mla", "mha", "gqa")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """DeepSeek-V3 architecture; the defaults are the released 671B model."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU of the first k layers
    moe_intermediate_size: int = 2048  # one routed or shared expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3  # layers [0, k) are dense, the rest MoE
    num_attention_heads: int = 128
    # Multi-head latent attention (paper §2.1.1). q_lora_rank 0 means no query compression (V2-Lite).
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # The attention of every block: "mla" (the paper's), or for ablations standard multi-head ("mha") or
    # grouped-query ("gqa") attention with RoPE on the whole head (dsv3_jax/model/attention.py), which use
    # num_key_value_heads (gqa: divides num_attention_heads; mha: the heads) and head_dim (default
    # qk_nope_head_dim + qk_rope_head_dim, MLA's query/key width) instead of the MLA sizes above.
    attention: str = "mla"
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    # DeepSeekMoE (paper §2.1.2).
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8  # expert groups (= nodes in training); 1 disables group-limited routing
    topk_group: int = 4  # groups a token may reach
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    expert_bias: bool = True  # aux-loss-free bias terms (HF topk_method "noaux_tc")
    norm_topk_prob: bool = True  # renormalise the K selected affinities
    # Multi-token prediction (paper §2.2): number of sequential MTP modules D.
    num_mtp_layers: int = 1
    rms_norm_eps: float = 1e-6
    # RoPE on the decoupled key/query, with optional YaRN extension (paper §4.3; reference §3.4).
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_type: str = "yarn"  # "default" or "yarn"
    rope_factor: float = 40.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float | None = 1.0  # None when config.json omits it (changes the cos/sin factor)
    rope_mscale_all_dim: float | None = 1.0  # drives the mscale^2 softmax factor
    rope_attention_factor: float | None = None  # explicit cos/sin factor; None derives it as HF does
    rope_truncate: bool = True  # floor/ceil the YaRN correction range
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006  # paper §4.2 (config.json's 0.02 is HF's default)
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    # ----- derived sizes -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads of MHA/GQA (num_key_value_heads, or num_attention_heads when unset)."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        """Per-head query/key (and MHA/GQA value) width: head_dim, or qk_nope_head_dim + qk_rope_head_dim."""
        return self.head_dim or self.qk_head_dim

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates: MLA's decoupled qk_rope_head_dim, or the whole head for MHA/GQA."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.attn_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def mtp_layer_is_moe(self) -> bool:
        """MTP blocks sit at layer index num_hidden_layers + k, so they are MoE layers like HF's index rule."""
        return self.num_hidden_layers >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def uses_yarn(self) -> bool:
        return self.rope_type == "yarn"

    def replace(self, **changes: Any) -> "ModelConfig":
        """dataclasses.replace, then validate."""
        return dataclasses.replace(self, **changes).validate()

    # ----- validation -----
    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the field for every impossible combination; return self."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        non_negative = ("q_lora_rank", "first_k_dense_replace", "num_mtp_layers", "n_shared_experts",
                        "n_routed_experts", "intermediate_size", "moe_intermediate_size", "num_experts_per_tok",
                        "n_group", "topk_group", "rope_original_max_position_embeddings")
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"ModelConfig.first_k_dense_replace ({self.first_k_dense_replace}) exceeds "
                             f"num_hidden_layers ({self.num_hidden_layers})")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise ValueError("ModelConfig.intermediate_size must be positive when first_k_dense_replace > 0")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelConfig.qk_rope_head_dim must be even (RoPE rotates pairs), "
                             f"got {self.qk_rope_head_dim}")
        for name in ("rms_norm_eps", "routed_scaling_factor", "initializer_range", "rope_factor",
                     "rope_beta_fast", "rope_beta_slow"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ModelConfig.{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise ValueError(f"ModelConfig.rope_theta must be a finite number > 1, got {self.rope_theta!r}")
        self._validate_attention()
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"ModelConfig.scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        has_moe = self.num_moe_layers > 0 or self.num_mtp_layers > 0
        if has_moe:
            self._validate_moe()
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"ModelConfig.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.uses_yarn:
            if not self.rope_factor >= 1.0:
                raise ValueError(f"ModelConfig.rope_factor must be >= 1 for YaRN, got {self.rope_factor}")
            if self.rope_original_max_position_embeddings <= 0:
                raise ValueError("ModelConfig.rope_original_max_position_embeddings must be positive, got "
                                 f"{self.rope_original_max_position_embeddings}")
            if not self.rope_beta_fast > self.rope_beta_slow > 0:
                raise ValueError(f"ModelConfig.rope_beta_fast ({self.rope_beta_fast}) must exceed "
                                 f"rope_beta_slow ({self.rope_beta_slow}) > 0")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"ModelConfig.{name} ({value}) is outside the vocabulary [0, {self.vocab_size})")
        return self

    def _validate_attention(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"ModelConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.attention == "mla":
                raise ValueError(f"ModelConfig.{name} applies to attention='mha' or 'gqa' only (MLA's sizes are "
                                 f"kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim), got {value!r}")
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer or None, got {value!r}")
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if self.attention == "mha" and kv is not None and kv != h:
            raise ValueError(f"ModelConfig.num_key_value_heads ({kv}) must equal num_attention_heads ({h}) for "
                             "attention='mha'; use attention='gqa' for fewer key/value heads")
        if self.attention == "gqa":
            if kv is None:
                raise ValueError("ModelConfig.num_key_value_heads must be set for attention='gqa'")
            if h % kv:
                raise ValueError(f"ModelConfig.num_key_value_heads ({kv}) must divide num_attention_heads ({h})")
        if self.attention != "mla" and self.attn_head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even (RoPE rotates pairs of the whole head), got "
                             f"{self.attn_head_dim}")

    def _validate_moe(self) -> None:
        e = self.n_routed_experts
        if e <= 0:
            raise ValueError("ModelConfig.n_routed_experts must be positive when the model has MoE layers "
                             f"(first_k_dense_replace={self.first_k_dense_replace} < num_hidden_layers="
                             f"{self.num_hidden_layers}, or num_mtp_layers={self.num_mtp_layers} > 0)")
        if self.moe_intermediate_size <= 0:
            raise ValueError("ModelConfig.moe_intermediate_size must be positive when the model has MoE layers")
        if not 0 < self.num_experts_per_tok <= e:
            raise ValueError(f"ModelConfig.num_experts_per_tok must be in [1, n_routed_experts={e}], "
                             f"got {self.num_experts_per_tok}")
        if self.n_group <= 0 or e % self.n_group:
            raise ValueError(f"ModelConfig.n_group ({self.n_group}) must be positive and divide "
                             f"n_routed_experts ({e})")
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"ModelConfig.topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        per_group = e // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts "
                             f"reachable in topk_group={self.topk_group} groups of {per_group}")
        if self.n_group > 1 and self.expert_bias and per_group < 2:
            raise ValueError(f"ModelConfig.n_group ({self.n_group}) leaves {per_group} expert per group; the "
                             "top-2-sum group score of biased routing needs at least 2")

    # ----- Hugging Face config.json -----
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (released ``rope_scaling`` or transformers>=5
        ``rope_parameters``); raises ValueError for architectures this model does not implement."""
        return _from_hf(cls, hf)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict (released key names, ``rope_scaling`` form) that transformers and from_hf read."""
        return _to_hf(self)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a config.json file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_hf(data)


def _from_hf(cls: type[ModelConfig], hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"config.json model_type {model_type!r} is not supported (deepseek_v3 or deepseek_v2)")
    v3 = model_type == "deepseek_v3"
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act {act!r} is not supported (DeepSeek uses 'silu')")
    if hf.get("attention_bias", False):
        raise ValueError("config.json attention_bias=true is not supported (DeepSeek projections have no bias)")
    if hf.get("rope_interleave", True) is False:
        raise ValueError("config.json rope_interleave=false is not supported: DeepSeek checkpoints store the RoPE "
                         "rows of q_b_proj and kv_a_proj_with_mqa as interleaved pairs")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"config.json moe_layer_freq {hf['moe_layer_freq']} is not supported (must be 1)")
    topk_method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
    if topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ValueError(f"config.json topk_method {topk_method!r} is not supported")
    scoring = hf.get("scoring_func", "sigmoid" if v3 else "softmax")

    def req(key: str) -> Any:
        if key not in hf:
            raise ValueError(f"config.json lacks the required key {key!r}")
        return hf[key]

    rope = _rope_from_hf(hf)
    attention = _attention_from_hf(hf)
    n_group = hf.get("n_group") or 1
    kwargs = dict(
        vocab_size=req("vocab_size"), hidden_size=req("hidden_size"),
        intermediate_size=req("intermediate_size"), moe_intermediate_size=hf.get("moe_intermediate_size", 0),
        num_hidden_layers=req("num_hidden_layers"), first_k_dense_replace=hf.get("first_k_dense_replace", 0),
        num_attention_heads=req("num_attention_heads"), q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=req("kv_lora_rank"), qk_nope_head_dim=req("qk_nope_head_dim"),
        qk_rope_head_dim=req("qk_rope_head_dim"), v_head_dim=req("v_head_dim"),
        n_routed_experts=hf.get("n_routed_experts") or 0, n_shared_experts=hf.get("n_shared_experts") or 0,
        num_experts_per_tok=hf.get("num_experts_per_tok") or 1, n_group=n_group,
        topk_group=hf.get("topk_group") or n_group,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5 if v3 else 1.0)), scoring_func=scoring,
        expert_bias=topk_method == "noaux_tc", norm_topk_prob=bool(hf.get("norm_topk_prob", v3)),
        num_mtp_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=req("max_position_embeddings"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=0.006, bos_token_id=_token_id(hf, "bos_token_id"),
        eos_token_id=_token_id(hf, "eos_token_id"), **rope, **attention,
    )
    return cls(**kwargs).validate()


def _attention_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The attention fields: this project's "attention" key (absent in released configs, which are MLA, whose
    num_key_value_heads is metadata); for MHA/GQA also num_key_value_heads and head_dim."""
    attention = hf.get("attention", "mla")
    if attention == "mla":
        return {}
    kv = hf.get("num_key_value_heads")
    if attention == "mha" and kv == hf.get("num_attention_heads"):
        kv = None  # the config's default form
    return dict(attention=attention, num_key_value_heads=kv, head_dim=hf.get("head_dim"))


def _token_id(hf: dict[str, Any], key: str) -> int | None:
    """A special-token id of config.json (the first of a list); one outside the vocabulary is metadata the
    architecture does not depend on, so it is dropped with a warning rather than refusing the checkpoint."""
    value = hf.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    vocab = hf.get("vocab_size")
    if value is not None and isinstance(vocab, int) and not 0 <= value < vocab:
        warnings.warn(f"config.json {key} {value} is outside the vocabulary [0, {vocab}); ignoring it")
        return None
    return value


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters")
    if params is None:
        params = hf.get("rope_scaling")
    params = dict(params or {})
    if params and any(isinstance(v, dict) for v in params.values()):
        raise ValueError("config.json per-layer-type rope_parameters are not supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json rope type {rope_type!r} is not supported (default or yarn)")
    out: dict[str, Any] = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type == "yarn":
        orig = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        if orig is None:
            raise ValueError("config.json YaRN rope parameters lack original_max_position_embeddings (and there is "
                             "no max_position_embeddings to default it to)")
        factor = params.get("factor")
        if factor is None:  # transformers derives it from the two lengths
            if "max_position_embeddings" not in hf:
                raise ValueError("config.json YaRN rope parameters lack 'factor' and there is no "
                                 "max_position_embeddings to derive it from")
            factor = hf["max_position_embeddings"] / orig
        out.update(
            rope_factor=float(factor), rope_original_max_position_embeddings=int(orig),
            rope_beta_fast=float(params.get("beta_fast") or 32.0), rope_beta_slow=float(params.get("beta_slow") or 1.0),
            rope_mscale=_opt_float(params.get("mscale")), rope_mscale_all_dim=_opt_float(params.get("mscale_all_dim")),
            rope_attention_factor=_opt_float(params.get("attention_factor")),
            rope_truncate=bool(params.get("truncate", True)),
        )
    return out


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    v3 = cfg.scoring_func == "sigmoid" and cfg.expert_bias  # transformers' DeepseekV3 routes only this way
    hf: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "first_k_dense_replace": cfg.first_k_dense_replace, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor, "scoring_func": cfg.scoring_func,
        "topk_method": "noaux_tc" if cfg.expert_bias else ("group_limited_greedy" if cfg.n_group > 1 else "greedy"),
        "norm_topk_prob": cfg.norm_topk_prob, "num_nextn_predict_layers": cfg.num_mtp_layers,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta, "rope_interleave": True, "hidden_act": "silu", "attention_bias": False,
        "moe_layer_freq": 1, "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }
    if cfg.attention != "mla":  # not a released layout: hf.save_pretrained refuses it, the training meta keeps it
        hf.update(attention=cfg.attention, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim)
    if cfg.uses_yarn:
        scaling: dict[str, Any] = {
            "type": "yarn", "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
            "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow, "truncate": cfg.rope_truncate,
        }
        for key, value in (("mscale", cfg.rope_mscale), ("mscale_all_dim", cfg.rope_mscale_all_dim),
                           ("attention_factor", cfg.rope_attention_factor)):
            if value is not None:
                scaling[key] = value
        hf["rope_scaling"] = scaling
    else:
        hf["rope_scaling"] = None
    return hf


# ----- presets -----

DEEPSEEK_V3 = ModelConfig()

DEEPSEEK_V2_LITE = ModelConfig(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=0,
    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
    routed_scaling_factor=1.0, scoring_func="softmax", expert_bias=False, norm_topk_prob=False,
    num_mtp_layers=0, rope_mscale=0.707, rope_mscale_all_dim=0.707, bos_token_id=100000, eos_token_id=100001,
)

SMALL = ModelConfig(
    vocab_size=4096, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=6,
    first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, num_mtp_layers=1,
    max_position_embeddings=2048, rope_theta=10000.0, rope_type="default",
)

TINY = ModelConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, num_mtp_layers=1,
    max_position_embeddings=512, rope_type="default",
)

PRESETS: dict[str, ModelConfig] = {
    "deepseek-v3": DEEPSEEK_V3,
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
    "small": SMALL,
    "tiny": TINY,
}


def get_preset(name: str) -> ModelConfig:
    """The named preset; ValueError lists the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _parse_field_value(name: str, annotation: str, text: str) -> Any:
    """`text` as the type of ModelConfig field `name` (annotation as written: int, float, bool, str, X | None)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if "None" in kinds and text.strip().lower() in ("none", "null"):
        return None
    kind = next(k for k in kinds if k != "None")
    try:
        if kind == "bool":
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            return lowered in ("true", "1")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        return text
    except ValueError:
        raise ValueError(f"--set {name}={text}: expected {annotation}") from None


def apply_overrides(cfg: ModelConfig, items: list[str] | tuple[str, ...]) -> ModelConfig:
    """`cfg` with KEY=VALUE overrides of its fields (values parsed as the field's type), validated; ValueError naming
    an unknown field, a malformed item or a bad value."""
    from dsv3_jax.options import key_values

    fields = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig)}
    changes: dict[str, Any] = {}
    for key, text in key_values(items, "--set").items():
        if key not in fields:
            raise ValueError(f"--set {key}: ModelConfig has no field {key!r}")
        changes[key] = _parse_field_value(key, fields[key], text)
    try:
        return cfg.replace(**changes)
    except ValueError as e:
        raise ValueError(f"--set {' '.join(items)}: {e}") from None
