"""Warm trials: Tune reuses a trial's process for the next trial and the 4-bit base stays loaded
(trial.park_base). Nothing may leak from one trial into the next: the same configuration trains to
the same losses whether it runs first in a fresh process or after another trial in a warm one.

The grid (--search-algorithm grid, --early-stopping none) runs r 4, r 8, r 4, r 8 one at a time."""

from __future__ import annotations

import json

from qlora_ray.trial import WARM_BASE_NOTE
from tests.conftest import run_cli


def _reports(out) -> dict[str, list[dict]]:
    """trial id -> its Tune reports (result.json: one JSON object per evaluation)."""
    runs = {}
    for result in (out / "tune").glob("*/trial-*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        runs[result.parent.name.removeprefix("trial-")] = rows
    return runs


def test_a_warm_trial_trains_exactly_like_a_fresh_one(cache_dir, tmp_path):
    out = tmp_path / "runs"
    proc = run_cli("--search-algorithm", "grid", "--early-stopping", "none", "--r", "4,8", "--lora-alpha", "16",
                   "--learning-rate", "2e-3", "--target-modules", "qv", "--num-samples", "2",
                   "--max-concurrent-trials", "1", "--max-steps", "6", "--eval-every", "3", "--train-size", "32",
                   "--eval-size", "8", "--top-k", "1", "--address", "local", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(next((out / "sweeps").glob("*/summary.json")).read_text())
    assert summary["trials"] == 4 and summary["completed"] == 4  # the grid twice, every trial to the end
    reports = _reports(out)
    assert len(reports) == 4
    # One process ran them all, one after another; the 2nd, 3rd and 4th took the parked base.
    assert len({rows[0]["pid"] for rows in reports.values()}) == 1
    assert proc.stdout.count(WARM_BASE_NOTE) == 3
    runs = sorted(reports.values(), key=lambda rows: rows[0]["timestamp"])
    assert [rows[0]["config"]["r"] for rows in runs] == [4, 8, 4, 8]

    def curve(rows):
        return [(r["step"], r["train_loss"], r["eval_loss"], r["rougeL"]) for r in rows]

    # r 4 first in a fresh process, and again after an r 8 trial on the same base: the same run
    assert curve(runs[0]) == curve(runs[2])
    assert curve(runs[1]) == curve(runs[3])
    assert curve(runs[0]) != curve(runs[1])  # (the comparison can tell configurations apart)
    assert summary["trial_seconds"] > 0 and all(row["trial_s"] > 0 for row in summary["leaderboard"])
    assert all(set(row["best_of"]) >= {"rougeL", "eval_loss"} for row in summary["leaderboard"])
