"""Tests for dsv3_jax/config.py: presets against the released numbers (reference §1.2, §1.3), the config.json mapping
both ways (checked against transformers' DeepseekV3Config), and one test per impossible combination."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import pytest
import transformers
from flax import nnx

import dsv3_jax
from dsv3_jax import PRESETS, ModelConfig, get_preset
from dsv3_jax.config import DEEPSEEK_V2_LITE, DEEPSEEK_V3, TINY
from dsv3_jax.model import rope

# The released DeepSeek-V3 / R1 config.json, verbatim from reference §1.3.
RELEASED_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}

# Every field of the 671B model (reference §1.2 config_671B and §1.3), written out independently of config.py.
EXPECTED_V3 = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, attention="mla", num_key_value_heads=None, head_dim=None,
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
    topk_group=4, routed_scaling_factor=2.5, scoring_func="sigmoid", expert_bias=True, norm_topk_prob=True,
    num_mtp_layers=1, rms_norm_eps=1e-6, max_position_embeddings=163840, rope_theta=10000.0, rope_type="yarn",
    rope_factor=40.0, rope_original_max_position_embeddings=4096, rope_beta_fast=32.0, rope_beta_slow=1.0,
    rope_mscale=1.0, rope_mscale_all_dim=1.0, rope_attention_factor=None, rope_truncate=True,
    tie_word_embeddings=False, initializer_range=0.006, bos_token_id=0, eos_token_id=1,
)

# A DeepSeek-V2-Lite style config.json (reference §1.2 config_16B): no query compression, softmax, greedy top-k.
V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": None,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False,
    "topk_group": None, "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400,
}

# A YaRN config whose two mscales differ, so the cos/sin factor is not 1 (the case V3's own numbers hide).
YARN_UNEQUAL_MSCALE = dataclasses.replace(
    TINY, rope_type="yarn", rope_factor=4.0, rope_original_max_position_embeddings=128, rope_beta_fast=16.0,
    rope_beta_slow=2.0, rope_mscale=1.0, rope_mscale_all_dim=0.8, rope_truncate=False,
)


def _released() -> dict:
    return copy.deepcopy(RELEASED_V3_CONFIG)


def _rope_parameters_form(hf: dict) -> dict:
    """The transformers>=5 spelling: rope_theta and rope_type inside `rope_parameters`, no `rope_scaling`."""
    hf = copy.deepcopy(hf)
    scaling = hf.pop("rope_scaling")
    params = {k: v for k, v in scaling.items() if k != "type"}
    hf["rope_parameters"] = {**params, "rope_type": "yarn", "rope_theta": hf.pop("rope_theta")}
    return hf


def _invalid(base: ModelConfig = TINY, **changes) -> ModelConfig:
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------------------------------------------
# presets


def test_deepseek_v3_preset_is_the_released_671b_model():
    assert dataclasses.asdict(get_preset("deepseek-v3")) == EXPECTED_V3
    assert ModelConfig() == DEEPSEEK_V3  # the dataclass defaults are the released model


def test_deepseek_v3_preset_derived_sizes():
    cfg = get_preset("deepseek-v3")
    assert cfg.qk_head_dim == 192
    assert (cfg.num_dense_layers, cfg.num_moe_layers) == (3, 58)
    assert cfg.mtp_layer_is_moe and cfg.uses_yarn


def test_deepseek_v3_preset_matches_transformers_defaults():
    """transformers' DeepseekV3Config defaults are V3 (reference §1.3): an independent second source."""
    hf = transformers.DeepseekV3Config()
    cfg = get_preset("deepseek-v3")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group",
                "topk_group", "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "rms_norm_eps"):
        assert getattr(cfg, key) == getattr(hf, key), key
    assert cfg.qk_head_dim == hf.qk_head_dim


def test_small_preset():
    expected = dict(
        vocab_size=4096, hidden_size=512, num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8,
        q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        intermediate_size=1408, moe_intermediate_size=256, n_routed_experts=32, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        num_mtp_layers=1, max_position_embeddings=2048, rope_theta=10000.0, rope_type="default",
        scoring_func="sigmoid", expert_bias=True,
    )
    cfg = get_preset("small")
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert not cfg.uses_yarn


def test_deepseek_v2_lite_preset():
    cfg = get_preset("deepseek-v2-lite")
    assert cfg.q_lora_rank == 0
    assert (cfg.scoring_func, cfg.expert_bias) == ("softmax", False)
    assert (cfg.n_shared_experts, cfg.n_routed_experts, cfg.num_experts_per_tok) == (2, 64, 6)
    # the rest of config_16B (reference §1.1/§1.2)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size) == (
        102400, 2048, 10944, 1408)
    assert (cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.num_attention_heads) == (27, 1, 16)
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == (1, 1, 1.0)
    assert (cfg.rope_mscale, cfg.rope_mscale_all_dim) == (0.707, 0.707)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = get_preset(name)
    assert cfg.validate() is cfg
    assert PRESETS[name] is cfg


def test_get_preset_unknown_lists_the_known_names():
    with pytest.raises(ValueError, match="'nope'") as info:
        get_preset("nope")
    for name in PRESETS:
        assert name in str(info.value)


def test_replace_validates():
    assert TINY.replace(num_experts_per_tok=1).num_experts_per_tok == 1
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        TINY.replace(num_experts_per_tok=0)


# ---------------------------------------------------------------------------------------------------------------
# from_hf


def test_from_hf_released_config_is_the_v3_preset():
    cfg = ModelConfig.from_hf(_released())
    # config.json's initializer_range 0.02 is HF's default; from_hf keeps the paper's 0.006 (reference §1.3).
    assert cfg.initializer_range == 0.006
    assert cfg == DEEPSEEK_V3
    assert isinstance(cfg.rope_theta, float) and isinstance(cfg.rope_factor, float)


def test_from_hf_ignores_initializer_range():
    hf = _released()
    hf["initializer_range"] = 0.5
    assert ModelConfig.from_hf(hf).initializer_range == 0.006


def test_from_hf_rope_parameters_form():
    hf = _rope_parameters_form(_released())
    assert "rope_scaling" not in hf and "rope_theta" not in hf
    assert ModelConfig.from_hf(hf) == DEEPSEEK_V3


def test_from_hf_transformers_saved_config():
    """What transformers itself writes for the released config (rope_parameters, its own extra keys)."""
    saved = transformers.DeepseekV3Config(**_released()).to_dict()
    assert ModelConfig.from_hf(saved) == DEEPSEEK_V3


def test_from_hf_v3_without_scoring_keys_is_sigmoid_with_bias():
    hf = _released()
    del hf["scoring_func"], hf["topk_method"]
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.scoring_func, cfg.expert_bias) == ("sigmoid", True)
    assert cfg == DEEPSEEK_V3


def test_from_hf_v2_lite_is_softmax_without_bias():
    cfg = ModelConfig.from_hf(copy.deepcopy(V2_LITE_CONFIG))
    assert (cfg.scoring_func, cfg.expert_bias, cfg.norm_topk_prob) == ("softmax", False, False)
    assert (cfg.q_lora_rank, cfg.n_group, cfg.topk_group) == (0, 1, 1)
    assert cfg == DEEPSEEK_V2_LITE


def test_from_hf_v2_defaults_without_scoring_keys():
    hf = copy.deepcopy(V2_LITE_CONFIG)
    del hf["scoring_func"], hf["topk_method"], hf["norm_topk_prob"]
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.scoring_func, cfg.expert_bias, cfg.norm_topk_prob) == ("softmax", False, False)


def test_from_hf_group_limited_greedy_has_no_bias():
    hf = _released()
    hf["topk_method"] = "group_limited_greedy"
    cfg = ModelConfig.from_hf(hf)
    assert cfg.expert_bias is False and cfg.n_group == 8


def test_from_hf_eos_list_takes_the_first():
    hf = _released()
    hf["eos_token_id"] = [1, 2]
    assert ModelConfig.from_hf(hf).eos_token_id == 1


def test_from_hf_yarn_factor_derived_from_lengths():
    hf = _released()
    del hf["rope_scaling"]["factor"]
    assert ModelConfig.from_hf(hf).rope_factor == 163840 / 4096


def test_from_hf_no_rope_scaling_is_default_rope():
    hf = _released()
    hf["rope_scaling"] = None
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_type == "default" and not cfg.uses_yarn


# ---------------------------------------------------------------------------------------------------------------
# to_hf


ROUND_TRIP = {**PRESETS, "yarn_unequal_mscale": YARN_UNEQUAL_MSCALE,
              "tied_no_mtp": dataclasses.replace(TINY, tie_word_embeddings=True, num_mtp_layers=0)}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_to_hf_from_hf_round_trip(name):
    cfg = ROUND_TRIP[name].validate()
    hf = cfg.to_hf()
    assert ModelConfig.from_hf(json.loads(json.dumps(hf))) == cfg  # through real JSON


def test_yarn_unequal_mscale_round_trip_keeps_the_cos_sin_factor():
    cfg = ModelConfig.from_hf(YARN_UNEQUAL_MSCALE.to_hf())
    assert (cfg.rope_mscale, cfg.rope_mscale_all_dim) == (1.0, 0.8)
    assert rope.rope_attention_factor(cfg) != 1.0
    assert rope.rope_attention_factor(cfg) == rope.rope_attention_factor(YARN_UNEQUAL_MSCALE)


def test_to_hf_released_key_names():
    hf = DEEPSEEK_V3.to_hf()
    for key in ("vocab_size", "hidden_size", "num_nextn_predict_layers", "n_group", "topk_group", "topk_method",
                "scoring_func", "routed_scaling_factor", "first_k_dense_replace", "q_lora_rank"):
        assert hf[key] == RELEASED_V3_CONFIG[key], key
    assert hf["rope_scaling"]["type"] == "yarn"
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        assert hf["rope_scaling"][key] == RELEASED_V3_CONFIG["rope_scaling"][key], key


@pytest.mark.parametrize("name", ["deepseek-v3", "small", "yarn_unequal_mscale"])
def test_to_hf_loads_in_transformers(name):
    cfg = ROUND_TRIP[name]
    hf = transformers.DeepseekV3Config(**cfg.to_hf())
    assert hf.hidden_size == cfg.hidden_size
    assert hf.num_hidden_layers == cfg.num_hidden_layers
    assert hf.q_lora_rank == cfg.q_lora_rank
    assert hf.n_routed_experts == cfg.n_routed_experts
    assert hf.num_nextn_predict_layers == cfg.num_mtp_layers
    assert hf.num_mtp_layers == cfg.num_mtp_layers
    assert hf.qk_head_dim == cfg.qk_head_dim
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hf.rope_parameters["rope_type"] == cfg.rope_type
    if cfg.uses_yarn:
        assert hf.rope_parameters["factor"] == cfg.rope_factor
        assert hf.rope_parameters["mscale_all_dim"] == cfg.rope_mscale_all_dim
    # and what transformers writes back is read as the same config
    assert ModelConfig.from_hf(hf.to_dict()) == cfg


def test_to_hf_no_query_compression_is_null_in_transformers():
    cfg = dataclasses.replace(TINY, q_lora_rank=0).validate()
    d = cfg.to_hf()
    assert d["q_lora_rank"] is None
    assert transformers.DeepseekV3Config(**d).q_lora_rank is None
    assert ModelConfig.from_hf(d).q_lora_rank == 0


# ---------------------------------------------------------------------------------------------------------------
# validate(): one test per raise, in the order of config.py


POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                   "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
NON_NEGATIVE_FIELDS = ("q_lora_rank", "first_k_dense_replace", "num_mtp_layers", "n_shared_experts",
                       "n_routed_experts", "intermediate_size", "moe_intermediate_size")


@pytest.mark.parametrize("value", [0, -1, 8.0, True])
@pytest.mark.parametrize("field", POSITIVE_FIELDS)
def test_positive_integer_fields(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a positive integer"):
        _invalid(**{field: value}).validate()


@pytest.mark.parametrize("value", [-1, 1.0, False])
@pytest.mark.parametrize("field", NON_NEGATIVE_FIELDS)
def test_non_negative_integer_fields(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a non-negative integer"):
        _invalid(**{field: value}).validate()


def test_first_k_dense_replace_exceeds_layers():
    with pytest.raises(ValueError, match=r"first_k_dense_replace \(4\) exceeds num_hidden_layers \(3\)"):
        _invalid(first_k_dense_replace=4).validate()


def test_dense_layers_need_intermediate_size():
    with pytest.raises(ValueError, match="intermediate_size must be positive when first_k_dense_replace"):
        _invalid(intermediate_size=0).validate()
    _invalid(intermediate_size=0, first_k_dense_replace=0).validate()  # no dense layer: not needed


def test_odd_rope_head_dim():
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
        _invalid(qk_rope_head_dim=7).validate()


@pytest.mark.parametrize("eps", [0.0, -1e-6])
def test_rms_norm_eps_positive(eps):
    with pytest.raises(ValueError, match="rms_norm_eps must be a finite number > 0"):
        _invalid(rms_norm_eps=eps).validate()


def test_unknown_scoring_func():
    with pytest.raises(ValueError, match="scoring_func must be one of .*'relu'"):
        _invalid(scoring_func="relu").validate()


def test_no_routed_experts_with_moe_layers():
    with pytest.raises(ValueError, match="n_routed_experts must be positive when the model has MoE layers"):
        _invalid(n_routed_experts=0).validate()


def test_no_routed_experts_with_mtp_only():
    """All main layers dense, but the MTP block sits at an MoE index."""
    with pytest.raises(ValueError, match="n_routed_experts must be positive"):
        _invalid(n_routed_experts=0, first_k_dense_replace=3).validate()


def test_all_dense_model_without_experts_is_valid():
    cfg = _invalid(n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=3, num_mtp_layers=0,
                   moe_intermediate_size=0, n_group=3, topk_group=7).validate()
    assert cfg.num_moe_layers == 0


def test_moe_intermediate_size_positive():
    with pytest.raises(ValueError, match="moe_intermediate_size must be positive when the model has MoE layers"):
        _invalid(moe_intermediate_size=0).validate()


@pytest.mark.parametrize("k", [0, 9])
def test_num_experts_per_tok_range(k):
    with pytest.raises(ValueError, match=rf"num_experts_per_tok must be in \[1, n_routed_experts=8\], got {k}"):
        _invalid(num_experts_per_tok=k).validate()


@pytest.mark.parametrize("n_group", [3, 0])
def test_n_group_must_divide_experts(n_group):
    with pytest.raises(ValueError, match=rf"n_group \({n_group}\) must be positive and divide n_routed_experts"):
        _invalid(n_group=n_group).validate()


@pytest.mark.parametrize("topk_group", [5, 0])
def test_topk_group_range(topk_group):
    with pytest.raises(ValueError, match=rf"topk_group must be in \[1, n_group=4\], got {topk_group}"):
        _invalid(topk_group=topk_group).validate()


def test_num_experts_per_tok_exceeds_reachable_experts():
    # 8 experts in 4 groups of 2; one group reachable -> at most 2 experts
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(3\) exceeds the experts reachable in "
                                         r"topk_group=1 groups of 2"):
        _invalid(num_experts_per_tok=3, topk_group=1).validate()
    _invalid(num_experts_per_tok=2, topk_group=1).validate()


def test_one_expert_per_group_with_biased_routing():
    with pytest.raises(ValueError, match=r"n_group \(8\) leaves 1 expert per group"):
        _invalid(n_group=8, topk_group=4).validate()
    _invalid(n_group=8, topk_group=4, expert_bias=False).validate()  # max-score groups need only one


@pytest.mark.parametrize("scale", [0.0, -2.5])
def test_routed_scaling_factor_positive(scale):
    with pytest.raises(ValueError, match="routed_scaling_factor must be a finite number > 0"):
        _invalid(routed_scaling_factor=scale).validate()


def test_rope_theta_positive():
    with pytest.raises(ValueError, match="rope_theta must be a finite number > 1"):
        _invalid(rope_theta=0.0).validate()


def test_unknown_rope_type():
    with pytest.raises(ValueError, match="rope_type must be one of .*'linear'"):
        _invalid(rope_type="linear").validate()


def test_yarn_factor_below_one():
    with pytest.raises(ValueError, match="rope_factor must be >= 1 for YaRN, got 0.5"):
        _invalid(DEEPSEEK_V3, rope_factor=0.5).validate()
    _invalid(DEEPSEEK_V3, rope_factor=0.5, rope_type="default").validate()  # unused without YaRN


def test_yarn_original_length_positive():
    with pytest.raises(ValueError, match="rope_original_max_position_embeddings must be positive"):
        _invalid(DEEPSEEK_V3, rope_original_max_position_embeddings=0).validate()


@pytest.mark.parametrize("fast,slow", [(1.0, 1.0), (1.0, 32.0)])
def test_yarn_beta_fast_must_exceed_beta_slow(fast, slow):
    with pytest.raises(ValueError, match="rope_beta_fast .* must exceed rope_beta_slow"):
        _invalid(DEEPSEEK_V3, rope_beta_fast=fast, rope_beta_slow=slow).validate()


def test_yarn_beta_slow_positive():
    with pytest.raises(ValueError, match="rope_beta_slow must be a finite number > 0"):
        _invalid(DEEPSEEK_V3, rope_beta_slow=0.0).validate()


def test_initializer_range_positive():
    with pytest.raises(ValueError, match="initializer_range must be a finite number > 0"):
        _invalid(initializer_range=0.0).validate()


@pytest.mark.parametrize("field,value", [("eos_token_id", 512), ("eos_token_id", -1), ("bos_token_id", 600)])
def test_special_token_outside_vocabulary(field, value):
    with pytest.raises(ValueError, match=rf"{field} \({value}\) is outside the vocabulary \[0, 512\)"):
        _invalid(**{field: value}).validate()


def test_special_tokens_may_be_absent():
    _invalid(bos_token_id=None, eos_token_id=None).validate()


def test_transformer_validates_its_config():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        nnx.eval_shape(lambda: dsv3_jax.Transformer(_invalid(num_experts_per_tok=9), nnx.Rngs(0)))


# ----- combinations that once slipped through validate() -----


def test_yarn_rope_theta_one_is_rejected():
    cfg = _invalid(DEEPSEEK_V3, rope_theta=1.0)
    with pytest.raises(ValueError, match="rope_theta"):
        cfg.validate()


@pytest.mark.parametrize("field", ["rms_norm_eps", "rope_theta", "routed_scaling_factor", "initializer_range"])
def test_nan_float_fields_are_rejected(field):
    with pytest.raises(ValueError, match=field):
        _invalid(**{field: math.nan}).validate()


@pytest.mark.parametrize("field,value", [("num_experts_per_tok", 2.5), ("n_group", 2.0), ("topk_group", 1.5)])
def test_non_integer_routing_fields_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        _invalid(**{field: value}).validate()


# ---------------------------------------------------------------------------------------------------------------
# from_hf rejections


@pytest.mark.parametrize("key,value,match", [
    ("model_type", "llama", "model_type 'llama' is not supported"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("attention_bias", True, "attention_bias=true is not supported"),
    ("moe_layer_freq", 2, "moe_layer_freq 2 is not supported"),
    ("topk_method", "aux_loss", "topk_method 'aux_loss' is not supported"),
])
def test_from_hf_rejects_unsupported_architecture(key, value, match):
    hf = _released()
    hf[key] = value
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("form", ["rope_scaling", "rope_parameters"])
def test_from_hf_rejects_unsupported_rope_type(form):
    hf = _released()
    if form == "rope_scaling":
        hf["rope_scaling"] = {"type": "linear", "factor": 4.0}
    else:
        del hf["rope_scaling"]
        hf["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope type 'linear' is not supported"):
        ModelConfig.from_hf(hf)


def test_from_hf_rejects_per_layer_type_rope_parameters():
    hf = _released()
    del hf["rope_scaling"]
    hf["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    with pytest.raises(ValueError, match="per-layer-type rope_parameters"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_hidden_layers", "kv_lora_rank",
                                 "max_position_embeddings"])
def test_from_hf_missing_required_key(key):
    hf = _released()
    del hf[key]
    with pytest.raises(ValueError, match=f"lacks the required key '{key}'"):
        ModelConfig.from_hf(hf)


def test_from_hf_invalid_values_are_validated():
    hf = _released()
    hf["topk_group"] = 9
    with pytest.raises(ValueError, match="topk_group"):
        ModelConfig.from_hf(hf)


def test_from_hf_missing_max_positions_with_derived_yarn_factor():
    hf = _released()
    del hf["max_position_embeddings"], hf["rope_scaling"]["factor"]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ModelConfig.from_hf(hf)


def test_from_hf_rejects_rope_interleave_false():
    hf = _released()
    hf["rope_interleave"] = False
    with pytest.raises(ValueError, match="rope_interleave"):
        ModelConfig.from_hf(hf)


def test_from_hf_default_routed_scaling_factor_matches_transformers():
    hf = _released()
    del hf["routed_scaling_factor"]
    assert ModelConfig.from_hf(hf).routed_scaling_factor == transformers.DeepseekV3Config(**hf).routed_scaling_factor


# ---------------------------------------------------------------------------------------------------------------
# from_json_file


def test_from_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RELEASED_V3_CONFIG))
    assert ModelConfig.from_json_file(path) == DEEPSEEK_V3
    assert ModelConfig.from_json_file(str(path)) == DEEPSEEK_V3


def test_from_json_file_missing(tmp_path):
    path = tmp_path / "absent" / "config.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        ModelConfig.from_json_file(path)


def test_from_json_file_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 7168,')
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not valid JSON"):
        ModelConfig.from_json_file(path)


def test_from_json_file_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(path)) + " must hold a JSON object, got list"):
        ModelConfig.from_json_file(path)


def test_from_hf_out_of_vocab_special_token_is_dropped_with_a_warning():
    hf = _released()
    hf["vocab_size"], hf["eos_token_id"] = 1000, 100001
    with pytest.warns(UserWarning, match="eos_token_id 100001 is outside the vocabulary"):
        cfg = ModelConfig.from_hf(hf)
    assert cfg.eos_token_id is None and cfg.bos_token_id == 0
