"""A sweep from start to registry: check inputs, start Ray, tune, publish the winners."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from ray import tune

from qlora_ray import eval_set, notices, plots, search, storage, tasks, tracking
from qlora_ray.cluster import capacity, gpu_memory_gb
from qlora_ray.config import METRICS, Config, ConfigError, check_data_format, merge
from qlora_ray.data import TokenizedData, load_raw
from qlora_ray.model import Architecture, inspect_architecture, load_tokenizer, resolve_model_path
from qlora_ray.registry import (
    Candidate,
    Registry,
    RegistryError,
    finite_metrics,
    load_settings,
    make_adapter_id,
    metric_rank_key,
    rank_key,
    task_settings,
)
from qlora_ray.trial import TRIAL_INFO, DoesNotFit, evaluate_base, run_trial

SWEEP_CONFIG = "config.yaml"  # the settings a sweep ran with, for --resume
ASHA_STATE = "asha_state.pkl"  # the scheduler's rungs, reloaded by --resume
DOES_NOT_FIT = f"{DoesNotFit.__name__}: "  # how a trial skipped by its memory plan's error reads (_error_reason)


@dataclass
class Prepared:
    """Everything a sweep needs, checked before Ray starts."""

    config: Config
    model_path: str
    architecture: Architecture
    data: TokenizedData
    name: str  # experiment name, new or resumed
    # gpus_per_trial "auto": predicted peak GB per (r, target_modules) (search.predicted_peaks)
    predicted: dict[tuple[int, str], float] | None = None


def prepare(config: Config, *, resume: bool = False) -> Prepared:
    """All the checks that depend on the model or data. Raises ConfigError on bad input."""
    if resume:
        name = latest_experiment(config)
        saved = sweep_dir(config, name) / SWEEP_CONFIG
        if saved.is_file():  # the sweep's own settings, so its trials keep their data and model
            config = merge(Config(), yaml.safe_load(saved.read_text()), str(saved))
            print(f"Resuming {name} with its saved settings ({saved})")
    else:
        name = time.strftime("sweep-%Y%m%d-%H%M%S")
    if config.mlflow:
        tracking.check_mlflow_uri(config.mlflow)
    storage.open_root(storage.root(config))
    raw = load_raw(config.data)  # first: a bad file or column fails before any model build (resolves data.format)
    model_path = resolve_model_path(config.model)
    architecture = inspect_architecture(model_path, config.model)
    task_name = architecture.task if config.model.task == "auto" else config.model.task
    task = tasks.get(task_name)  # a task this version cannot run fails here, before Ray starts
    check_data_format(config, task_name)  # e.g. ROUGE on text data, or messages for a seq2seq model
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, task=task_name))
    for choice in config.search.target_modules:
        architecture.resolve_targets(choice)
    try:
        Registry(config.registry_dir).check_base(model_path)
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    predicted = None
    if config.search.gpus_per_trial == search.AUTO:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
        try:
            predicted = search.predicted_peaks(config, model_config)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--gpus-per-trial auto packs trials by their predicted memory, and there is no memory "
                              f"estimate for this model ({e}); give a number of GPUs per trial instead") from None
    tokenizer = load_tokenizer(model_path, config.model)
    data = task.tokenize(raw, tokenizer, config.data)
    return Prepared(config, model_path, architecture, data, name, predicted)


def sweep_dir(config: Config, name: str) -> Path:
    return Path(config.output_dir).resolve() / "sweeps" / name


def latest_experiment(config: Config) -> str:
    runs = [name for name in storage.experiments(config)
            if tune.Tuner.can_restore(storage.experiment_path(config, name))]
    if not runs:
        raise ConfigError(f"--resume: no sweep to resume in {storage.root(config)}")
    return runs[-1]


def run(prepared: Prepared, *, address: str | None = None) -> dict:
    config, s = prepared.config, prepared.config.search
    # Workers on a remote cluster do not inherit this process's environment: --verbose travels explicitly.
    # A reused trial actor waits for its previous trial's thread to end (the base parked, memory freed): Tune
    # gives it 2 s and otherwise errors the *next* trial, too short on a loaded machine.
    env_vars = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": os.environ.get("TUNE_FUNCTION_THREAD_TIMEOUT_S", "120")}
    if notices.verbose():
        env_vars[notices.VERBOSE_ENV] = "1"
    runtime_env = {"env_vars": env_vars}
    context = ray.init(address=address, include_dashboard=True, log_to_driver=True, runtime_env=runtime_env)
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}  (trials appear under Jobs and Actors)")
    cluster = capacity()  # what the cluster holds or its autoscaler can add
    resources = search.trial_resources(s, cluster)
    packed = _packed_resources(prepared, resources) if s.gpus_per_trial == search.AUTO and resources["gpu"] else None
    per_trial: dict | search.PackedResources = resources
    if packed:  # each trial asks for the GPU share its configuration needs; as many at once as the smallest fit
        per_trial = packed
        shares = packed.shares(s)
        resources = {"cpu": resources["cpu"], "gpu": min(shares.values())}
        shown = {"cpu": resources["cpu"], "gpu": f"{min(shares.values()):g}-{max(shares.values()):g} (auto)"}
    concurrency = search.max_concurrency(s, resources, cluster)
    shape = f"{cluster['CPU']:g} CPUs, {cluster['GPU']:g} GPUs"
    how = "a grid" if s.algorithm == "grid" else "Optuna TPE"
    stop = ", ASHA stopping weak trials" if s.early_stopping == "asha" else ", every trial to the end"
    print(f"Sweep {prepared.name}: {search.total_trials(s)} trials ({how}{stop}), {shown if packed else resources} "
          f"each, up to {concurrency} at once (cluster {'can scale to' if cluster['can_scale'] else 'has'} {shape}); "
          f"optimizing {s.metric} ({s.mode})")

    record_dir = sweep_dir(config, prepared.name)
    record_dir.mkdir(parents=True, exist_ok=True)
    saved = config.to_dict() | {"output_dir": str(Path(config.output_dir).resolve())}
    (record_dir / SWEEP_CONFIG).write_text(yaml.safe_dump(saved, sort_keys=False))
    started = time.time()
    data_ref = ray.put(prepared.data)
    base_file = record_dir / "base_metrics.json"
    base_task = None
    if not base_file.is_file():
        # Runs beside the first trials; on a GPU cluster it takes a GPU like a trial.
        base_gpus = packed.share(search.BASE_EVAL) if packed else resources["gpu"]
        base_task = ray.remote(evaluate_base).options(num_cpus=resources["cpu"], num_gpus=base_gpus).remote(
            config=config, data=data_ref, model_path=prepared.model_path
        )

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, config=config, data=prepared.data, model_path=prepared.model_path),
        per_trial,
    )
    experiment = storage.experiment_path(config, prepared.name)
    if tune.Tuner.can_restore(experiment):
        print(f"Resuming {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search.param_space(s),
            tune_config=tune.TuneConfig(
                metric=s.metric,
                mode=s.mode,
                search_alg=search.searcher(config),
                max_concurrent_trials=concurrency,
                scheduler=search.scheduler(config, str(record_dir / ASHA_STATE)),
                num_samples=s.num_samples,
                # Warm trials: a finished or stopped trial's process (imports, CUDA context, the parked 4-bit
                # base: trial.park_base) runs the next trial that asks for the same resources.
                reuse_actors=True,
                trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=prepared.name,
                storage_path=storage.root(config),
                # Kept by eval_set.score: the metric of a full evaluation (a growing eval set's partial
                # ones rank below every full one).
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute="score", checkpoint_score_order=s.mode
                ),
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                progress_reporter=search.progress_reporter(config),
                callbacks=tracking.tune_callbacks(config.mlflow, prepared.name, {"sweep": prepared.name}),
                verbose=1,
            ),
        )
    results = tuner.fit()
    base_metrics = {}
    if base_task is not None:
        try:
            base_file.write_text(json.dumps(finite_metrics(ray.get(base_task)), indent=2))
        except Exception as e:  # the trials' adapters are still worth publishing
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"WARNING: the base model's evaluation failed ({reason}); publishing without base metrics")
    if base_file.is_file():
        base_metrics = json.loads(base_file.read_text())

    rows = _collect(results, config, packed.share if packed else (lambda hparams: resources["gpu"]))
    # Best first; a NaN or missing metric ranks last (NaN compares false both ways and would sort anywhere),
    # and a diverged trial after every healthy one, whatever it scored before its loss went NaN.
    # With a growing eval set, a trial stopped before its full evaluation ranks after every one that had it
    # (their scores are on different examples; ASHA judged it the weaker at its rung).
    ranked = sorted((r for r in rows if r["best"]),
                    key=lambda r: (r["status"] == "diverged", *rank_key(r["best"], s.metric, s.mode)))
    registry = Registry(config.registry_dir)
    # Recorded on each entry: how its base was loaded and how it was evaluated (serving uses the same).
    task = task_settings(config.data, num_beams=config.train.num_beams, base_model=prepared.model_path)
    load = load_settings(config.model)
    published = []
    for row in [r for r in ranked if r["status"] != "diverged"][: s.top_k]:
        with row["checkpoint"].as_directory() as ckpt_dir:  # a local copy if storage is remote
            info = json.loads((Path(ckpt_dir) / TRIAL_INFO).read_text())
            candidate = Candidate(
                adapter_id=make_adapter_id(prepared.name, row["trial_id"]),
                source_dir=Path(ckpt_dir),
                metrics=info["metrics"],
                hyperparameters=info["hyperparameters"],
                trial_id=row["trial_id"],
                step=info["metrics"]["step"],
            )
            published += registry.publish([candidate], base_model=prepared.model_path, base_metrics=base_metrics,
                                          task=task, load=load, metric=s.metric, mode=s.mode,
                                          sweep=prepared.name)
    summary = {
        "sweep": prepared.name,
        "wall_s": round(time.time() - started, 1),
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "errored": sum(r["status"] == "error" for r in rows),
        "skipped": sum(bool(r["error"]) and r["error"].startswith(DOES_NOT_FIT) for r in rows),  # among the errored
        "diverged": sum(r["status"] == "diverged" for r in rows),
        "trial_seconds": round(sum(r["trial_s"] for r in rows), 1),
        "base_metrics": base_metrics,
        "leaderboard": [{k: v for k, v in r.items() if k != "checkpoint"} for r in ranked],
        "failed": [{k: r[k] for k in ("trial_id", "hyperparameters", "error")} for r in rows if not r["best"]],
        "published": published,
        "registry": str(config.registry_dir),
        "checkpoints": dict(zip(("bytes", "count"), storage.checkpoint_usage(config, prepared.name), strict=True)),
    }
    (record_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    board = leaderboard(summary, config, registry.read())
    plot_lines = plots.write_search_plots(rows, s, record_dir)
    (record_dir / "report.md").write_text(report(summary, board, config, plot_lines))
    print(board)
    print(f"Report: {record_dir / 'report.md'}   TensorBoard: tensorboard --logdir {experiment}\n"
          f"Checkpoints in storage: {summary['checkpoints']['count']} ({summary['checkpoints']['bytes'] / 1e6:.1f} MB)")
    return summary


def _packed_resources(prepared: Prepared, resources: dict) -> search.PackedResources:
    """gpus_per_trial "auto" on a cluster with GPUs: the workers' GPU memory (the setting, else measured or
    known from the cluster), then each trial's share of it. Exits with a one-line error (code 2) when the
    GPU memory cannot be known."""
    s = prepared.config.search
    if s.gpu_memory_gb:
        gpu_gb, how = float(s.gpu_memory_gb), "--gpu-memory-gb"
    else:
        gpu_gb, how = gpu_memory_gb()
    if gpu_gb is None:
        ray.shutdown()
        print(f"error: --gpus-per-trial auto needs the memory of the workers' GPUs, and {how}: give it with "
              "--gpu-memory-gb (e.g. 24 for an A10G), or a number of GPUs per trial", file=sys.stderr)
        raise SystemExit(2)
    packed = search.PackedResources(resources["cpu"], gpu_gb, prepared.predicted,
                                    prepared.config.train.memory_limit_gb)
    shares = packed.shares(s)
    print(f"GPU shares by predicted peak memory on a {gpu_gb:g} GB GPU ({how}; with "
          f"{search.SHARE_HEADROOM:.0%} headroom, in steps of 1/{search.SHARE_STEPS}): "
          + "; ".join(f"r {r} {targets} {prepared.predicted[(r, targets)]:.2f} GB -> {share:g}"
                      for (r, targets), share in shares.items()))
    return packed


def _collect(results, config: Config, gpus_of=lambda hparams: None) -> list[dict]:
    s = config.search
    rows = []
    for result in results:
        metrics = result.metrics or {}
        checkpoint = best = None
        if result.best_checkpoints:  # the one Tune kept by score (sweeps from before "score": by the metric)
            checkpoint, best = min(reversed(result.best_checkpoints),  # (ties: the latest)
                                   key=lambda kept: metric_rank_key(kept[1].get("score", kept[1].get(s.metric)),
                                                                    s.mode))
        evals = metrics.get("training_iteration", 0)
        if result.error:
            status = "error"
        elif metrics.get("diverged"):
            status = "diverged"  # NaN/inf training loss: stopped, ranked last, never published
        elif evals < config.train.num_evals:
            status = "stopped early"
        else:
            status = "completed"
        rows.append({
            "trial_id": metrics.get("trial_id") or Path(result.path).name.removeprefix("trial-"),
            "hyperparameters": result.config,
            "status": status,
            "evals": evals,
            "micro_batch_size": metrics.get("micro_batch_size"),
            "gpus": gpus_of(result.config),  # the trial's GPU share (what its resources asked Ray for)
            "oom_retries": metrics.get("oom_retries", 0),
            "best": finite_metrics({k: best[k] for k in (*METRICS, "step", "eval_examples", "eval_examples_total")
                                  if k in best})
            if best else None,
            "best_of": _best_of(result),
            "trial_s": round(float(metrics.get("time_total_s") or 0.0), 1),  # the trial's own run time
            "checkpoint": checkpoint,
            "error": _error_reason(result.error) if result.error else None,
        })
    return rows


def _best_of(result) -> dict[str, float]:
    """Each metric's best value over the trial's evaluations of the most examples it reached (its checkpoint
    is chosen by the sweep's metric alone): what the trial reached for every objective, e.g. for
    bench/search_efficiency.py."""
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return {}
    out = {}
    if "eval_examples" in frame and frame["eval_examples"].notna().any():
        # A growing eval set: only the largest evaluations it reached compare (recorded with the values).
        frame = frame[frame["eval_examples"] == frame["eval_examples"].max()]
        out["eval_examples"] = int(frame["eval_examples"].iloc[0])
    for metric, mode in METRICS.items():
        if metric in frame:
            values = [float(v) for v in frame[metric] if v is not None and math.isfinite(float(v))]
            if values:
                out[metric] = max(values) if mode == "max" else min(values)
    return out


def _error_reason(error: BaseException) -> str:
    """The trial's own exception in one line (a RayTaskError's first line only names the worker)."""
    cause = getattr(error, "cause", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(cause).__name__}: {text}"[:500]


def report(summary: dict, board: str, config: Config, plot_lines: list[str]) -> str:
    """The sweep in markdown: what ran, the leaderboard, what failed, where things are."""
    lines = [f"# {summary['sweep']}", "",
             f"{summary['trials']} trials in {summary['wall_s']:.0f} s, optimizing {config.search.metric} "
             f"({config.search.mode}): {summary['completed']} completed, {summary['stopped_early']} stopped early "
             f"by ASHA, {summary['errored']} errored, {summary['diverged']} diverged (NaN/inf loss: stopped, "
             "ranked last, not published).", "",
             f"Model `{config.model.name}`, data `{config.data.dataset}`.", "", "## Leaderboard", "", "```",
             board.strip(), "```", ""]
    if summary["failed"]:
        lines += ["## Failures", ""] + [f"- trial `{r['trial_id']}` ({r['hyperparameters']}): {r['error']}"
                                         for r in summary["failed"]] + [""]
    lines += [*plot_lines, ""]
    checkpoints = summary["checkpoints"]
    lines += ["## Where things are", "", f"- registry: `{summary['registry']}` (published: "
              f"{', '.join(f'`{p}`' for p in summary['published']) or 'none'})",
              f"- Tune results and per-trial TensorBoard events: `{storage.experiment_path(config, summary['sweep'])}`",
              f"- trial checkpoints: {checkpoints['count']} ({checkpoints['bytes'] / 1e6:.1f} MB; at most two per "
              "trial, its best and its latest: adapter, optimizer, schedule and RNG state, no base weights)"]
    if config.mlflow:
        lines.append(f"- MLflow: experiment `{summary['sweep']}` at `{config.mlflow}` (one run per trial)")
    return "\n".join([*lines, ""])


def _metrics_columns(metrics: dict) -> str:
    """rougeL rouge1 rouge2 loss, 7 wide each; '-' for a missing or NaN value (stored as null)."""
    values = [metrics.get(k) for k in ("rougeL", "rouge1", "rouge2", "eval_loss")]
    return " ".join(f"{v:>7.4f}" if isinstance(v, (int, float)) else f"{'-':>7}" for v in values)


def leaderboard(summary: dict, config: Config, index: dict) -> str:
    published = set(summary["published"])
    packed = config.search.gpus_per_trial == search.AUTO  # each trial's GPU share follows its configuration
    header = f"{'#':>2}  {'trial':<10} {'r':>3} {'alpha':>5} {'lr':>9} {'targets':<11} {'evals':>5} " \
             f"{'status':<13} {'rougeL':>7} {'rouge1':>7} {'rouge2':>7} {'loss':>7}"
    lines = ["", f"Leaderboard ({config.search.metric}, {config.search.mode}) — {summary['sweep']}", header,
             "-" * len(header)]
    for i, row in enumerate(summary["leaderboard"], 1):
        hp, m = row["hyperparameters"], row["best"]
        mark = "*" if make_adapter_id(summary["sweep"], row["trial_id"]) in published else " "
        lines.append(
            f"{i:>2}{mark} {row['trial_id']:<10} {hp['r']:>3} {hp['lora_alpha']:>5} {hp['learning_rate']:>9.2e} "
            f"{hp['target_modules']:<11} {row['evals']:>5} {row['status']:<13} {_metrics_columns(m)}"
            + (f"  (out of memory {row['oom_retries']}x: micro-batch {row['micro_batch_size']})"
               if row.get("oom_retries") else "")
            + (f"  (GPU share {row['gpus']:g})" if packed and row.get("gpus") else "")
            + (f"  (scored on {m['eval_examples']} of {m['eval_examples_total']} eval examples)"
               if eval_set.partial(m) else "")
        )
    for row in summary["failed"]:
        error, hp = row["error"] or "", row["hyperparameters"]
        if error.startswith(DOES_NOT_FIT):  # the memory plan: too big for its GPU (share) even at micro-batch 1
            lines.append(f"   {row['trial_id']:<10} {hp['r']:>3} {hp['lora_alpha']:>5} {hp['learning_rate']:>9.2e} "
                         f"{hp['target_modules']:<11} {'':>5} {'skipped':<13} does not fit: "
                         f"{error.removeprefix(DOES_NOT_FIT)}")
        else:
            lines.append(f"   {row['trial_id']:<10} failed before its first evaluation: {error}")
    lines.append(f"{'':>3} {'base model':<52} {'':<13} {_metrics_columns(summary['base_metrics'])}"
                 + ("" if summary["base_metrics"] else "  (its evaluation failed)"))
    lines.append(
        f"\n{summary['trials']} trials in {summary['wall_s']:.0f} s "
        f"({summary.get('trial_seconds', 0):.0f} trial-seconds): {summary['completed']} completed, "
        f"{summary['stopped_early']} stopped early by ASHA, {summary['errored']} errored"
        + (f" ({summary['skipped']} skipped: predicted not to fit)" if summary.get("skipped") else "")
        + f", {summary['diverged']} diverged (NaN loss)."
    )
    lines.append(f"* published to the registry: {summary['registry']} (default: {index.get('default')})")
    lines.append("Serve them with: serve run serve.app   (QLORA_RAY_REGISTRY=" + summary["registry"] + ")")
    return "\n".join(lines)
