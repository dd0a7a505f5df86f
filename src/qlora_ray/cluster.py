"""What the Ray cluster holds now, and what its autoscaler can grow it to.

`ray.cluster_resources()` only counts the nodes that are up. A cluster that starts with a
CPU-only head and GPU workers scaling from zero (`cluster.yaml`) shows no GPU at all until a
GPU task is pending, so a sweep that sized itself from it would ask for 0 GPUs per trial
(and the autoscaler would never add a GPU node) and run one trial at a time.

`capacity()` answers with the larger of the two: the resources of the live nodes, and the
resources of the head plus every worker node type at its `max_workers` (capped by the
cluster-wide `max_workers`). Ray 2.60 has no public API for the second, so it is read, in
this order, from:

1. The cluster config an autoscaler reports to the GCS
   (`ray._private.state.state.get_cluster_config()`: node groups with resources, min and max
   counts). Ray Data and Ray Train read the same record; in Ray 2.60 no open-source
   autoscaler writes it yet (hosted ones may), so it is usually empty.
2. The autoscaling config file the cluster's autoscaler monitor runs with: the
   `--autoscaling-config=PATH` argument of the head node's `monitor.py` process (autoscaler v1
   and v2 start it the same way, from `ray start --head --autoscaling-config=...`; `ray up`
   passes `~/ray_bootstrap_config.yaml`). It is read on the head node: directly when this
   driver runs there, else by a zero-CPU task pinned to the head.

Both are private to Ray and may change: any failure means "no autoscaler known" and the
answer falls back to the live nodes. KubeRay runs its autoscaler in a separate container
that reads no file, so there too only the live nodes count; so does a node type that leaves
its `resources` for the autoscaler to look up from the instance type (declare them, as
`cluster.yaml` does).

`gpu_memory_gb()` answers how much memory those GPUs have, for `--gpus-per-trial auto` on a driver
that may have no GPU: measured on the live GPU nodes (NVML), else from Ray's accelerator types.
"""

from __future__ import annotations

import math
import os

import ray

HEAD_RESOURCE = "node:__internal_head__"
PROBE_TIMEOUT_S = 30.0
KEYS = ("CPU", "GPU")


def capacity() -> dict[str, float]:
    """{"CPU": n, "GPU": n, "can_scale": bool} for the connected cluster (call after ray.init).

    CPU and GPU: the most the cluster holds now or can scale to, head included (math.inf for a
    node type without a limit). can_scale: whether its autoscaler can add any node.
    """
    now = ray.cluster_resources()
    result = {key: float(now.get(key, 0)) for key in KEYS}
    limits = None
    for source in (_from_reported_config, _from_autoscaling_config):
        try:
            limits = source()
        except Exception:  # private Ray internals: anything unexpected means "unknown"
            limits = None
        if limits:
            break
    if not limits:
        return {**result, "can_scale": False}
    return {**{key: max(result[key], float(limits[key])) for key in KEYS}, "can_scale": bool(limits["can_scale"])}


def _head() -> tuple[str | None, dict[str, float]]:
    """The live head node's id and resources."""
    for node in ray.nodes():
        if node.get("Alive") and HEAD_RESOURCE in node.get("Resources", {}):
            return node["NodeID"], node["Resources"]
    return None, {}


def _add_workers(total: dict[str, float], workers: list[tuple[dict, float, float]], max_nodes: float) -> bool:
    """Add to `total` the most of each resource that at most `max_nodes` worker nodes can bring
    (largest nodes of that resource first); `workers` holds (resources, min, max) per node type.
    Returns whether any node type can grow."""
    for key in KEYS:
        budget = max_nodes
        for resources, _, count in sorted(workers, key=lambda w: -float(w[0].get(key, 0))):
            take = min(count, budget)
            if take > 0 and resources.get(key, 0):
                total[key] += take * float(resources[key])
            budget -= take
            if budget <= 0:
                break
    return any(count > low for _, low, count in workers)


def _from_reported_config() -> dict | None:
    """Source 1: the ClusterConfig an autoscaler reported to the GCS, if any."""
    from ray._private import state

    config = state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return limits_from_cluster_config(config, _head()[1])


def limits_from_cluster_config(config, head: dict[str, float]) -> dict:
    """CPU/GPU of the live head (`head`) plus every node group of a reported
    `autoscaler_pb2.ClusterConfig` at its max_count (-1: no limit), within its max_resources."""
    total = {key: float(head.get(key, 0)) for key in KEYS}
    workers = []
    for group in config.node_group_configs:
        resources = dict(group.resources)
        if not resources or group.max_count == 0:
            continue
        if group.max_count == 1 and all(float(resources.get(k, 0)) == float(head.get(k, 0)) for k in KEYS):
            continue  # the head's own group, as Ray Data reads it (counted from the live head)
        count = math.inf if group.max_count == -1 else group.max_count
        workers.append((resources, group.min_count, count))
    can_scale = _add_workers(total, workers, math.inf)
    for key in KEYS:
        if key in config.max_resources:
            total[key] = min(total[key], float(config.max_resources[key]))
    return {**total, "can_scale": can_scale}


def _from_autoscaling_config() -> dict | None:
    """Source 2: the autoscaling config file of the head node's monitor process."""
    config = _autoscaling_config()
    if not config:
        return None
    return limits_from_autoscaling_config(config, _head()[1])


def _autoscaling_config() -> dict | None:
    """The autoscaling config (a dict) of the head node's monitor process, read on the head node."""
    head_id, _ = _head()
    if head_id is None:
        return None
    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]
    if ray.get_runtime_context().get_node_id() == head_id:
        config = read_autoscaling_config(port)
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(read_autoscaling_config).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False), max_retries=0
        )
        ref = task.remote(port)
        try:
            config = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except Exception:
            ray.cancel(ref, force=True)
            raise
    return config


def read_autoscaling_config(gcs_port: str) -> dict | None:
    """On the head node: the autoscaling config (a dict) of the autoscaler monitor serving the
    GCS on `gcs_port`, or None when that monitor runs without one (no autoscaling)."""
    import psutil
    import yaml

    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if not any(arg.endswith("monitor.py") for arg in cmdline[:4]):
                continue
            if not any(arg.startswith("--gcs-address=") and arg.rsplit(":", 1)[-1] == gcs_port for arg in cmdline):
                continue
            path = next((arg.split("=", 1)[1] for arg in cmdline if arg.startswith("--autoscaling-config=")), None)
            if not path:
                return None
            path = os.path.expanduser(path)
            if not os.path.isabs(path):
                path = os.path.join(proc.cwd(), path)
            with open(path) as f:
                return yaml.safe_load(f)
        except (psutil.Error, OSError):
            continue
    return None


def limits_from_autoscaling_config(config: dict, head: dict[str, float]) -> dict:
    """CPU/GPU of the head (`head`: its live resources, else its node type's) plus the worker
    node types at their max_workers, at most the config's `max_workers` worker nodes in all."""
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    cluster_max = config.get("max_workers")
    cluster_max = math.inf if cluster_max is None else float(cluster_max)
    head = head or (types.get(head_type) or {}).get("resources") or {}
    total = {key: float(head.get(key, 0)) for key in KEYS}
    workers = []
    for name, node_type in types.items():
        if name == head_type:
            continue
        count = node_type.get("max_workers")
        count = cluster_max if count is None else min(float(count), cluster_max)
        workers.append((node_type.get("resources") or {}, float(node_type.get("min_workers") or 0), count))
    can_scale = _add_workers(total, workers, cluster_max)
    return {**total, "can_scale": can_scale}


# GPU memory (GB, 10^9 bytes) by Ray's accelerator_type, the smallest model Ray names so (an "H100" may be an
# 80 GB SXM/PCIe or a 94 GB NVL; a "V100" 16 or 32 GB): too low a figure only packs fewer trials per GPU.
KNOWN_GPU_GB = {"T4": 15.0, "P4": 7.5, "P100": 16.0, "V100": 16.0, "A10G": 23.0, "L4": 22.0, "L40S": 45.0,
                "A100": 40.0, "A100-40G": 40.0, "A100-80G": 80.0, "H100": 80.0, "H200": 141.0, "H20": 96.0,
                "B200": 180.0}
ACCELERATOR_PREFIX = "accelerator_type:"


def gpu_memory_gb() -> tuple[float | None, str]:
    """(GB, how it is known) of one GPU of the connected cluster's GPU nodes, the smallest where they differ,
    for sizing GPU shares on a driver that may have no GPU itself (call after ray.init). GB is None when it
    cannot be known; the text then says why.

    A live GPU node is measured (NVML, by a tiny zero-resource task on it), or else known by its
    `accelerator_type` resource (KNOWN_GPU_GB). With no GPU node up (an autoscaler adds them later),
    the GPU node types the autoscaler knows (see capacity()) must all declare a known accelerator_type.
    """
    live = [n for n in ray.nodes() if n.get("Alive") and float(n.get("Resources", {}).get("GPU", 0)) > 0]
    measured = _measure(live)
    node_types = []
    for source in (_reported_node_types, _autoscaling_node_types):
        try:
            node_types = source()
        except Exception:  # private Ray internals, as in capacity()
            node_types = []
        if node_types:
            break
    return memory_from(live, measured, node_types)


def memory_from(live: list[dict], measured: list[float | None], node_types: list[dict]) -> tuple[float | None, str]:
    """gpu_memory_gb()'s decision: `live` GPU nodes (ray.nodes() entries) with their `measured` GB (None: not
    measured), and the resources of the autoscaler's node types."""
    figures, unknown = [], []
    for node, gb in zip(live, measured, strict=True):
        kind = _accelerator(node.get("Resources", {}))
        if gb is None and kind in KNOWN_GPU_GB:
            gb = KNOWN_GPU_GB[kind]
        if gb is not None:
            figures.append(gb)
        else:
            unknown.append(f"the GPU node {node.get('NodeManagerAddress', '?')} (NVML could not measure it; "
                           f"accelerator_type: {kind or 'none'})")
    for resources in node_types:
        if float(resources.get("GPU", 0)) > 0:
            kind = _accelerator(resources)
            if kind in KNOWN_GPU_GB:
                figures.append(KNOWN_GPU_GB[kind])
            elif not live:  # a live GPU node's own figure stands for the node types it comes from
                unknown.append(f"a GPU node type without a known accelerator_type ({kind or 'none declared'})")
    if unknown or not figures:
        reason = ("no GPU node is up to measure and the autoscaler's GPU node types declare no known "
                  "accelerator_type") if not unknown else "nothing tells the GPU memory of " + ", ".join(unknown)
        return None, reason
    how = "measured on the GPU nodes" if any(m is not None for m in measured) else "from Ray's accelerator type"
    return min(figures), how


def _accelerator(resources: dict) -> str | None:
    return next((key[len(ACCELERATOR_PREFIX):] for key in resources if key.startswith(ACCELERATOR_PREFIX)), None)


def _measure(nodes: list[dict]) -> list[float | None]:
    """The smallest GPU memory on each node, by NVML (None where it cannot be read: no NVIDIA driver)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(nvml_memory_gb)
    refs = [task.options(num_cpus=0, max_retries=0,
                         scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
            for node in nodes]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    figures = []
    for ref in refs:
        try:
            figures.append(ray.get(ref, timeout=0))
        except Exception:  # failed, or still waiting for a worker
            ray.cancel(ref, force=True)
            figures.append(None)
    return figures


def nvml_memory_gb() -> float | None:
    """On a node: the total memory of its smallest NVIDIA GPU (NVML sees every GPU of the node, and
    needs neither CUDA nor torch: fast, and no GPU has to be free), or None without an NVIDIA driver."""
    try:
        import pynvml  # nvidia-ml-py, where installed
    except ImportError:
        from ray._private.thirdparty import pynvml  # the copy Ray detects GPUs with
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        totals = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total for i in range(count)]
        return min(totals) / 1e9 if totals else None
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def _reported_node_types() -> list[dict]:
    from ray._private import state

    config = state.state.get_cluster_config()
    return [dict(group.resources) for group in config.node_group_configs] if config is not None else []


def _autoscaling_node_types() -> list[dict]:
    config = _autoscaling_config() or {}
    return [node_type.get("resources") or {} for node_type in (config.get("available_node_types") or {}).values()]
