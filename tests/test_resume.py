"""Exact resume and failure handling, through the real CLI, Ray Tune and 4-bit tiny T5 trials.

Faults are injected with QLORA_RAY_FAULTS (see qlora_ray.faults); everything else is the
product as a user runs it.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TUNE, run_cli

# One pinned configuration (nothing to search), small enough for 2 CPU cores.
PINNED = ("--num-samples", "1", "--max-steps", "12", "--eval-every", "4", "--train-size", "64", "--eval-size", "8",
          "--r", "4", "--lora-alpha", "16", "--learning-rate", "3e-3", "--target-modules", "qv", "--address", "local")


def _run(out: Path, *args: str, faults: list[dict] | None = None) -> subprocess.CompletedProcess:
    env = {"QLORA_RAY_FAULTS": json.dumps(faults)} if faults else {}
    proc = run_cli("--output-dir", str(out), *args, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _results(out: Path, store: Path | None = None) -> dict[str, list[dict]]:
    """Tune's record of every trial: trial id -> one row per evaluation report."""
    experiment = next((store or out / "tune").glob("sweep-*"))
    return {d.name.removeprefix("trial-"): [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
            for d in sorted(experiment.glob("trial-*"))}


def _summary(out: Path) -> dict:
    return json.loads(next((out / "sweeps").glob("*/summary.json")).read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out, *PINNED)
    (rows,) = _results(out).values()
    assert [r["step"] for r in rows] == [4, 8, 12]
    return rows


def test_a_retried_trial_continues_the_same_loss_curve(uninterrupted, tmp_path):
    """Crash the trial after step 6 (its last checkpoint is step 4): Tune retries it, and the
    retry restores adapter, optimizer, LR schedule, RNG and data position from that checkpoint,
    so steps 8 and 12 report exactly what the uninterrupted run reported."""
    (tmp_path / "marks").mkdir()
    proc = _run(tmp_path / "runs", *PINNED,
                faults=[{"kind": "crash", "step": 6, "once": True, "marker_dir": str(tmp_path / "marks")}])
    assert list((tmp_path / "marks").iterdir()), "the crash was not injected"
    assert "injected crash after step 6" in proc.stdout + proc.stderr
    (rows,) = _results(tmp_path / "runs").values()
    assert [r["step"] for r in rows] == [4, 8, 12]  # step 4 reported once, not again after the retry
    for resumed, reference in zip(rows, uninterrupted, strict=True):
        for key in ("eval_loss", "train_loss", "rougeL"):
            assert resumed[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), (resumed["step"], key)
    assert _summary(tmp_path / "runs")["completed"] == 1


def test_out_of_memory_retries_with_half_the_micro_batch(uninterrupted, tmp_path):
    """Every step with a micro-batch above 4 runs out of memory: the trial retries at 4 x 2
    accumulation (the same effective batch of 8), finishes, and says so."""
    proc = _run(tmp_path / "runs", *PINNED, "--batch-size", "8",
                faults=[{"kind": "oom", "step": step, "above": 4} for step in range(1, 13)])
    assert "retrying with micro-batch 4 x 2 accumulation" in proc.stdout + proc.stderr
    (rows,) = _results(tmp_path / "runs").values()
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert all(r["micro_batch_size"] == 4 and r["oom_retries"] == 1 for r in rows)
    # Same examples per optimizer step: the curve follows the unsplit run's (not exactly: each
    # micro-batch's loss is a mean over its own tokens, so tokens weigh slightly differently).
    for split, reference in zip(rows, uninterrupted, strict=True):
        assert split["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-2)
    summary = _summary(tmp_path / "runs")
    assert summary["completed"] == 1 and summary["leaderboard"][0]["oom_retries"] == 1
    assert "out of memory 1x: micro-batch 4" in proc.stdout


def test_a_nan_trial_is_stopped_marked_ranked_last_and_not_published(custom_jsonl, tmp_path):
    (tmp_path / "marks").mkdir()
    out = tmp_path / "runs"
    proc = _run(out, "--dataset", str(custom_jsonl), "--text-column", "source_code", "--summary-column", "doc",
                "--num-samples", "3", "--max-steps", "12", "--eval-every", "4", "--train-size", "64",
                "--eval-size", "8", "--r", "4,8", "--top-k", "3", "--max-concurrent-trials", "1",
                "--address", "local",
                faults=[{"kind": "nan", "step": 5, "once": True, "marker_dir": str(tmp_path / "marks")}])
    summary = _summary(out)
    assert summary["diverged"] == 1 and summary["trials"] == 3, summary
    diverged = [r for r in summary["leaderboard"] if r["status"] == "diverged"]
    assert len(diverged) == 1
    assert summary["leaderboard"][-1]["trial_id"] == diverged[0]["trial_id"]  # ranked last
    (rows,) = [r for tid, r in _results(out).items() if tid == diverged[0]["trial_id"]]
    assert rows[-1]["diverged"] == 1 and rows[-1]["step"] == 8  # stopped at its next log, not at 12
    index = json.loads((out / "registry" / "index.json").read_text())
    assert diverged[0]["trial_id"] not in {a["trial_id"] for a in index["adapters"]}
    assert len(index["adapters"]) == 2
    assert "1 diverged" in proc.stdout


def test_an_interrupted_publish_is_completed_by_the_next_run(custom_jsonl, tmp_path):
    """The driver dies right after the first adapter's files went into the registry, before the
    index named it; `--resume` re-runs nothing and publishes all of them. Results live behind a
    filesystem URI (--storage file://...), as on a cluster with shared storage: resume finds the
    sweep there and publishing reads the checkpoints back from there."""
    (tmp_path / "marks").mkdir()
    out, store = tmp_path / "runs", tmp_path / "shared-store"
    args = ("--output-dir", str(out), "--dataset", str(custom_jsonl), "--text-column", "source_code",
            "--summary-column", "doc", "--num-samples", "2", "--max-steps", "8", "--eval-every", "4",
            "--train-size", "64", "--eval-size", "8", "--top-k", "2", "--address", "local",
            "--storage", f"file://{store}")
    fault = [{"kind": "exit", "at": "publish_installed", "once": True, "marker_dir": str(tmp_path / "marks")}]
    first = run_cli(*args, env={"QLORA_RAY_FAULTS": json.dumps(fault)})
    assert first.returncode == 70, first.stdout[-2000:] + first.stderr[-2000:]
    leftovers = [p for p in (out / "registry").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(leftovers) == 1  # files in, index not written
    index_before = (out / "registry" / "index.json")
    assert not index_before.exists() or not json.loads(index_before.read_text())["adapters"]
    assert not (out / "tune").exists()  # everything Tune wrote went to the storage URI
    before = _results(out, store)
    assert len(before) == 2 and all(list(d.glob("checkpoint_*")) for d in next(store.glob("sweep-*")).iterdir()
                                    if d.name.startswith("trial-"))

    second = run_cli(*args, "--resume", env={"QLORA_RAY_FAULTS": json.dumps(fault)})
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert _results(out, store) == before  # no trial ran again
    index = json.loads((out / "registry" / "index.json").read_text())
    assert len(index["adapters"]) == 2 and index["default"] == index["adapters"][0]["id"]
    from qlora_ray.registry import Registry

    listing = Registry(out / "registry").read()
    assert {a["id"] for a in listing["adapters"]} == {p.name for p in (out / "registry").iterdir()
                                                      if p.is_dir() and not p.name.startswith(".")}


def _experiment_state(experiment: Path) -> dict[str, str]:
    """trial id -> status, as Tune last saved it (what --resume will see)."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    status = {}
    for trial_json, _ in data.get("trial_data", []):
        trial = json.loads(trial_json)
        status[trial["trial_id"]] = trial["status"]
    return status


def _descendants(root: int) -> list[int]:
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                stat = (proc / "stat").read_text()
                parents[int(proc.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            pass
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_resume_after_killing_the_driver_reruns_nothing(custom_jsonl, tmp_path):
    """SIGKILL the driver and every process it started once 2 trials have finished, then --resume:
    finished trials keep their records untouched, no configuration is sampled twice, the
    in-flight trial continues from its checkpoint, and ASHA's rungs keep the finished trials."""
    out = tmp_path / "runs"
    args = ("--output-dir", str(out), "--dataset", str(custom_jsonl), "--text-column", "source_code",
            "--summary-column", "doc", "--num-samples", "4", "--max-steps", "12", "--eval-every", "4",
            "--train-size", "64", "--eval-size", "8", "--max-concurrent-trials", "1", "--r", "4,8,16",
            "--address", "local")
    proc = subprocess.Popen([*TUNE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    finished: list[str] = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            experiment = next((out / "tune").glob("sweep-*"), None)
            if experiment:
                state = _experiment_state(experiment)
                finished = [t for t, s in state.items() if s == "TERMINATED"]
                if len(finished) >= 2 and len(state) >= 3:
                    break
            time.sleep(0.5)
        assert len(finished) >= 2 and proc.poll() is None, "the sweep did not get two trials done in time"
        victims = [proc.pid, *_descendants(proc.pid)]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its session: the driver and the Ray it started
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)  # any of its descendants that left the session
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)
    experiment = next((out / "tune").glob("sweep-*"))
    before = _results(out)
    finished_records = {t: before[t] for t in finished}

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _results(out)
    assert len(after) == 4  # four trials in all: nothing sampled again
    for trial_id, rows in finished_records.items():
        assert after[trial_id] == rows, f"finished trial {trial_id} ran again"
    configs = {json.dumps(json.loads((experiment / f"trial-{t}" / "params.json").read_text()), sort_keys=True)
               for t in after}
    assert len(configs) == 4
    for trial_id, rows in after.items():  # every evaluation reported once, in order, by every trial
        steps = [r["step"] for r in rows]
        assert steps == sorted(set(steps)), (trial_id, steps)
    rungs = pickle.loads((out / "sweeps" / experiment.name / "asha_state.pkl").read_bytes())
    recorded = {t for bracket in rungs["_brackets"] for _, values in bracket._rungs for t in values}
    assert set(finished) <= recorded and set(after) - set(finished) & recorded
    summary = _summary(out)
    assert summary["trials"] == 4 and summary["errored"] == 0
