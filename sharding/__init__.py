"""Mesh construction, the logical-axis rule table, expert parallelism and pipeline schedules (DESIGN §2).

Model parameters carry logical axis names (metadata `out_sharding`, e.g. ('layers', 'embed', 'q_lora'));
`rules.RULES` maps them to the mesh axes of `mesh.build_mesh` ('pp', 'dp', 'ep', 'tp'); `expert_parallel` runs the
routed experts over 'ep' with all-to-all dispatch inside `jax.shard_map`.
"""

from sharding.expert_parallel import ep_groups_of_experts, experts_split, moe_expert_parallel
from sharding.mesh import MESH_AXES, build_mesh, initialize_distributed, parse_mesh_spec, validate_mesh
from sharding.rules import RULES, constrain, logical_to_spec, train_state_shardings

__all__ = ["MESH_AXES", "RULES", "build_mesh", "constrain", "ep_groups_of_experts", "experts_split",
           "initialize_distributed", "logical_to_spec", "moe_expert_parallel", "parse_mesh_spec",
           "train_state_shardings", "validate_mesh"]
