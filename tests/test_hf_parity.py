"""Parity with transformers' DeepseekV3ForCausalLM through from_pretrained (float32, max abs logits <= 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

import dsv3_jax
from tests import hf_reference as ref

TOL = 1e-4
CASES = {
    "grouped_bias": {},
    "no_q_compression": {"q_lora_rank": None},
    "no_topk_norm": {"norm_topk_prob": False, "n_group": 2, "topk_group": 1},
    "yarn": {"max_position_embeddings": 256, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}},
    "tied_single_group": {"tie_word_embeddings": True, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0},
}


def _tokens(vocab, b=2, t=24, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    overrides = CASES[case]
    hf = ref.build_hf_model(**overrides)
    ref.save_hf(hf, str(tmp_path))
    m = dsv3_jax.from_pretrained(tmp_path)
    tokens = _tokens(hf.config.vocab_size, t=40 if case == "yarn" else 24)
    err = np.max(np.abs(np.asarray(m(tokens)) - ref.hf_logits(hf, tokens)))
    assert err <= TOL, f"{case}: max abs logits error {err}"


def test_sharded_checkpoint_with_mtp_layer(tmp_path):
    hf = ref.build_hf_model()
    ref.save_hf(hf, str(tmp_path), max_shard_size="40KB")
    mtp = ref.HFMTPReference(hf, {})
    ref.add_tensors_as_shard(str(tmp_path), mtp.tensors(), "model-mtp.safetensors", {"num_nextn_predict_layers": 1})
    m = dsv3_jax.from_pretrained(tmp_path)
    assert m.config.num_mtp_layers == 1
    tokens = _tokens(hf.config.vocab_size)
    out = m.forward(tokens)
    assert np.max(np.abs(np.asarray(out.logits) - ref.hf_logits(hf, tokens))) <= TOL
    mtp_ours = np.asarray(out.mtp_logits[0, :, :-1])
    err = np.max(np.abs(mtp_ours - mtp.logits(tokens)))
    assert err <= TOL, f"MTP logits error {err}"


def test_fp8_checkpoint(tmp_path):
    # hidden 192 and intermediate 272 span several 128-blocks with a partial last one
    overrides = {"hidden_size": 192, "intermediate_size": 272, "moe_intermediate_size": 136, "q_lora_rank": 136}
    hf = ref.build_hf_model(**overrides)
    ref.write_fp8_checkpoint(hf, str(tmp_path))
    m = dsv3_jax.from_pretrained(tmp_path)
    tokens = _tokens(hf.config.vocab_size)
    err = np.max(np.abs(np.asarray(m(tokens)) - ref.hf_logits(hf, tokens)))
    assert err <= TOL, f"fp8 max abs logits error {err}"


def test_state_dict_with_fused_experts(tmp_path):
    """A checkpoint written straight from model.state_dict() (transformers' fused expert tensors) loads too."""
    from safetensors.torch import save_file

    hf = ref.build_hf_model()
    ref.save_hf(hf, str(tmp_path))
    sd = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    (tmp_path / "model.safetensors").unlink()
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    m = dsv3_jax.from_pretrained(tmp_path)
    tokens = _tokens(hf.config.vocab_size)
    err = np.max(np.abs(np.asarray(m(tokens)) - ref.hf_logits(hf, tokens)))
    assert err <= TOL, err
