"""Mesh construction, the logical-axis rule table, expert parallelism and pipeline schedules (DESIGN §2).

Model parameters already carry logical axis names (metadata `out_sharding`, e.g. ('layers', 'embed', 'q_lora'));
the mapping of those names to mesh axes lands with the parallelism issue.
"""
