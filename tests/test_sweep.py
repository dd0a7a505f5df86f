"""A real sweep (session fixture `sweep`): Ray Tune + Optuna + ASHA on 4-bit tiny T5 trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from qlora_ray import eval_set
from qlora_ray.registry import make_adapter_id, rank_key


def test_sweep_runs_trials_and_reports_every_evaluation(sweep):
    summary = sweep["summary"]
    assert summary["trials"] == 4 and summary["errored"] == 0
    assert summary["completed"] + summary["stopped_early"] == 4
    for row in summary["leaderboard"]:
        assert row["status"] in ("completed", "stopped early")
        assert row["evals"] == 4 if row["status"] == "completed" else 1 <= row["evals"] < 4
        assert 0.0 <= row["best"]["rougeL"] <= 1.0 and row["best"]["eval_loss"] > 0
        assert row["hyperparameters"]["r"] in (4, 16)
        assert row["hyperparameters"]["target_modules"] in ("qv", "all-linear")
    # Tune's own record of every trial: one result row per evaluation, live-reported.
    experiment = next((sweep["out"] / "tune").glob("sweep-*"))
    for trial_dir in experiment.glob("trial-*"):
        rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        assert [r["step"] for r in rows] == [10 * (i + 1) for i in range(len(rows))]
        assert all({"rougeL", "rouge1", "rouge2", "eval_loss"} <= r.keys() for r in rows)


def test_sweep_leaves_a_report_and_tensorboard_events(sweep):
    record = next((sweep["out"] / "sweeps").glob("sweep-*"))
    report = (record / "report.md").read_text()
    assert "## Leaderboard" in report and "base model" in report and sweep["summary"]["sweep"] in report
    assert all(row["trial_id"] in report for row in sweep["summary"]["leaderboard"])
    experiment = next((sweep["out"] / "tune").glob("sweep-*"))
    for trial_dir in experiment.glob("trial-*"):  # Tune's TensorBoard logger: one event file per trial
        assert list(trial_dir.glob("events.out.tfevents.*")), trial_dir


def test_cli_prints_dashboard_table_and_leaderboard(sweep):
    out = sweep["proc"].stdout
    assert "Ray dashboard: http://" in out
    assert "Leaderboard (rougeL, max)" in out and "base model" in out
    assert str(sweep["out"] / "registry") in out
    assert "Checkpoints in storage: " in out
    # Trials ranked by part of the growing eval set say so, and only they.
    partial = [r for r in sweep["summary"]["leaderboard"] if eval_set.partial(r["best"])]
    assert out.count(" eval examples)") == len(partial)


def test_a_default_run_prints_no_warnings_only_table_progress_and_leaderboard(sweep):
    """Deprecated arguments fixed at the source; known third-party notices silenced (qlora_ray.notices)."""
    output = sweep["proc"].stdout + sweep["proc"].stderr
    noisy = [line for line in output.splitlines()
             if any(word in line for word in ("FutureWarning", "DeprecationWarning", "UserWarning", "deprecated",
                                              "warnings.warn", "Traceback", "kernels-community", "Loading weights",
                                              "new study created", "snapshotting has been triggered",
                                              "Checkpoint successfully created"))]
    lines = output.splitlines()
    first = next((i for i, line in enumerate(lines) if line in noisy), 0)
    assert not noisy, "\n".join(noisy[:20]) + "\n--- in context:\n" + "\n".join(lines[max(0, first - 5):first + 40])


def test_report_has_the_search_plots(sweep):
    record = next((sweep["out"] / "sweeps").glob("sweep-*"))
    report = (record / "report.md").read_text()
    for stem in ("optimization_history", "parallel_coordinate", "param_importances"):
        png, html = record / "plots" / f"{stem}.png", record / "plots" / f"{stem}.html"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, stem
        assert "plotly.min.js" in html.read_text()
        assert f"](plots/{stem}.png)" in report and f"(plots/{stem}.html)" in report


def test_every_trial_is_an_mlflow_run(sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{sweep['out']}/mlflow.db")
    experiment = client.get_experiment_by_name(sweep["summary"]["sweep"])
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == sweep["summary"]["trials"] == 4
    by_trial = {row["trial_id"]: row for row in sweep["summary"]["leaderboard"]}
    for run in runs:
        assert run.data.params["r"] in ("4", "16") and "learning_rate" in run.data.params
        history = client.get_metric_history(run.info.run_id, "rougeL")
        trial = next(t for t in by_trial if t in run.info.run_name)
        assert len(history) == by_trial[trial]["evals"]  # one point per evaluation, as Tune got them
        # The growing eval set (eval_set.py): a trial's best is its best evaluation of the whole set, or, stopped
        # before one, its best partial one.
        examples = [m.value for m in client.get_metric_history(run.info.run_id, "eval_examples")]
        total = client.get_metric_history(run.info.run_id, "eval_examples_total")[0].value
        assert len(examples) == len(history) and examples == sorted(examples) and examples[0] < total
        full = [m.value for m, n in zip(history, examples, strict=True) if n == total]
        expected = max(full) if full else max(m.value for m in history)
        assert by_trial[trial]["best"]["rougeL"] == pytest.approx(expected)


def test_registry_holds_top_k_adapters_only(sweep):
    index, registry = sweep["index"], sweep["out"] / "registry"
    assert len(index["adapters"]) == 3
    assert index["default"] == index["adapters"][0]["id"]
    # Best first: adapters scored on the whole eval set, then those stopped at a rung that scored part of it.
    keys = [rank_key(a["metrics"], "rougeL", "max") for a in index["adapters"]]
    assert keys == sorted(keys) and not eval_set.partial(index["adapters"][0]["metrics"])
    board = sweep["summary"]["leaderboard"]
    assert index["adapters"][0]["metrics"]["rougeL"] == board[0]["best"]["rougeL"]
    assert board[0]["best"]["rougeL"] == max(r["best"]["rougeL"] for r in board if not eval_set.partial(r["best"]))
    assert set(index["base_metrics"]) >= {"rougeL", "rouge1", "rouge2", "eval_loss"}
    assert Path(index["base_model"]).is_dir()
    for entry in index["adapters"]:
        files = sorted(p.name for p in (registry / entry["id"]).iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors", "qlora_ray.json"]
        info = json.loads((registry / entry["id"] / "qlora_ray.json").read_text(),  # strict JSON: no -Infinity
                          parse_constant=lambda c: pytest.fail(f"{c} in a qlora_ray.json"))
        assert info["metrics"]["eval_examples"] <= info["metrics"]["eval_examples_total"]
        # The published checkpoint is the evaluation the leaderboard ranks the trial by.
        row = next(r for r in sweep["summary"]["leaderboard"]
                   if make_adapter_id(sweep["summary"]["sweep"], r["trial_id"]) == entry["id"])
        assert info["metrics"]["step"] == row["best"]["step"]
        assert info["metrics"]["rougeL"] == pytest.approx(row["best"]["rougeL"])
        config = json.loads((registry / entry["id"] / "adapter_config.json").read_text())
        assert config["r"] == entry["hyperparameters"]["r"] and config["modules_to_save"] == ["lm_head"]
        with safe_open(str(registry / entry["id"] / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        # adapter weights and the saved lm_head only: never a copy of the base
        assert keys and all("lora_" in k or "lm_head" in k for k in keys)


def test_resume_finishes_without_rerunning(sweep):
    from tests.conftest import run_cli

    proc = run_cli(*sweep["args"], "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = list((sweep["out"] / "sweeps").glob("*/summary.json"))
    assert len(summaries) == 1  # the same sweep, not a new one
    assert json.loads(summaries[0].read_text())["trials"] == 4


def _trial_pids(root: int) -> list[int]:
    """Tune trial workers started under `root` (the sweep this test runs: its driver started its own
    Ray, whose workers descend from it); never another session's processes."""
    parents, names = {}, {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                stat = (proc / "stat").read_text()
                parents[int(proc.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
                names[int(proc.name)] = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            pass

    def descends(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            if pid == root:
                return True
            seen.add(pid)
            pid = parents.get(pid, 0)
        return False

    return [pid for pid, cmd in names.items() if cmd.startswith(b"ray::ImplicitFunc") and descends(pid)]


def test_a_crashed_trial_loses_nothing_else(custom_jsonl, tmp_path):
    """SIGKILL one running trial (no retries): the sweep finishes and publishes the others."""
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import TUNE

    config = tmp_path / "no-retries.yaml"
    config.write_text("search:\n  max_failures: 0\n")
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [*TUNE, "--config", str(config), "--dataset", str(custom_jsonl), "--text-column", "source_code",
         "--summary-column", "doc", "--output-dir", str(out), "--num-samples", "3", "--max-steps", "30",
         "--eval-every", "10", "--eval-size", "16", "--train-size", "300", "--max-concurrent-trials", "1",
         "--address", "local"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        # Kill the first trial once it has reported (so it has a checkpoint) and is training on.
        if list(out.glob("tune/sweep-*/trial-*/checkpoint_000000")) and _trial_pids(proc.pid):
            killed = _trial_pids(proc.pid)[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    output, _ = proc.communicate(timeout=600)
    assert killed is not None, output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads(next((out / "sweeps").glob("*/summary.json")).read_text())
    assert summary["trials"] == 3 and summary["errored"] == 1, summary
    assert summary["completed"] + summary["stopped_early"] == 2
    index = json.loads((out / "registry" / "index.json").read_text())
    assert len(index["adapters"]) >= 2
    assert "1 errored" in output
