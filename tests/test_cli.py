"""Tests for dsv3_jax/cli.py (`dsv3 info`) and dsv3_jax/stats.py: the released model's counts (reference §2.1), a
config.json giving the same numbers as its preset, error exits, and the tiny preset against a count by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsv3_jax import cli, get_preset
from dsv3_jax.config import ModelConfig

# reference §2.1 "Parameter counts" and §3.3 (576 bf16 values per token and layer, 61 layers)
V3_TOTAL = 671_026_419_200
V3_MTP_OWN = 11_610_068_224
V3_KV_BYTES = 70_272


def _by_hand(c: ModelConfig) -> dict[str, int]:
    """Parameter counts summed from the config fields alone (paper §2.1, §2.2; reference §2.1's tensor list)."""
    d, v, h = c.hidden_size, c.vocab_size, c.num_attention_heads
    q, kv, nope, r, vh = c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    e, f, k = c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok
    query = d * q + q + q * h * (nope + r) if q else d * h * (nope + r)  # W^DQ, q norm, W^UQ;W^QR (or W^Q)
    attn = query + d * (kv + r) + kv + kv * h * (nope + vh) + h * vh * d  # W^DKV;W^KR, kv norm, W^UK;W^UV, W^O
    block_norms = 2 * d
    dense_mlp = 3 * d * c.intermediate_size
    routed = 3 * e * d * f  # E SwiGLU experts
    shared = 3 * d * c.n_shared_experts * f
    router = d * e + (e if c.expert_bias else 0)  # gate weight + aux-loss-free bias
    dense_layer = attn + block_norms + dense_mlp
    moe_layer = attn + block_norms + shared + router + routed
    n_dense, n_moe = c.first_k_dense_replace, c.num_hidden_layers - c.first_k_dense_replace
    embed_head = v * d * (1 if c.tie_word_embeddings else 2)
    total = embed_head + d + n_dense * dense_layer + n_moe * moe_layer  # + final norm
    mtp_module = 3 * d + 2 * d * d + moe_layer  # enorm, hnorm, shared_head.norm, eh_proj, its block
    return {
        "total_params": total,
        "mtp_params": c.num_mtp_layers * mtp_module,
        "activated_params": total - n_moe * routed + n_moe * 3 * k * d * f,
        "kv_cache_bytes_per_token": c.num_hidden_layers * (kv + r) * 2,  # bf16 latent + rope key
    }


def _popen(*args):
    return subprocess.Popen([sys.executable, "-m", "dsv3_jax.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every subprocess of this file, started together (each pays the JAX import), then collected."""
    tmp = tmp_path_factory.mktemp("cli")
    configs = {"deepseek-v3": tmp / "deepseek-v3.json"}
    configs["deepseek-v3"].write_text(json.dumps(get_preset("deepseek-v3").to_hf()))
    commands = {
        "v3_json": ["info", "--preset", "deepseek-v3", "--json"],
        "v3_config_json": ["info", "--config", str(configs["deepseek-v3"]), "--json"],
        "tiny_json": ["info", "--preset", "tiny", "--json"],
        "unknown_preset": ["info", "--preset", "nope"],
        "missing_config": ["info", "--config", str(tmp / "absent" / "config.json")],
    }
    procs = {key: _popen(*argv) for key, argv in commands.items()}
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        out[key] = subprocess.CompletedProcess(commands[key], proc.returncode, stdout, stderr)
    out["tmp"] = tmp
    return out


def _json(run) -> dict:
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_info_deepseek_v3_json(runs):
    stats = _json(runs["v3_json"])
    assert stats["total_params"] == V3_TOTAL
    assert stats["mtp_params"] == V3_MTP_OWN
    assert stats["kv_cache_bytes_per_token"] == V3_KV_BYTES
    assert 37.4e9 <= stats["activated_params"] <= 37.7e9  # reference §2.1: 37.55B
    assert set(stats) == {"total_params", "mtp_params", "activated_params", "kv_cache_bytes_per_token"}


def test_info_deepseek_v3_by_hand(runs):
    """The hand formula reproduces the released counts, so it can stand as the reference for the tiny preset."""
    assert _json(runs["v3_json"]) == _by_hand(get_preset("deepseek-v3"))


def test_info_config_file_gives_the_preset_numbers(runs):
    assert _json(runs["v3_config_json"]) == _json(runs["v3_json"])


def test_info_unknown_preset(runs):
    run = runs["unknown_preset"]
    assert run.returncode != 0
    assert "invalid choice: 'nope'" in run.stderr
    assert "deepseek-v3" in run.stderr  # lists the choices
    assert run.stdout == ""


def test_info_missing_config_file(runs):
    run = runs["missing_config"]
    assert run.returncode != 0
    path = runs["tmp"] / "absent" / "config.json"
    assert f"dsv3 info: error: config file not found: {path}" in run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == ""


def test_info_tiny_matches_count_by_hand(runs):
    stats = _json(runs["tiny_json"])
    assert stats == _by_hand(get_preset("tiny"))
    assert stats["total_params"] == 250_000  # golden value of the hand count, so a drift in both is caught


# ----- in process (no extra interpreter start) -----


def test_info_text_output(runs, capsys):
    assert cli.main(["info", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    stats = _json(runs["v3_json"])
    for number in ("671,026,419,200", "11,610,068,224", "70,272", f"{stats['activated_params']:,}"):
        assert number in out, number
    assert "model: deepseek-v3" in out
    assert "layers 61 (3 dense), hidden 7168, heads 128, vocab 129280" in out
    assert "256 routed (top-8, 8 groups, top-4 groups) + 1 shared; scoring sigmoid with bias; MTP depth 1" in out


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "small"])
def test_info_config_file_gives_the_preset_numbers_in_process(name, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(get_preset(name).to_hf()))
    assert cli.main(["info", "--config", str(path), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert cli.main(["info", "--preset", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_file


def test_info_invalid_config_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(get_preset("tiny").to_hf() | {"topk_group": 9}))
    assert cli.main(["info", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3 info: error: ") and "topk_group" in err


def test_info_invalid_json_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text("{")
    assert cli.main(["info", "--config", str(path)]) == 2
    assert f"{path} is not valid JSON" in capsys.readouterr().err


def test_info_preset_and_config_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["info", "--preset", "tiny", "--config", str(tmp_path / "c.json")])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["small", "deepseek-v2-lite"])
def test_info_other_presets_match_count_by_hand(name, capsys):
    assert cli.main(["info", "--preset", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _by_hand(get_preset(name))


def test_info_tied_embeddings_count_by_hand(tmp_path, capsys):
    cfg = get_preset("tiny").replace(tie_word_embeddings=True, q_lora_rank=0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf()))
    assert cli.main(["info", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _by_hand(cfg)
