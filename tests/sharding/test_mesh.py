"""Mesh specs, the logical-axis rule table, ZeRO-1/FSDP state shardings and mesh-aligned group-limited routing
(single device: abstract meshes; the 8-device numerics are in test_sharded_training.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from dsv3_jax.cli import main
from dsv3_jax.config import TINY
from dsv3_jax.model.experts import route
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.train.loop import RunArgs, train
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.train.step import init_state, split_model
from sharding.expert_parallel import ep_groups_of_experts
from sharding.mesh import MESH_AXES, build_mesh, mesh_sizes, parse_mesh_spec, validate_mesh
from sharding.rules import logical_to_spec, train_state_shardings


def _mesh(pp=1, dp=1, ep=1, tp=1):
    return AbstractMesh((pp, dp, ep, tp), MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def test_parse_fills_every_axis():
    assert parse_mesh_spec("pp=2, dp=2,ep=2") == {"pp": 2, "dp": 2, "ep": 2, "tp": 1}
    assert parse_mesh_spec("ep=8") == {"pp": 1, "dp": 1, "ep": 8, "tp": 1}
    assert mesh_sizes(None, 8) == {"pp": 1, "dp": 8, "ep": 1, "tp": 1}  # no spec: every device on dp


@pytest.mark.parametrize("spec, message", [
    ("xp=2", "unknown axis 'xp'"), ("dp=2,dp=2", "given twice"), ("dp=0", "size >= 1"), ("dp2", "AXIS=SIZE"),
    ("", "non-empty"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh_spec(spec)


def test_sizes_must_multiply_to_the_device_count(monkeypatch):
    with pytest.raises(ValueError, match="= 6 devices, but there are 8"):
        mesh_sizes("dp=3,ep=2", 8)
    with pytest.raises(ValueError, match="= 16 devices, but there are 8"):  # the test process has 8 (conftest)
        build_mesh("dp=16")
    # a spec with fewer devices than the process has takes the first ones
    small = build_mesh("dp=2,ep=2")
    assert small.shape == {"pp": 1, "dp": 2, "ep": 2, "tp": 1}
    assert list(small.devices.flat) == jax.devices()[:4]
    # without a spec: every device on dp, or the first DSV3_DEVICES of them
    monkeypatch.setenv("DSV3_DEVICES", "1")
    assert build_mesh().shape == {"pp": 1, "dp": 1, "ep": 1, "tp": 1}
    monkeypatch.delenv("DSV3_DEVICES")
    assert build_mesh().shape == {"pp": 1, "dp": 8, "ep": 1, "tp": 1}
    monkeypatch.setenv("DSV3_DEVICES", "9")
    with pytest.raises(ValueError, match="DSV3_DEVICES='9'"):
        build_mesh()


@pytest.mark.parametrize("sizes, cfg, batch, message", [
    ({"ep": 3}, TINY, None, "8 routed experts do not divide evenly over 3"),
    ({"pp": 2}, TINY.replace(first_k_dense_replace=3), None, "model has no MoE layer"),
    ({"dp": 2, "ep": 4}, TINY, 4, "batch of 4 sequences does not split over dp x ep = 8"),
    ({"ep": 6}, TINY.replace(n_routed_experts=12), None, "n_group=4 routing groups cannot align with 6"),
])
def test_model_must_fit_the_mesh(sizes, cfg, batch, message):
    with pytest.raises(ValueError, match=message):
        validate_mesh(sizes, cfg, batch)


def test_fitting_meshes_pass():
    validate_mesh({"pp": 3, "dp": 2, "ep": 4}, TINY, 8)
    validate_mesh({"pp": 2}, TINY)  # 3 layers over 2 stages: uneven stages (sharding/stage_layout.py)
    validate_mesh({"ep": 8}, TINY, 8)  # ep a multiple of n_group: a group spans 2 ranks


def test_rule_table():
    mesh = _mesh(dp=2, ep=4, tp=2)
    assert logical_to_spec(("batch", "seq", "embed"), (8, 16, 64), mesh) == P(("dp", "ep"), None, None)
    assert logical_to_spec(("layers", "experts", "embed", "expert_mlp"), (2, 8, 64, 32), mesh) == \
        P(None, "ep", None, None)
    assert logical_to_spec(("layers", "embed", "mlp"), (1, 64, 128), mesh) == P(None, None, "tp")
    # tp of size 1 and axes that do not divide their dimension are left out
    assert logical_to_spec(("layers", "embed", "mlp"), (1, 64, 128), _mesh(dp=8)) == P(None, None, None)
    assert logical_to_spec(("batch", None), (4, 9), mesh) == P("dp", None)  # 4 % (2*4): keep dp only
    with pytest.raises(ValueError, match="logical axis 'nope' has no rule"):
        logical_to_spec(("nope",))


@pytest.fixture(scope="module")
def abstract_state():
    model = nnx.eval_shape(lambda: Transformer(TINY, nnx.Rngs(0)))
    _, params, bias = split_model(model)
    return jax.eval_shape(lambda p, b: init_state(p, b, make_optimizer(p, 1e-3, 10)), params, bias)


def _flat(tree):
    return {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("mode", ["zero1", "fsdp"])
def test_zero_partitions_optimizer_moments_over_the_data_axes(abstract_state, mode):
    mesh = _mesh(dp=2, ep=4)
    specs = _flat(train_state_shardings(abstract_state, mesh, mode))
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}

    def axes(spec):
        return {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}

    w = "['moe_layers']['ffn']['w_gate'].value"
    assert specs["['params']" + w] == (P(None, "ep", None, None) if mode == "zero1" else P(None, "ep", "dp", None))
    assert specs["['opt'][1].mu" + w] == P(None, "ep", "dp", None)  # experts over ep, their moments also over dp
    wq = "['dense_layers']['attn']['wq_a'].value"
    assert specs["['opt'][1].nu" + wq] == P(None, ("dp", "ep"), None)  # replicated weight: over dp x ep
    assert ("dp" in axes(specs["['params']" + wq])) == (mode == "fsdp")
    moments = [k for k in specs if k.startswith("['opt'][1].mu") or k.startswith("['opt'][1].nu")]
    assert len(moments) == 2 * sum(k.startswith("['params']") for k in specs)
    for k in moments:  # every moment with a dimension divisible by dp is split over dp
        if any(n % 2 == 0 for n in shapes[k]):
            assert "dp" in axes(specs[k]), k
    assert specs["['step']"] == P() and specs["['bias']['moe_layers']['ffn']['expert_bias'].value"] == P(None, "ep")


@pytest.mark.parametrize("n_group, topk_group, ep", [(4, 2, 2), (4, 2, 4), (4, 2, 8), (2, 1, 8), (8, 3, 4)])
def test_tokens_reach_at_most_topk_group_expert_parallel_groups(n_group, topk_group, ep):
    """Node-limited routing: with the mesh aligned, a token's experts lie in <= topk_group EP groups, also when
    the bias pushes every token towards the same experts."""
    cfg = TINY.replace(n_routed_experts=16, num_experts_per_tok=4, n_group=n_group, topk_group=topk_group)
    validate_mesh({"ep": ep}, cfg)
    node_of = ep_groups_of_experts(cfg, ep)
    x = jax.random.normal(jax.random.key(0), (256, cfg.hidden_size))
    router = jax.random.normal(jax.random.key(1), (cfg.hidden_size, 16))
    for bias in (jnp.zeros(16), jnp.zeros(16).at[0].set(5.0), jnp.linspace(3.0, -3.0, 16)):
        experts = np.asarray(route(x, router, bias, cfg).experts_TK)
        nodes = [len(set(node_of[row])) for row in experts]
        assert max(nodes) <= topk_group
    if node_of.max() + 1 > topk_group:  # without the group limit tokens spread wider (the check above can fail)
        free = cfg.replace(n_group=1, topk_group=1)
        experts = np.asarray(route(x, router, None, free).experts_TK)
        assert max(len(set(node_of[row])) for row in experts) > topk_group


def test_cli_and_train_refuse_bad_meshes(tmp_path, capsys):
    assert main(["train", "--workdir", str(tmp_path / "a"), "--mesh", "dp=2,zz=4", "--steps", "1"]) == 2
    assert "unknown axis 'zz'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pipeline parallelism"):
        train(RunArgs(workdir=str(tmp_path / "b"), steps=1, mesh="pp=2"))
    with pytest.raises(ValueError, match="there are 8"):
        train(RunArgs(workdir=str(tmp_path / "c"), steps=1, mesh="dp=4,ep=4", data=[str(tmp_path / "x.txt")]))


def test_embedding_lookup_is_per_rank_and_its_gradient_sums_over_ranks():
    """sharding.rules.embedding_lookup under a dp=2,ep=4 mesh: the values and the table gradient of a plain
    jnp.take (tokens [D, B, T] as the MTP modules look them up), and the lookup runs per data-parallel rank: no
    gather, the table gradient all-reduced. (At this size the partitioner also keeps a plain lookup local; the
    gather it chose for the plain lookup inside the V3 pipeline step shows only in `dsv3 plan --compile`.)"""
    from sharding.rules import embedding_lookup

    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((50, 6)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 8, 5)), jnp.int32)
    tokens = tokens.at[:, :, 0].set(7)  # a token every rank looks up
    w = jnp.asarray(rng.standard_normal((2, 8, 5, 6)), jnp.float32)

    def loss(lookup, t):
        return jnp.sum(lookup(t, tokens) * w)

    plain = lambda t, i: jnp.take(t, i, axis=0)  # noqa: E731
    expected = jax.value_and_grad(lambda t: loss(plain, t))(table)
    mesh = build_mesh("dp=2,ep=4")
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(lambda t: loss(embedding_lookup, t)))
        got = step(table)
        hlo = step.lower(table).compile().as_text()
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-6)
    assert "all-gather" not in hlo and "all-reduce" in hlo  # each rank's tokens stay; the table gradient is summed
