"""How much of an exhaustive grid's gain the default search finds, and at what cost.

    python bench/search_efficiency.py                # the embedded tiny T5, on this machine
    python bench/search_efficiency.py --seeds 5 --out bench/results/search_efficiency.json

On a declared space (SPACE: r x lora_alpha x learning rate x target set, 24 configurations) it runs
`experiments/tune_t5.py` (a real sweep each time, its own local Ray):

- the grid: `--search-algorithm grid --early-stopping none`, every configuration once, every trial to
  the end. One grid run serves both metrics: each trial's best ROUGE-L and best eval loss over its
  evaluations are in the sweep's summary (`best_of`).
- the default search (Optuna TPE + ASHA, the learning rate log-uniform over the grid's range, the
  sweep's default number of trials) with the same per-trial budget (steps, evaluations, eval set),
  once per seed optimizing ROUGE-L and once optimizing eval loss.

Gain = how far the best adapter moves the metric from the base model's value (ROUGE-L up, eval loss
down); cost = trial-seconds (the sum of the trials' own run times, Tune's time_total_s). Writes
--out (JSON) as it goes, so an interrupted run keeps what finished; --resume skips runs already in it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNE = [sys.executable, str(ROOT / "experiments" / "tune_t5.py")]

# The declared space: 2 x 2 x 2 x 3 = 24 configurations. The default search samples the learning rate
# log-uniformly between the grid's two values, and r, alpha and targets from the same choices.
SPACE = {"r": [4, 16], "lora_alpha": [16, 64], "learning_rate": [1e-3, 4e-3],
         "target_modules": ["qv", "attention", "all-linear"]}
METRICS = {"rougeL": "max", "eval_loss": "min"}


def space_flags() -> list[str]:
    return ["--r", ",".join(map(str, SPACE["r"])), "--lora-alpha", ",".join(map(str, SPACE["lora_alpha"])),
            "--learning-rate", ":".join(map(str, SPACE["learning_rate"])),
            "--target-modules", ",".join(SPACE["target_modules"])]


def sweep(flags: list[str], out_dir: Path, log: Path) -> dict:
    """One tune_t5.py run; its summary.json."""
    cmd = [*TUNE, *space_flags(), *flags, "--top-k", "1", "--address", "local", "--output-dir", str(out_dir)]
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd[1:])}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed (exit {proc.returncode}): see {log}")
    summaries = sorted((out_dir / "sweeps").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(summaries[-1].read_text())
    summary["command_s"] = round(time.perf_counter() - t0, 1)
    return summary


HISTORY_KEYS = ("training_iteration", "step", "rougeL", "eval_loss", "eval_examples", "time_total_s")


def histories(out_dir: Path) -> list[dict]:
    """Every trial's evaluations (Tune's result.json lines): its hyperparameters and, per evaluation, the
    metrics and the trial-seconds so far. From the grid these are the learning curves that a search with
    early stopping could have seen (offline replays of schedulers: bench/search_replay.py)."""
    out = []
    for path in sorted(out_dir.rglob("result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("training_iteration")]
        config = rows[0].get("config", {}) if rows else {}
        if all(config.get(k) is not None for k in SPACE):
            out.append({"hyperparameters": {k: config.get(k) for k in SPACE},
                        "history": [{k: r.get(k) for k in HISTORY_KEYS} for r in rows]})
    return out


def best_of(summary: dict, metric: str) -> float:
    """The best value any trial reached, over the evaluations of the whole eval set (with a growing eval set
    a trial stopped at an early rung scored only its first examples: not comparable)."""
    rows = [row["best_of"] for row in summary["leaderboard"] if row.get("best_of", {}).get(metric) is not None]
    most = max((row.get("eval_examples", 0) for row in rows), default=0)
    values = [row[metric] for row in rows if row.get("eval_examples", 0) == most]
    return max(values) if METRICS[metric] == "max" else min(values)


def gain(value: float, base: float, metric: str) -> float:
    return value - base if METRICS[metric] == "max" else base - value


def summarize(doc: dict) -> dict:
    """Per metric: each seed's share of the grid's gain and of its trial-seconds; medians; the goal."""
    out = {}
    base, grid = doc["base"], doc["grid"]
    for metric in METRICS:
        runs = doc["default_search"].get(metric, [])
        if not runs or grid.get(metric) is None:
            continue
        grid_gain = gain(grid[metric], base[metric], metric)
        shares = [gain(r["best"], base[metric], metric) / grid_gain for r in runs]
        costs = [r["trial_seconds"] / grid["trial_seconds"] for r in runs]
        out[metric] = {
            "grid_gain": round(grid_gain, 5),
            "gain_share_per_seed": [round(x, 4) for x in shares],
            "median_gain_share": round(statistics.median(shares), 4),
            "worst_gain_share": round(min(shares), 4),
            "cost_share_per_seed": [round(x, 4) for x in costs],
            "median_cost_share": round(statistics.median(costs), 4),
            "goal": ">= 0.98 median, >= 0.90 worst, <= 0.2 median cost",
            "goal_met": bool(statistics.median(shares) >= 0.98 and min(shares) >= 0.90
                             and statistics.median(costs) <= 0.2),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "search_efficiency.json"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--metrics", default=",".join(METRICS), help="rougeL, eval_loss or both")
    ap.add_argument("--skip-grid", action="store_true", help="reuse the grid in --out")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    ap.add_argument("--extra", default="", help="flags added to every sweep (the same per-trial budget for all), "
                                                "e.g. '--max-steps 120 --eval-every 30'")
    args = ap.parse_args()
    out = Path(args.out)
    log = out.with_suffix(".log")
    extra = args.extra.split()
    doc: dict = json.loads(out.read_text()) if (args.resume or args.skip_grid) and out.is_file() else {}
    if not (args.resume or args.skip_grid):
        log.write_text("")
    doc.setdefault("what", __doc__.split("\n\n")[0])
    doc["space"] = SPACE
    doc["configs"] = len(SPACE["r"]) * len(SPACE["lora_alpha"]) * len(SPACE["learning_rate"]) * len(
        SPACE["target_modules"])
    doc["per_trial_budget"] = extra or "the defaults (tune_t5.py: --max-steps 240, eval every 60 steps)"
    doc["machine"] = f"{os.cpu_count()} CPUs, {sys.platform}"
    doc.setdefault("default_search", {})

    def save() -> None:
        doc["summary"] = summarize(doc) if "grid" in doc else {}
        out.write_text(json.dumps(doc, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        if "grid" not in doc or not args.skip_grid and not args.resume:
            print("grid: every configuration to the end ...", flush=True)
            s = sweep(["--search-algorithm", "grid", "--early-stopping", "none", "--num-samples", "1", *extra],
                      Path(tmp) / "grid", log)
            doc["base"] = {m: s["base_metrics"][m] for m in METRICS}
            doc["grid"] = {m: best_of(s, m) for m in METRICS} | {
                "trial_seconds": s["trial_seconds"], "trials": s["trials"], "wall_s": s["wall_s"],
                "trials_detail": [{"hyperparameters": r["hyperparameters"], "best_of": r["best_of"],
                                   "trial_s": r["trial_s"]} for r in s["leaderboard"]],
                "curves": histories(Path(tmp) / "grid")}
            save()
            print(f"grid: {json.dumps({k: v for k, v in doc['grid'].items() if k != 'trials_detail'})}", flush=True)
        for metric in [m.strip() for m in args.metrics.split(",") if m.strip()]:
            runs = doc["default_search"].setdefault(metric, [])
            done = {r["seed"] for r in runs}
            for seed in range(args.seeds):
                if seed in done:
                    continue
                flags = ["--metric", metric, "--mode", METRICS[metric], "--seed", str(seed), *extra]
                s = sweep(flags, Path(tmp) / f"{metric}-{seed}", log)
                runs.append({"seed": seed, "best": best_of(s, metric), "trial_seconds": s["trial_seconds"],
                             "trials": s["trials"], "stopped_early": s["stopped_early"], "wall_s": s["wall_s"]})
                save()
                print(f"{metric} seed {seed}: {json.dumps(runs[-1])}", flush=True)
    save()
    print(json.dumps(doc["summary"], indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
