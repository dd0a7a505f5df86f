"""The search: Optuna TPE over the LoRA space, ASHA early stopping, per-trial resources."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Domain

from qlora_ray import notices
from qlora_ray.config import Config, SearchSettings

# Tune's live table: searched parameters and what each evaluation reported.
PARAMETER_COLUMNS = {"r": "r", "lora_alpha": "alpha", "learning_rate": "lr", "target_modules": "targets"}
METRIC_COLUMNS = {"rougeL": "rougeL", "rouge1": "rouge1", "eval_loss": "eval_loss", "step": "step",
                  "training_iteration": "evals"}


def param_space(s: SearchSettings) -> dict:
    """Lists become choices, a [low, high] learning rate a log-uniform range, singletons constants; for the
    grid, every list (the learning rates too) a grid axis."""
    if s.algorithm == "grid":
        def axis(values: list):
            values = list(dict.fromkeys(values))
            return tune.grid_search(values) if len(values) > 1 else values[0]

        return {"r": axis(s.r), "lora_alpha": axis(s.lora_alpha), "learning_rate": axis(s.learning_rate),
                "target_modules": axis(s.target_modules)}

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
    """Per trial: cpus_per_trial CPUs and gpus_per_trial GPUs; with gpus_per_trial None (the default), 1 GPU
    when `cluster` (cluster.capacity(): what the cluster holds or its autoscaler can add) has one,
    so a cluster whose GPU workers scale from zero still gets GPU trials, else 0. With "auto" the same
    answer is the most a trial asks for: PackedResources gives each trial its share of that GPU."""
    gpus = s.gpus_per_trial
    if gpus is None or gpus == AUTO:
        gpus = 1 if cluster.get("GPU", 0) >= 1 else 0
    return {"cpu": s.cpus_per_trial, "gpu": gpus}


AUTO = "auto"  # gpus_per_trial: a GPU share per trial from its predicted peak memory
SHARE_STEPS = 8  # shares are multiples of 1/8 GPU, so that trials of different sizes fill a GPU exactly
SHARE_HEADROOM = 0.2  # over the prediction: the estimator's error on the whole device reached 18% (README)


def gpu_share(predicted_gb: float, gpu_gb: float) -> float:
    """The fraction of a `gpu_gb` GPU a trial predicted to peak at `predicted_gb` asks for: with
    SHARE_HEADROOM, rounded up to a multiple of 1/SHARE_STEPS, at most one GPU (a trial too big for
    it plans smaller micro-batches within the whole GPU, or is skipped)."""
    steps = math.ceil(predicted_gb * (1 + SHARE_HEADROOM) / gpu_gb * SHARE_STEPS - 1e-9)
    return min(1.0, max(1, steps) / SHARE_STEPS)


def memory_keys(s: SearchSettings) -> list[tuple[int, str]]:
    """The (r, target_modules) pairs the search can sample: what a trial's memory depends on."""
    return [(r, targets) for r in sorted(set(s.r)) for targets in dict.fromkeys(s.target_modules)]


# The un-adapted base's evaluation builds a trial's model with this adapter (trial.evaluate_base).
BASE_EVAL = {"r": 1, "target_modules": "all-linear"}


def predicted_peaks(config: Config, model_config) -> dict[tuple[int, str], float]:
    """Predicted peak GB (qlora_ray.memory) of every (r, target_modules) the search can sample, at the
    configured micro-batch, plus the base evaluation's. ValueError/KeyError/TypeError: no estimate for
    this architecture."""
    from qlora_ray import memory

    return {(r, targets): memory.estimate_trial(model_config, config, {"r": r, "target_modules": targets}).total_gb
            for r, targets in [*memory_keys(config.search), (BASE_EVAL["r"], BASE_EVAL["target_modules"])]}


@dataclass(frozen=True)
class PackedResources:
    """`tune.with_resources`' callable for gpus_per_trial "auto": a trial's resources from its sampled
    config, cpus_per_trial CPUs and the GPU share its predicted peak needs on a `gpu_gb` GPU, so
    Ray packs small trials several to a GPU. Inside the trial, trial.memory_limit_gb plans within the
    share Ray gave it."""

    cpus: float
    gpu_gb: float
    predicted: dict[tuple[int, str], float]  # predicted_peaks()
    limit_gb: float | None = None  # train.memory_limit_gb: a trial plans within it, so it needs no more

    def share(self, hparams: dict) -> float:
        need = self.predicted.get((int(hparams["r"]), str(hparams["target_modules"])))
        if need is None:  # a configuration outside the search space (not expected): a whole GPU
            return 1.0
        return gpu_share(min(need, self.limit_gb or need), self.gpu_gb)

    def shares(self, s: SearchSettings) -> dict[tuple[int, str], float]:
        return {key: self.share({"r": key[0], "target_modules": key[1]}) for key in memory_keys(s)}

    def __call__(self, hparams: dict) -> tune.PlacementGroupFactory:
        return tune.PlacementGroupFactory([{"CPU": self.cpus, "GPU": self.share(hparams)}])


def max_concurrency(s: SearchSettings, resources: dict[str, float], cluster: dict) -> int:
    """How many trials fit at once in `cluster` (cluster.capacity(): the CPUs and GPUs it holds or can
    scale to, so an autoscaling cluster runs as many as it can grow to hold), at most num_samples;
    an explicit max_concurrent_trials wins."""
    if s.max_concurrent_trials:
        return s.max_concurrent_trials
    fits = [total_trials(s)]  # also bounds a node type without a limit (inf)
    if resources["cpu"]:
        fits.append(cluster.get("CPU", 1) / resources["cpu"])
    if resources["gpu"]:
        fits.append(cluster.get("GPU", 0) / resources["gpu"])
    return max(1, math.floor(min(fits) + 1e-9))  # 0.6 / 0.2 is 2.999...


def searched(s: SearchSettings) -> list[str]:
    """The parameters with more than one possible value."""
    return [name for name, value in param_space(s).items()
            if isinstance(value, Domain) or isinstance(value, dict) and "grid_search" in value]


def total_trials(s: SearchSettings) -> int:
    """num_samples, or for the grid num_samples runs of each of its configurations."""
    if s.algorithm != "grid":
        return s.num_samples
    return s.num_samples * math.prod(len(v["grid_search"]) for v in param_space(s).values() if isinstance(v, dict))


def searcher(config: Config) -> OptunaSearch | None:
    """Optuna TPE over the searched parameters; None when every parameter is pinned (Tune then
    runs num_samples repeats of the one configuration: Optuna has nothing to sample)."""
    s = config.search
    if s.algorithm == "grid" or not searched(s):  # Tune's own variant generator walks the grid
        return None
    if not notices.verbose():
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "A new study created" INFO line
    # TPE needs some random trials first; with a small budget keep that phase short.
    sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, min(10, s.num_samples // 3)))
    return OptunaSearch(sampler=sampler)


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a driver restart.

    `Tuner.restore` brings the scheduler back as it was built, with empty rungs, so after a
    resume every trial would be judged only against trials that report later. This one
    writes its state beside the sweep after every decision and reloads it on its first
    event after a restore.
    """

    def __init__(self, state_file: str, **kwargs):
        super().__init__(**kwargs)
        self._state_file, self._loaded = state_file, False

    def _load_once(self) -> None:
        if not self._loaded:
            state_file = self._state_file
            if os.path.isfile(state_file):
                self.restore(state_file)
            self._state_file, self._loaded = state_file, True

    def _save(self) -> None:
        tmp = f"{self._state_file}.tmp"
        self.save(tmp)
        os.replace(tmp, self._state_file)

    def on_trial_add(self, tune_controller, trial):
        self._load_once()
        super().on_trial_add(tune_controller, trial)
        self._save()

    def on_trial_result(self, tune_controller, trial, result):
        self._load_once()
        decision = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return decision

    def on_trial_complete(self, tune_controller, trial, result):
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller, trial):
        self._load_once()
        super().on_trial_remove(tune_controller, trial)
        self._save()

    def rungs(self) -> dict[int, dict[str, float]]:
        """milestone (evaluations) -> {trial_id: recorded metric}, for reports and tests."""
        self._load_once()
        return {milestone: dict(recorded) for bracket in self._brackets for milestone, recorded in bracket._rungs}


def scheduler(config: Config, state_file: str) -> ResumableASHA | None:
    """ASHA, or None (Tune's FIFO: every trial to the end) for early_stopping none."""
    if config.search.early_stopping == "none":
        return None
    # One Tune iteration is one evaluation, so rungs are counted in evaluations.
    return ResumableASHA(
        state_file,
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
