"""Tests for sharding/planner.py and `dsv3 plan`: parameter and FLOP counts against dsv3_jax.stats / train.flops,
memory per device of the tiny preset against numbers worked out by hand, the §8.3 schedule properties, the paper
setup next to the paper's figures (Table 1: 180K GPU-hours per trillion tokens, 2.788M in total), bad specs."""

from __future__ import annotations

import json

import pytest

from dsv3_jax import cli, get_preset
from dsv3_jax.stats import model_stats
from dsv3_jax.train.flops import training_flops_per_token
from sharding.mesh import parse_mesh_spec
from sharding.planner import TrainSettings, model_units, plan, resolve_mesh

TINY = get_preset("tiny")
V3 = get_preset("deepseek-v3")

# tiny (d=64, q_lora=32, kv_lora=32, rope 8, nope 16, v 16, 4 heads, 8 experts of 32, top-2, 1 shared, dense 128,
# vocab 512), parameters by hand:
#   attention: wq_a 64*32 + q_norm 32 + wq_b 32*4*24 + wkv_a 64*40 + kv_norm 32 + wkv_b 32*4*32 + wo 4*16*64
#              = 2048 + 32 + 3072 + 2560 + 32 + 4096 + 4096 = 15936, + two block norms 128 = 16064
#   dense block: 16064 + 3*64*128 = 40640
#   MoE block:   16064 + shared 3*64*32 + gate 64*8 + bias 8 = 22728 non-expert, + routed 3*8*64*32 = 49152
#   MTP module:  enorm, hnorm, head norm 3*64 + eh_proj 2*64*64 + a MoE block = 31112 non-expert + 49152
#   embedding 512*64 = 32768; final norm + head 64 + 32768 = 32832
STAGE0_DENSE, STAGE0_EXPERT = 32768 + 40640 + 22728, 49152  # embedding, dense block, MoE block
STAGE1_DENSE, STAGE1_EXPERT = 22728 + 31112 + 32832, 2 * 49152  # MoE block, MTP module, head
# Activation bytes per token in BF16, stage 1 (MoE block, MTP, head):
#   attention: block input 2*64 + c_Q 2*32 + c_KV,k_pe 2*40 + output 2*4*16 + LSE 4*4 + residual 2*64 = 544
#   MoE: router probs 4*8 + top-2 ids/weights 8*2 + dispatched copies 2*64*2 + SwiGLU inputs (2+1)*2*32*2 = 688
#   MTP: a MoE block 1232 + embedded token and h 2*2*64 + head input 2*64 + LSE 4 = 1620; head: 2*64 + 4 = 132
STAGE1_ACT = 1232 + 1620 + 132
STAGE0_ACT = (544 + 2 * 2 * 128) + 1232  # dense block (SwiGLU inputs 2 x 128 in BF16) + MoE block


def _tiny(mesh: str, **settings) -> dict:
    base = dict(global_batch=8, seq_len=16, micro_batch=1, schedule="1f1b", precision="bf16")
    return plan(TINY, parse_mesh_spec(mesh, allow_auto=True), "h800", TrainSettings(**{**base, **settings}))


def test_units_match_model_stats():
    for cfg in (TINY, V3):
        stats = model_stats(cfg)
        units = model_units(cfg, 4096)
        assert len(units) == cfg.num_hidden_layers + cfg.num_mtp_layers + 2
        assert sum(u.params for u in units) == stats.total_params + stats.mtp_params
        routed = 3 * cfg.n_routed_experts * cfg.hidden_size * cfg.moe_intermediate_size
        assert sum(u.expert_params for u in units) == routed * (cfg.num_moe_layers + cfg.num_mtp_layers)


def test_flops_match_train_flops():
    units = model_units(V3, 4096)
    forward = sum(u.fp8_flops + u.bf16_flops + u.attn_flops for u in units)
    # flops.py also counts the norm scales as matmul parameters (~1e-5 of the total)
    assert 3 * forward == pytest.approx(training_flops_per_token(V3, 4096), rel=1e-4)


def test_tiny_memory_by_hand():
    p = _tiny("pp=2,dp=2,ep=2")  # 6 units -> stages [embed, dense, moe] and [moe, mtp, head]; 2 micro-batches
    assert (p["gpus"], p["stages"], p["units_per_stage"], p["micro_batches_per_step"]) == (8, 2, 3, 2)
    assert p["mem_rank"] == 1
    held = STAGE1_DENSE + STAGE1_EXPERT / 2
    assert p["params_per_device"] == held == 135824
    assert p["param_bytes"] == 2 * held  # BF16 weights
    assert p["grad_bytes"] == 4 * held  # FP32 gradients
    # ZeRO-1: non-expert state over dp*ep = 4 ranks, expert state over dp = 2; FP32 master + BF16 m and v
    assert p["optimizer_bytes"] == 8 * (STAGE1_DENSE / 4 + STAGE1_EXPERT / 2 / 2) == 369952
    # in 1F1B rank r keeps pp - r micro-batches in flight: rank 1 one chunk of 16 tokens, rank 0 two (§8.3)
    assert p["chunks_in_flight"] == 1 and p["activation_bytes"] == 16 * STAGE1_ACT == 47744
    # EP send + receive buffers of one MoE layer: 16 tokens x top-2 over ep=2 -> C = min(ceil(2 * 16 * 2 / 2) = 32,
    # worst case 16 x min(2, 4) = 32) rows per destination, 2 destinations, 64 BF16 values per row
    assert p["ep_dispatch_rows"] == p["ep_dispatch_rows_worst_case"] == 64 and p["ep_buffer_bytes"] == 2 * 64 * 128
    assert p["total_bytes"] == 271648 + 543296 + 369952 + 47744 + 16384
    rank0 = 2 * 120712 + 4 * 120712 + 8 * (STAGE0_DENSE / 4 + STAGE0_EXPERT / 2 / 2) + 2 * 16 * STAGE0_ACT
    assert rank0 == 1088064 < p["total_bytes"]
    # FP8 recipe (§3.3): attention output in E5M6 (1.5 bytes), dispatched copies and SwiGLU inputs in FP8 with a
    # 4-byte scale per 128 values: attention 128 + 64 + 80 + 1.5*64 + 16 + 128 = 512, MoE 32 + 16 + 2*64*1.03125
    # + 3*64*1.03125 = 378; stage 1 = (512 + 378) + (890 + 2*2*64 + 2*64 + 4) + 132 = 2300 per token
    fp8 = _tiny("pp=2,dp=2,ep=2", precision="fp8")
    assert fp8["activation_bytes"] == 16 * 2300


def test_dualpipe_doubles_parameters_and_holds_pp_plus_one_chunks():
    one = _tiny("pp=2,dp=2,ep=2", global_batch=16)
    dual = _tiny("pp=2,dp=2,ep=2", global_batch=16, schedule="dualpipe")
    # rank 0 holds stages 0 and pp-1-0 = 1: the parameters of both 1F1B ranks
    assert dual["params_per_device"] == (STAGE0_DENSE + STAGE0_EXPERT / 2) + (STAGE1_DENSE + STAGE1_EXPERT / 2)
    assert dual["params_per_device"] == pytest.approx(2 * one["params_per_device"], rel=0.1)
    # each stage lives on 2 ranks per replica, so ZeRO-1 shards over twice as many ranks
    assert (dual["zero_group_dense"], dual["zero_group_expert"]) == (8, 4)
    assert dual["optimizer_bytes"] == 8 * ((STAGE0_DENSE + STAGE1_DENSE) / 8 + (STAGE0_EXPERT + STAGE1_EXPERT) / 2 / 4)
    assert dual["chunks_in_flight"] == 3 and dual["activation_bytes"] == 3 * 16 * STAGE1_ACT
    assert one["chunks_in_flight"] == 1  # its fullest rank is the last one


def test_replicated_edges_put_every_non_moe_unit_on_every_rank():
    """edges='replicated' (this code's pipeline state: only the MoE stack sharded over pp): each rank holds its
    MoE blocks plus the embedding, dense block, MTP module and head."""
    own = _tiny("pp=2,dp=2,ep=2")
    rep = _tiny("pp=2,dp=2,ep=2", edges="replicated")
    moe_dense, moe_expert = 22728, 49152  # one MoE block per stage
    edges_dense, edges_expert = 32768 + 40640 + 31112 + 32832, 49152  # embedding, dense, MTP, head
    assert rep["params_per_device"] == moe_dense + edges_dense + (moe_expert + edges_expert) / 2
    assert rep["params_per_device"] > own["params_per_device"] == STAGE1_DENSE + STAGE1_EXPERT / 2
    with pytest.raises(ValueError, match="edges must be one of"):
        _tiny("pp=2", edges="nowhere")


def test_recomputed_activations_are_the_executors_buffers_one_chunk_and_its_weight_gradient():
    """activations='recomputed' (this code's executor): per rank (in flight + 1) buffer slots of the stage input
    and output gradient in BF16, one chunk's activations, and its FP32 weight gradient."""
    p = _tiny("pp=2,dp=2,ep=2", activations="recomputed")
    assert p["mem_rank"] == 1 and p["chunks_in_flight"] == 1
    slots = (1 + 1) * 2 * 2 * 16 * 64  # 16 tokens x hidden 64
    assert p["activation_bytes"] == slots + 16 * STAGE1_ACT + 4 * (STAGE1_DENSE + STAGE1_EXPERT / 2) == 599232
    assert _tiny("pp=1,dp=2,ep=2", activations="recomputed")["activation_bytes"] == _tiny(
        "pp=1,dp=2,ep=2")["activation_bytes"]  # without a pipeline nothing changes
    with pytest.raises(ValueError, match="activations must be one of"):
        _tiny("pp=2", activations="some")


def test_single_device_compute_is_flops_over_peak():
    eff = 0.5
    p = plan(V3, {}, "h800", TrainSettings(precision="bf16", gemm_efficiency=eff, attention_efficiency=eff))
    assert (p["gpus"], p["schedule"], p["bubble_s"], p["ep_s"], p["dp_s"]) == (1, "none", 0.0, 0.0, 0.0)
    # recomputed MLA up-projections: W^UQ 1536 x 128*192 and W^UKV 512 x 128*256, 61 layers + 1 MTP block
    recompute = 2 * (1536 * 128 * 192 + 512 * 128 * 256) * 62
    tokens = 15360 * 4096
    expected = tokens * (training_flops_per_token(V3, 4096) + recompute) / (989.4e12 * eff)
    assert p["compute_s"] - p["memory_bound_s"] == pytest.approx(expected, rel=1e-4)
    assert 0 < p["memory_bound_s"] < 0.2 * p["compute_s"]
    assert p["step_s"] == pytest.approx(p["compute_s"] + p["optimizer_s"])


def test_paper_setup_communication_and_overlap():
    mesh = parse_mesh_spec("pp=16,ep=64,dp=auto", allow_auto=True)
    dual = plan(V3, mesh, "h800", gpus=2048)
    assert (dual["dp"], dual["ep_nodes_per_token"], dual["micro_batches_per_step"]) == (2, 4, 120)
    # rank 0 holds stage 0 (embedding + 3 dense blocks) and stage 15 (2 MoE blocks, the MTP module, the head):
    # half of its micro-batch passes meet 3 all-to-all layers. A token reaches 4 of the 8 nodes, its own with
    # chance 1/2 -> 3.5 IB copies of FP8 dispatch + BF16 combine, forward and backward.
    assert dual["time_rank"] == 0
    token_bytes = 2 * 7168 * (1 + 4 / 128) + 2 * 2 * 7168
    assert dual["ep_ib_bytes"] == pytest.approx(120 * 4096 * 1.5 * 3.5 * token_bytes)
    assert dual["ep_s"] == pytest.approx(dual["ep_ib_bytes"] / 50e9)  # IB is the bottleneck, not NVLink
    assert dual["exposed_comm_s"] == 0.0 < dual["ep_s"]  # hidden behind compute (§3.2.1)
    assert dual["fits"]
    # bounded EP buffers (sharding/expert_parallel.py): 4096 tokens x top-8 over ep=64, slack 2 -> 1024 rows per
    # destination, 64 destinations, 7168 BF16 values a row; the static worst case was 4096 x min(8, 256 / 64) rows
    assert dual["ep_dispatch_rows"] == 64 * 1024 and dual["ep_dispatch_bytes"] == 64 * 1024 * 7168 * 2
    assert dual["ep_dispatch_rows_worst_case"] == 64 * 4096 * 4
    assert dual["ep_buffer_bytes"] == 2 * dual["ep_dispatch_bytes"]
    one = plan(V3, mesh, "h800", TrainSettings(schedule="1f1b"), gpus=2048)
    assert one["exposed_comm_s"] == pytest.approx(one["ep_s"] + one["pp_s"])
    assert one["compute_sm_share"] == 1.0 and dual["compute_sm_share"] == pytest.approx(112 / 132)
    # §8.3: DualPipe's bubble (PP/2-1)(F&B+B-3W) is below 1F1B's (PP-1)(F+B) for the same chunks
    f, b, w = dual["chunk_f_s"], dual["chunk_b_s"], dual["chunk_w_s"]
    assert dual["bubble_s"] == pytest.approx(7 * ((f + b) + b - 3 * w)) and dual["bubble_s"] < 15 * (f + b)
    fp8 = plan(V3, mesh, "h800", TrainSettings(precision="bf16"), gpus=2048)
    assert fp8["compute_s"] > dual["compute_s"]


def test_cli_paper_setup_table(capsys):
    assert cli.main(["plan", "--preset", "deepseek-v3", "--mesh", "pp=16,ep=64,dp=auto", "--gpus", "2048",
                     "--hardware", "h800"]) == 0
    out = capsys.readouterr().out
    for figure in ("180.0K", "2,664.0K", "2,788.0K", "3.7"):
        assert figure in out
    ratio = float(next(line for line in out.splitlines() if "GPU-hours per trillion" in line).split()[-1])
    print(f"estimate / paper GPU-hours per trillion tokens: {ratio}")
    assert 0.3 <= ratio <= 3


def test_cli_json(capsys):
    assert cli.main(["plan", "--preset", "tiny", "--mesh", "pp=2,dp=2,ep=2", "--global-batch", "8", "--seq-len",
                     "16", "--schedule", "1f1b", "--precision", "bf16", "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    data = json.loads(out)
    assert data["total_bytes"] == 271648 + 543296 + 369952 + 47744 + 16384
    assert data["paper_gpu_hours_per_trillion"] == 180e3 and data["paper_total_gpu_hours"] == 2788e3
    assert data["ratio_total_gpu_hours"] == pytest.approx(data["total_gpu_hours"] / 2788e3)
    assert data["paper_setup"] is False


@pytest.mark.parametrize("spec, match", [
    ("pp=2,xp=2", "unknown axis 'xp'"),
    ("pp=2,pp=2", "given twice"),
    ("pp=two", "AXIS=SIZE"),
    ("pp=0", "size >= 1"),
    ("pp", "AXIS=SIZE"),
    ("", "non-empty"),
    ("pp=auto,dp=auto", "at most one"),
])
def test_bad_mesh_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh_spec(spec, allow_auto=True)


@pytest.mark.parametrize("cfg, spec, gpus, settings, match", [
    (V3, "pp=16,dp=2,ep=64", 1024, {}, "multiplies to 2048 devices, not the 1024 GPUs"),
    (V3, "pp=16,ep=64,dp=auto", None, {}, "needs the GPU count"),
    (V3, "pp=16,ep=64,dp=auto", 2000, {}, "not a multiple"),
    (TINY, "ep=3", None, {}, "ep=3 does not divide the 8 routed experts"),
    (TINY, "pp=8", None, {"schedule": "1f1b", "global_batch": 8}, "6 pipeline units .* fewer than the 8"),
    (V3, "pp=16,dp=2,ep=64", None, {"global_batch": 1000}, "not divisible by dp\\*ep\\*micro_batch"),
    (TINY, "pp=3", None, {"global_batch": 12}, "DualPipe needs an even pp"),
    (TINY, "pp=2", None, {"global_batch": 2}, "DualPipe needs"),
    (TINY, "tp=3", None, {}, "tp=3 does not divide"),
    (TINY, "dp=2", None, {"schedule": "zigzag"}, "schedule must be one of"),
    (TINY, "dp=2", None, {"gemm_efficiency": 1.5}, "gemm_efficiency"),
    (TINY, "dp=2", None, {"micro_batch": 0}, "micro_batch"),
])
def test_bad_layout(cfg, spec, gpus, settings, match):
    with pytest.raises(ValueError, match=match):
        plan(cfg, parse_mesh_spec(spec, allow_auto=True), "h800", TrainSettings(**settings), gpus=gpus)


def test_bad_hardware_and_cli_error_exit(capsys):
    with pytest.raises(ValueError, match="unknown hardware 'a100'"):
        plan(TINY, {}, "a100")
    with pytest.raises(ValueError, match="unknown axis 'xp'"):
        resolve_mesh({"xp": 2})
    assert cli.main(["plan", "--mesh", "pp=16,ep=48,dp=2"]) == 2
    assert "dsv3 plan: error: mesh ep=48 does not divide the 256 routed experts" in capsys.readouterr().err


def test_uneven_stages_give_the_first_stages_one_unit_more():
    """6 units over 4 stages: [embed, dense], [moe, moe], [mtp], [head]; rank 1 with its two MoE blocks is the
    fullest (this file's by-hand counts)."""
    p = plan(TINY, {"pp": 4}, "h800", TrainSettings(global_batch=8, seq_len=32, schedule="1f1b"))
    assert (p["stages"], p["units_per_stage"], p["uneven_stages"]) == (4, 2, 2)
    assert p["mem_rank"] == 1 and p["params_per_device"] == 2 * (22728 + 49152)  # two MoE blocks
