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


def test_cluster_yaml_restricts_network_and_iam():
    """Every node in a security group of the user's (Ray's own would open SSH to the world) with an
    instance profile of the user's (Ray's default role has EC2 and S3 full access); services on
    the head bind to localhost."""
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    for name, node in config["available_node_types"].items():
        assert node["node_config"]["SecurityGroupIds"], name
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    profiles = {n["node_config"]["IamInstanceProfile"]["Arn"] for n in config["available_node_types"].values()}
    assert len(profiles) == 2  # head and workers get different (least) privileges
    assert "0.0.0.0" not in "\n".join(line.split("#")[0] for line in text.splitlines())
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
