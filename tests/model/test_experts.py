"""model/experts.py as the expert-parallel receiver uses it (one slot per row, gate 1, sentinel ids outside
[0, E)) against a NumPy SwiGLU per row; who decides on expert parallelism; no mesh axis named in model code."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import TINY
from dsv3_jax.model.experts import Routing, routed_experts, routed_experts_split
from sharding.expert_parallel import experts_split, moe_expert_parallel

ROOT = pathlib.Path(__file__).resolve().parents[2]
E, D, F, P = 4, 8, 6, 23


@pytest.mark.parametrize("tile", [0, 1, 4])  # 0: ragged_dot, the accelerators' default
def test_rows_with_ids_outside_the_experts_give_zeros(tile):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((P, D)).astype(np.float32)
    ids = rng.integers(0, E, P).astype(np.int32)
    ids[::3], ids[1::7] = E, -1  # the expert-parallel send buffer's padding rows, and a masked slot
    w_gate, w_up = (rng.standard_normal((E, D, F)).astype(np.float32) for _ in range(2))
    w_down = rng.standard_normal((E, F, D)).astype(np.float32)
    routing = Routing(jnp.ones((P, 1), jnp.float32), jnp.asarray(ids)[:, None], None)
    y, counts = routed_experts(jnp.asarray(x), routing, jnp.asarray(w_gate), jnp.asarray(w_up),
                               jnp.asarray(w_down), tile=tile)
    expected = np.zeros((P, D))
    for p, e in enumerate(ids):
        if 0 <= e < E:
            g, u = x[p] @ w_gate[e], x[p] @ w_up[e]
            expected[p] = (g / (1 + np.exp(-g)) * u) @ w_down[e]
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(ids[(ids >= 0) & (ids < E)], minlength=E))


# E=16, K=2: a switch per pair (2 tokens), tiles of one row (6 tokens), tiles of 1.25 x the mean load (skewed:
# expert 3 in every token's first slot, its segment many tiles long)
@pytest.mark.parametrize("tokens,skewed", [(2, False), (6, False), (9, False), (40, True)])
def test_decoder_form_with_separate_expert_arrays_matches_numpy(tokens, skewed):
    e, k = 16, 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((tokens, D)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    if skewed:
        ids[:, 0] = 3
        ids[:, 1] = np.where(ids[:, 1] == 3, 4, ids[:, 1])
    ids[0, 1] = -1  # a masked slot contributes nothing
    gates = rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)
    w_gate, w_up = (rng.standard_normal((e, D, F)).astype(np.float32) for _ in range(2))
    w_down = rng.standard_normal((e, F, D)).astype(np.float32)
    routing = Routing(jnp.asarray(gates), jnp.asarray(ids), None)
    y, counts = routed_experts_split(jnp.asarray(x), routing, *(tuple(jnp.asarray(w)) for w in (w_gate, w_up,
                                                                                                 w_down)))
    expected = np.zeros((tokens, D))
    for t in range(tokens):
        for j in range(k):
            if ids[t, j] >= 0:
                g, u = x[t] @ w_gate[ids[t, j]], x[t] @ w_up[ids[t, j]]
                expected[t] += gates[t, j] * (g / (1 + np.exp(-g)) * u) @ w_down[ids[t, j]]
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(ids[ids >= 0], minlength=e))


def test_sharding_decides_expert_parallelism():
    mesh = jax.sharding.AbstractMesh
    assert experts_split(mesh((2, 2), ("dp", "ep"))) and experts_split(mesh((2,), ("ep",)))
    assert not experts_split(mesh((4, 1), ("dp", "ep"))) and not experts_split(mesh((4,), ("dp",)))
    assert not experts_split()  # no mesh set
    e, d, f = TINY.n_routed_experts, TINY.hidden_size, TINY.moe_intermediate_size
    args = (jnp.zeros((2, 4, d)), jnp.zeros((d, e)), None, jnp.zeros((e, d, f)), jnp.zeros((e, d, f)),
            jnp.zeros((e, f, d)), TINY)
    with pytest.raises(ValueError, match="slack must be a positive finite number"):
        moe_expert_parallel(*args, mesh=mesh((2,), ("ep",)), slack=0.0)


def test_model_code_names_no_mesh_axis_and_expert_parallel_does_not_import_moe():
    for path in (ROOT / "dsv3_jax" / "model").glob("*.py"):
        strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not strings & {"pp", "dp", "ep", "tp"}, path.name
    tree = ast.parse((ROOT / "sharding" / "expert_parallel.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "dsv3_jax.model.experts" in imported and "dsv3_jax.model.moe" not in imported
