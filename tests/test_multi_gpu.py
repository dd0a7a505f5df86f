"""A host with several GPUs: each trial gets a GPU of its own and they run side by side; Serve puts
one replica on each GPU. Checked on a real local Ray instance whose head declares 2 GPUs: Ray
assigns them (ray.get_gpu_ids, CUDA_VISIBLE_DEVICES) exactly as on a GPU host, but the fake GPU is
only a resource, so the trials and replicas compute on the CPU. What each trial and replica says
about its device ("qlora-ray device:" lines, qlora_ray/devices.py) is read back with the parser
bench/multi_gpu.sh's summary uses, so the bench and the code agree on the format.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import requests

from qlora_ray.devices import DEVICE_TAG, device_note
from tests.conftest import ROOT
from tests.test_serve import SERVE_ARGS, ServeApp


def _summary_module():
    spec = importlib.util.spec_from_file_location("multi_gpu_summary", ROOT / "bench" / "multi_gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUMMARY = _summary_module()


def test_device_note_reads_back_through_the_bench_parser(tmp_path):
    import torch

    note = device_note(torch.nn.Linear(2, 2), role="trial", trial_id="t1")
    assert note.startswith(DEVICE_TAG) and SUMMARY.DEVICE_TAG == DEVICE_TAG
    log = tmp_path / "log"
    log.write_text(f"(pid=1) \x1b[36m{note}\x1b[0m\nnoise\n(pid=1) {note}\n")  # Ray's prefix and colours
    [parsed] = SUMMARY.device_notes(log)  # the repeated line counts once
    assert parsed["role"] == "trial" and parsed["trial_id"] == "t1" and parsed["device"] == "cpu"


@pytest.fixture
def two_gpu_head():
    """A Ray head node of its own with 2 CPUs and 2 (declared) GPUs; shut down by its own processes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
    try:
        yield cluster
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def test_trials_get_a_gpu_each_and_run_side_by_side(two_gpu_head, tmp_path, capsys):
    from qlora_ray import sweep
    from qlora_ray.config import load_config

    config = load_config(overrides={
        "output_dir": str(tmp_path / "runs"),
        "data": {"train_size": 32, "eval_size": 8},
        # Long enough (~20 s a trial here) that a second trial process starts before the first trial ends.
        "train": {"max_steps": 100, "eval_every": 50, "batch_size": 4, "eval_batch_size": 8},
        "search": {"num_samples": 2, "algorithm": "grid", "early_stopping": "none", "r": [4, 8], "lora_alpha": [16],
                   "learning_rate": [1e-3], "target_modules": ["qv"], "gpus_per_trial": 1, "top_k": 1},
    })
    summary = sweep.run(sweep.prepare(config), address=two_gpu_head.address)
    out = capsys.readouterr().out
    assert summary["trials"] == 4 and summary["completed"] == 4, summary
    assert "{'cpu': 1, 'gpu': 1} each, up to 2 at once (cluster has 2 CPUs, 2 GPUs)" in out, out[-3000:]

    # Each trial's own line (its worker's stdout, in this Ray instance's session logs).
    logs = Path(two_gpu_head.head_node.get_session_dir_path()) / "logs"
    joined = tmp_path / "workers.log"
    joined.write_text("".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker-*.out"))))
    notes = {n["trial_id"]: n for n in SUMMARY.device_notes(joined) if n.get("role") == "trial"}
    reports = {}
    for result in (tmp_path / "runs" / "tune").glob("*/trial-*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        reports[rows[-1]["trial_id"]] = rows
    assert set(notes) == set(reports) and len(notes) == 4, (notes, list(reports))
    for note in notes.values():  # the GPU Ray gave the trial is the one its process sees
        assert note["ray_gpu_ids"] == [note["cuda_visible_devices"]], note
        assert note["cuda_visible_devices"] in {"0", "1"}, note
    assert {n["cuda_visible_devices"] for n in notes.values()} == {"0", "1"}

    # Trials whose runs overlapped in time held different GPUs, and some did overlap.
    span = {tid: (rows[-1]["timestamp"] - rows[-1]["time_total_s"], rows[-1]["timestamp"])
            for tid, rows in reports.items()}
    overlapping = [(a, b) for a in span for b in span if a < b
                   and span[a][0] < span[b][1] and span[b][0] < span[a][1]]
    assert overlapping, span
    for a, b in overlapping:
        assert notes[a]["cuda_visible_devices"] != notes[b]["cuda_visible_devices"], (notes[a], notes[b])


def test_serve_puts_one_replica_on_each_gpu(sweep, tmp_path):
    registry = tmp_path / "registry"
    shutil.copytree(sweep["out"] / "registry", registry)
    app = ServeApp(registry, tmp_path, SERVE_ARGS | {"num_replicas": 2}, num_gpus=2)
    app.start()
    try:
        for _ in range(4):  # both replicas answer (the router spreads requests); the log lines come once each
            r = requests.post(f"{app.url}/v1/summarize", json={"text": "def add(a, b):\n    return a + b",
                                                               "max_new_tokens": 4}, timeout=120)
            assert r.status_code == 200, r.text
        replicas = {}
        for _ in range(30):
            replicas = {n["replica_id"]: n for n in SUMMARY.device_notes(app.log) if n.get("role") == "replica"}
            if len(replicas) == 2:
                break
            time.sleep(1)
    finally:
        app.stop()
    assert len(replicas) == 2, app.tail()
    assert sorted(n["cuda_visible_devices"] for n in replicas.values()) == ["0", "1"], replicas
    assert all(n["ray_gpu_ids"] == [n["cuda_visible_devices"]] for n in replicas.values()), replicas
