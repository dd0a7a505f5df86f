"""Replay search settings offline on a grid's learning curves: which defaults could meet the search goal?

    python bench/search_replay.py bench/results/search_efficiency.json --seeds 200

A real search (bench/search_efficiency.py) costs minutes per seed; five seeds say little about a
setting's spread. Here every configuration's learning curve comes from the grid (each trial's
evaluations and the trial-seconds at each one, `grid.curves`), and a search is replayed against them:
Optuna's TPE (the sweep's sampler, asked and told as Ray's OptunaSearch does: every evaluation reported,
the last value told when a trial ends) and Ray's ASHA rule (rungs at grace * rf^k evaluations; a trial
whose value is below the rung's (1 - 1/rf) percentile of the values recorded there before it stops),
with `--concurrency` trials at a time, each proceeding at its grid trial's own pace.

What the replay cannot know: the learning rate between the grid's values. The search draws it
log-uniformly as the sweep does and the replay takes the curve of the nearest grid value (in log
space): a continuous search that finds a better rate than the grid's two does better than replayed
here, one that lands between two good ones worse. And the evaluations are the grid's: with
`--eval-set growing` the real search ranks early rungs on fewer examples (noisier) than replayed.

Per setting: over --seeds replays, the gain share (as in search_efficiency.py: how much of the
grid's gain over the base the search's best reaches) median and 10th percentile, the cost share
(trial-seconds over the grid's) median, and how often five consecutive seeds would meet the goal
(median gain share >= 0.98, worst >= 0.90, median cost <= 0.2).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

from qlora_ray.config import SearchSettings

METRICS = {"rougeL": "max", "eval_loss": "min"}


DEFAULTS = SearchSettings()  # the sweep's defaults: Setting() replays the default search


@dataclass(frozen=True)
class Setting:
    num_samples: int = DEFAULTS.num_samples
    reduction_factor: int = DEFAULTS.reduction_factor
    grace_period: int = DEFAULTS.grace_period
    startup: int | None = None  # TPE's random trials first; None: the sweep's rule
    multivariate: bool = False  # TPE only
    sampler: str = "tpe"  # tpe (the sweep's), gp (Optuna's Gaussian-process sampler), random
    concurrency: int = 2

    def startup_trials(self) -> int:  # qlora_ray.search.searcher's rule
        return self.startup if self.startup is not None else max(2, min(10, self.num_samples // 3))

    def label(self) -> str:
        return (f"{self.sampler} n={self.num_samples} rf={self.reduction_factor} grace={self.grace_period} "
                f"startup={self.startup_trials()}{' multivariate' if self.multivariate else ''}")

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        if self.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=self.startup_trials())
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup_trials(),
                                          multivariate=self.multivariate)


def gain(value: float, base: float, metric: str) -> float:
    return value - base if METRICS[metric] == "max" else base - value


def key(h: dict) -> tuple:
    return (int(h["r"]), int(h["lora_alpha"]), float(h["learning_rate"]), str(h["target_modules"]))


def milestones(max_t: int, grace: int, rf: int) -> list[int]:
    """Ray's ASHA rungs (async_hyperband._Bracket, s=0), descending."""
    rungs = int(np.log(max_t / grace) / np.log(rf) + 1)
    return [min(max_t, grace * rf ** k) for k in reversed(range(rungs))]


def replay(curves: dict, space: dict, metric: str, setting: Setting, seed: int, *,
           best_over: str) -> tuple[float, float]:
    """One search; (its best value, its trial-seconds)."""
    sign = 1.0 if METRICS[metric] == "max" else -1.0  # ASHA compares sign * value, larger is better
    sampler = setting.make_sampler(seed)
    study = optuna.create_study(direction="maximize" if sign > 0 else "minimize", sampler=sampler)
    lrs = sorted(space["learning_rate"])
    dists = {"r": optuna.distributions.CategoricalDistribution(space["r"]),
             "lora_alpha": optuna.distributions.CategoricalDistribution(space["lora_alpha"]),
             "learning_rate": optuna.distributions.FloatDistribution(lrs[0], lrs[-1], log=True),
             "target_modules": optuna.distributions.CategoricalDistribution(space["target_modules"])}
    max_t = min(len(c) for c in curves.values())
    rungs = [(m, {}) for m in milestones(max_t, setting.grace_period, setting.reduction_factor)]
    events, order, started = [], itertools.count(), 0
    cost, finals, every = 0.0, [], []

    def launch(now: float) -> None:
        nonlocal started
        trial = study.ask(dists)
        lr = min(lrs, key=lambda x: abs(math.log(x) - math.log(trial.params["learning_rate"])))
        curve = curves[key(trial.params | {"learning_rate": lr})]
        heapq.heappush(events, (now + curve[0]["time_total_s"], next(order), started, trial, curve, now, 0))
        started += 1

    for _ in range(min(setting.concurrency, setting.num_samples)):
        launch(0.0)
    while events:
        now, _, trial_id, trial, curve, start, k = heapq.heappop(events)
        value = float(curve[k][metric])
        it = k + 1
        trial.report(value, it)
        every.append(value)
        stop = it >= max_t
        for milestone, recorded in rungs:
            if it < milestone or trial_id in recorded:
                continue
            if recorded:
                cutoff = np.nanpercentile(list(recorded.values()), (1 - 1 / setting.reduction_factor) * 100)
                stop = stop or sign * value < cutoff
            recorded[trial_id] = sign * value
            break
        if stop:
            study.tell(trial, value)
            cost += curve[k]["time_total_s"]
            if it >= max_t:
                finals.append(value)
            if started < setting.num_samples:
                launch(now)
        else:
            heapq.heappush(events, (start + curve[k + 1]["time_total_s"], next(order), trial_id, trial, curve, start,
                                    k + 1))
    pool = finals if best_over == "completed" else every
    best = max(pool) if sign > 0 else min(pool)
    return best, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a search_efficiency JSON whose grid has curves")
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--metrics", default=",".join(METRICS))
    ap.add_argument("--best-over", choices=("completed", "every"), default="completed",
                    help="the search's best: over trials that ran to the end (a growing eval set: only their "
                         "last evaluation is of the whole set) or over every evaluation (the whole set each time)")
    ap.add_argument("--out", help="write the table as JSON here")
    ap.add_argument("--sampler", default="tpe", help="tpe, gp, random (comma-separated: each)")
    ap.add_argument("--num-samples", default="8", help="e.g. 8,12")
    ap.add_argument("--reduction-factor", default="3")
    ap.add_argument("--grace-period", default="1")
    ap.add_argument("--startup", default="2", help="random trials before the model-based sampler")
    ap.add_argument("--multivariate", default="0", help="TPE's multivariate mode: 0, 1 or 0,1")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    doc = json.loads(Path(args.results).read_text())
    grid, base, space = doc["grid"], doc["base"], doc["space"]
    curves = {key(c["hyperparameters"]): c["history"] for c in grid["curves"]}
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    settings = [Setting()] + [Setting(num_samples=n, reduction_factor=rf, grace_period=g, startup=st,
                                      multivariate=bool(mv), sampler=sampler)
                              for sampler in args.sampler.split(",") for n in ints(args.num_samples)
                              for rf in ints(args.reduction_factor) for g in ints(args.grace_period)
                              for st in ints(args.startup) for mv in ints(args.multivariate)
                              if not (mv and sampler != "tpe")]
    settings = list({setting.label(): setting for setting in reversed(settings)}.values())[::-1]  # the first of a label
    table = []
    for metric in [m.strip() for m in args.metrics.split(",") if m.strip()]:
        grid_gain = gain(grid[metric], base[metric], metric)
        print(f"\n{metric}: grid {grid[metric]:.4f}, base {base[metric]:.4f}, {grid['trial_seconds']} trial-s")
        for setting in settings:
            runs = [replay(curves, space, metric, setting, seed, best_over=args.best_over)
                    for seed in range(args.seeds)]
            shares = [gain(best, base[metric], metric) / grid_gain for best, _ in runs]
            costs = [c / grid["trial_seconds"] for _, c in runs]
            fives = [(shares[i:i + 5], costs[i:i + 5]) for i in range(0, len(runs) - 4, 5)]
            met = sum(statistics.median(s) >= 0.98 and min(s) >= 0.90 and statistics.median(c) <= 0.2 for s, c in fives)
            row = {"metric": metric, "setting": setting.label(), "median_share": round(statistics.median(shares), 4),
                   "p10_share": round(float(np.percentile(shares, 10)), 4),
                   "median_cost": round(statistics.median(costs), 4),
                   "goal_met_of_5_seed_groups": f"{met}/{len(fives)}"}
            table.append(row)
            print(f"  {row['setting']:<48} share median {row['median_share']:.3f} p10 {row['p10_share']:.3f}  "
                  f"cost {row['median_cost']:.3f}  goal met {row['goal_met_of_5_seed_groups']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"source": args.results, "seeds": args.seeds, "best_over": args.best_over,
                                              "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
