"""cluster.yaml passes the validator `ray up` runs, with a CPU head and 1-GPU autoscaling workers."""

from __future__ import annotations

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import ROOT


def test_cluster_yaml_is_valid():
    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)  # raises on a bad config
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(n["resources"]["GPU"] == 1 for n in workers)
    assert all(n["min_workers"] < n["max_workers"] for n in workers)  # autoscaling
