"""Sweeps size themselves from what the cluster can scale to, not what is up at the start.

The real test starts a fake autoscaling cluster (Ray's fake_multinode node provider: its
"nodes" are more raylets on this machine, launched and terminated by the real autoscaler
monitor) with a CPU-only head and GPU workers that scale from zero, and runs a real sweep
against it. The fake GPU is only a resource: the trials still train on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from qlora_ray.cluster import limits_from_autoscaling_config, limits_from_cluster_config
from qlora_ray.config import SearchSettings
from qlora_ray.search import max_concurrency, trial_resources
from tests.conftest import ROOT


def test_auto_gpus_and_concurrency_follow_what_the_cluster_can_scale_to():
    auto = SearchSettings(num_samples=8)
    # A CPU head whose GPU workers scale from zero: capacity() counts the GPUs it can add.
    can_scale = {"CPU": 32.0, "GPU": 8.0, "can_scale": True}
    assert trial_resources(auto, can_scale) == {"cpu": 1, "gpu": 1}
    assert max_concurrency(auto, {"cpu": 1, "gpu": 1}, can_scale) == 8
    assert max_concurrency(SearchSettings(num_samples=20), {"cpu": 1, "gpu": 1}, can_scale) == 8  # GPUs bound it
    assert max_concurrency(SearchSettings(num_samples=3), {"cpu": 1, "gpu": 1}, can_scale) == 3  # never > trials
    assert max_concurrency(auto, {"cpu": 8, "gpu": 1}, can_scale) == 4  # CPUs bound it
    assert max_concurrency(auto, {"cpu": 1, "gpu": 0.5}, {"CPU": 32.0, "GPU": 3.0}) == 6
    assert max_concurrency(auto, {"cpu": 1, "gpu": 0.2}, {"CPU": 32.0, "GPU": 0.6}) == 3  # not 2.999...
    # A node type without a limit (inf): as many as there are trials.
    assert max_concurrency(auto, {"cpu": 1, "gpu": 1}, {"CPU": float("inf"), "GPU": float("inf")}) == 8
    # A CPU-only cluster: no GPUs; concurrency from its CPUs, now or scaled.
    assert trial_resources(auto, {"CPU": 2.0, "GPU": 0.0, "can_scale": False}) == {"cpu": 1, "gpu": 0}
    assert max_concurrency(auto, {"cpu": 1, "gpu": 0}, {"CPU": 2.0, "GPU": 0.0}) == 2
    assert max_concurrency(auto, {"cpu": 1, "gpu": 0}, {"CPU": 6.0, "GPU": 0.0, "can_scale": True}) == 6
    # Explicit settings win: a GPU preset asks for its GPU before one is up; a set concurrency stays.
    assert trial_resources(SearchSettings(gpus_per_trial=1), {"CPU": 4.0, "GPU": 0.0}) == {"cpu": 1, "gpu": 1}
    assert trial_resources(SearchSettings(gpus_per_trial=0), can_scale) == {"cpu": 1, "gpu": 0}
    assert max_concurrency(SearchSettings(max_concurrent_trials=5), {"cpu": 1, "gpu": 1}, {"CPU": 1.0}) == 5
    # Ray's plain cluster_resources() dict still works (no can_scale key).
    assert trial_resources(auto, {"CPU": 16.0, "GPU": 2.0}) == {"cpu": 1, "gpu": 1}


def test_the_shipped_cluster_yaml_can_scale_to_eight_gpus():
    import yaml

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # The head as it runs (CPU 0): 8 g5.xlarge workers of 4 CPUs and 1 GPU.
    assert limits_from_autoscaling_config(config, {"CPU": 0.0}) == {"CPU": 32.0, "GPU": 8.0, "can_scale": True}
    # The cluster-wide max_workers caps the worker nodes of all types together.
    config["max_workers"] = 3
    assert limits_from_autoscaling_config(config, {})["GPU"] == 3.0
    config["available_node_types"]["gpu_worker"]["min_workers"] = 8
    config["max_workers"] = 8
    assert limits_from_autoscaling_config(config, {})["can_scale"] is False


def test_a_reported_cluster_config_counts_its_node_groups():
    """The ClusterConfig an autoscaler may report to the GCS (what Ray Data and Train read)."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, low, high in [("head", {"CPU": 4}, 0, 1), ("gpu", {"CPU": 4, "GPU": 1}, 0, 8),
                                       ("cpu", {"CPU": 16}, 1, 2)]:
        group = config.node_group_configs.add(name=name, min_count=low, max_count=high)
        group.resources.update(resources)
    # The head's own group (max 1, the live head's shape) is not counted twice.
    assert limits_from_cluster_config(config, {"CPU": 4.0}) == {"CPU": 68.0, "GPU": 8.0, "can_scale": True}
    config.max_resources["GPU"] = 2
    assert limits_from_cluster_config(config, {"CPU": 4.0})["GPU"] == 2.0
    config.node_group_configs[1].max_count = -1  # no limit
    assert limits_from_cluster_config(config, {"CPU": 4.0})["CPU"] == float("inf")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class PrivateAutoscalingCluster:
    """`ray.cluster_utils.AutoscalingCluster`, minus what makes it unusable here.

    The same cluster: a head started with `--autoscaling-config` (a fake_multinode config) and
    RAY_FAKE_CLUSTER=1, so the real autoscaler monitor launches and terminates worker nodes.
    But Ray 2.60's AutoscalingCluster reads an example.yaml its wheel does not ship, runs
    `ray stop --force` on start and shutdown (every Ray process on the machine, other
    sessions' included) and `ray start`, which makes every later `ray.init()` on the machine
    connect to it. This one starts the head in this process (like `ray.cluster_utils.Cluster`)
    on free ports and in a private temp dir, and stops only the processes it started.
    """

    def __init__(self, head_resources: dict, worker_node_types: dict, **config):
        self.head_resources = dict(head_resources)
        head = {"resources": self.head_resources, "node_config": {}, "max_workers": 0}
        self.config = {
            "cluster_name": "fake_multinode", "max_workers": 8, "head_node_type": "ray.head.default",
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "available_node_types": {"ray.head.default": head, **worker_node_types},
            "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], **config,
        }
        self.head = None
        self.address = None

    def start(self):
        import ray._private.node
        import ray._private.parameter
        import ray._private.services

        # Short: the raylet's socket paths under it must stay within the 107-byte limit.
        self.temp_dir = tempfile.mkdtemp(prefix="qr-as-", dir="/tmp")
        port = _free_port()
        self.config["provider"]["gcs_address"] = f"{ray._private.services.get_node_ip_address()}:{port}"
        config_file = Path(self.temp_dir) / "autoscaling.json"
        config_file.write_text(json.dumps(self.config))
        resources = dict(self.head_resources)
        params = ray._private.parameter.RayParams(
            gcs_server_port=port, num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
            resources=resources, object_store_memory=150 * 1024**2, min_worker_port=0, max_worker_port=0,
            include_dashboard=False, temp_dir=self.temp_dir,
            autoscaling_config=str(config_file),
        )
        # The monitor inherits these: the fake node provider, a 1 s autoscaler loop, and on
        # SIGTERM it terminates the worker nodes it launched.
        env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTOSCALER_FATESHARE_WORKERS": "1"}
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            self.head = ray._private.node.Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.address = self.head.gcs_address

    def shutdown(self):
        """The monitor first (it takes its worker nodes down), then the head's own processes;
        anything the monitor started that outlives it is killed by its pid."""
        import psutil
        from ray._private import ray_constants

        if self.head is None:
            return
        monitors = self.head.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
        started = []
        for info in monitors:
            try:
                monitor = psutil.Process(info.process.pid)
                started += monitor.children(recursive=True)
                monitor.send_signal(signal.SIGTERM)
                monitor.wait(timeout=30)
            except (psutil.Error, OSError):
                pass
        self.head.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        for proc in started:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(started, timeout=10)
        self.head = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def autoscaling_cluster():
    """A CPU-only head (1 CPU) and a GPU node type of {CPU: 1, GPU: 1}, from 0 up to 2 nodes."""
    cluster = PrivateAutoscalingCluster(
        head_resources={"CPU": 1},
        worker_node_types={"gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {},
                                          "min_workers": 0, "max_workers": 2}},
    )
    cluster.start()
    try:
        yield cluster
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


class GpuWatcher(threading.Thread):
    """Polls the GCS while the sweep runs (in this process, once sweep.run has connected it): the
    trials' placement groups that hold a GPU (created, not yet removed), and on which node."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.snapshots = threading.Event(), []

    def run(self):
        import ray

        while not self.stop.wait(0.5):
            try:
                table = ray.util.placement_group_table() if ray.is_initialized() else {}
            except Exception:  # connecting, or a slow poll
                continue
            self.snapshots.append({pg: group["bundles_to_node_id"].get(0) for pg, group in table.items()
                                   if group["state"] == "CREATED" and group["bundles"][0].get("GPU")})


def test_sweep_on_a_cluster_that_scales_gpu_workers_from_zero(autoscaling_cluster, tmp_path, capsys):
    import ray

    from qlora_ray import sweep
    from qlora_ray.config import load_config

    config = load_config(overrides={
        "output_dir": str(tmp_path / "runs"),
        "data": {"train_size": 32, "eval_size": 8},
        "train": {"max_steps": 4, "eval_every": 2, "batch_size": 4, "eval_batch_size": 8},
        # Pinned (nothing to search) and no early stopping: three equal trials.
        "search": {"num_samples": 3, "r": [4], "lora_alpha": [16], "learning_rate": [1e-3],
                   "target_modules": ["qv"], "grace_period": 2, "top_k": 1},
    })
    assert config.search.gpus_per_trial is None  # auto
    prepared = sweep.prepare(config)
    watcher = GpuWatcher()
    watcher.start()
    try:
        summary = sweep.run(prepared, address=autoscaling_cluster.address)
    finally:
        watcher.stop.set()
        watcher.join()
    out = capsys.readouterr().out
    assert summary["trials"] == 3 and summary["errored"] == 0, summary
    # Sized from what the cluster can scale to (head 1 CPU + 2 x {CPU 1, GPU 1}), not the 1-CPU
    # head it started as: 1 GPU per trial (auto), 2 at once.
    assert "{'cpu': 1, 'gpu': 1} each, up to 2 at once (cluster can scale to 3 CPUs, 2 GPUs)" in out, out[-3000:]

    # The autoscaler added both GPU workers; the head has no GPU.
    nodes = [n for n in ray.nodes() if n["Alive"]]
    head = [n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"]]
    gpu_nodes = {n["NodeID"] for n in nodes if n["Resources"].get("GPU") == 1} - set(head)
    assert len(head) == 1 and len(gpu_nodes) == 2, nodes
    # Every trial ran on a GPU worker, never the head (the GCS's actor table: Tune's trial actors; a
    # finished trial's actor may run the next trial: warm trials).
    trials = [a for a in ray._private.state.actors().values() if a["ActorClassName"] == "ImplicitFunc"]
    assert 1 <= len(trials) <= 3 and {a["Address"]["NodeID"] for a in trials} <= gpu_nodes, (trials, gpu_nodes)
    # Trials held both GPU workers at once: their placement groups ({CPU: 1, GPU: 1}, a trial's
    # resources from its start to its end) were created on the two nodes at the same time.
    assert all(set(s.values()) <= gpu_nodes for s in watcher.snapshots), watcher.snapshots
    assert max(len(set(s.values())) for s in watcher.snapshots) == 2, watcher.snapshots
