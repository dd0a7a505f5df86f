"""The search: Optuna TPE over the LoRA space, ASHA early stopping, per-trial resources."""

from __future__ import annotations

import math

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from qlora_ray.config import Config, SearchSettings

# Tune's live table: searched parameters and what each evaluation reported.
PARAMETER_COLUMNS = {"r": "r", "lora_alpha": "alpha", "learning_rate": "lr", "target_modules": "targets"}
METRIC_COLUMNS = {"rougeL": "rougeL", "rouge1": "rouge1", "eval_loss": "eval_loss", "step": "step",
                  "training_iteration": "evals"}


def param_space(s: SearchSettings) -> dict:
    """Lists become choices, a [low, high] learning rate a log-uniform range, singletons constants."""

    def choice(values: list):
        return tune.choice(values) if len(set(values)) > 1 else values[0]

    lr = s.learning_rate
    return {
        "r": choice(s.r),
        "lora_alpha": choice(s.lora_alpha),
        "learning_rate": tune.loguniform(lr[0], lr[-1]) if lr[0] != lr[-1] else lr[0],
        "target_modules": choice(s.target_modules),
    }


def trial_resources(s: SearchSettings, cluster: dict) -> dict[str, float]:
    gpus = s.gpus_per_trial
    if gpus is None:
        gpus = 1 if cluster.get("GPU", 0) >= 1 else 0
    return {"cpu": s.cpus_per_trial, "gpu": gpus}


def max_concurrency(s: SearchSettings, resources: dict[str, float], cluster: dict) -> int:
    """How many trials fit at once; an autoscaling cluster may grow, so the user can raise it."""
    if s.max_concurrent_trials:
        return s.max_concurrent_trials
    fits = [math.floor(cluster.get("CPU", 1) / max(resources["cpu"], 1e-9))]
    if resources["gpu"]:
        fits.append(math.floor(cluster.get("GPU", 0) / resources["gpu"]))
    return max(1, min(fits))


def searcher(config: Config, concurrency: int) -> ConcurrencyLimiter:
    s = config.search
    # TPE needs some random trials first; with a small budget keep that phase short.
    sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, min(10, s.num_samples // 3)))
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=concurrency)


def scheduler(config: Config) -> ASHAScheduler:
    # One Tune iteration is one evaluation, so rungs are counted in evaluations.
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=config.train.num_evals,
        grace_period=min(config.search.grace_period, config.train.num_evals),
        reduction_factor=config.search.reduction_factor,
    )


def progress_reporter(config: Config) -> tune.CLIReporter:
    return tune.CLIReporter(
        parameter_columns=PARAMETER_COLUMNS,
        metric_columns=METRIC_COLUMNS,
        sort_by_metric=True,  # metric and mode come from TuneConfig
        max_report_frequency=15,
    )
