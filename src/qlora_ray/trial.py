"""One QLoRA trial: 4-bit base + LoRA adapter, trained by its task's Trainer, reported to Tune.

`run_trial` is the Tune trainable. Read it top to bottom: load the base 4-bit, add the
adapter, train, and at every evaluation report ROUGE and loss with an adapter-only
checkpoint. `evaluate_base` runs the same evaluation on the un-adapted base.
"""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import datasets
import ray
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from ray import tune
from transformers import AutoConfig, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import logging as transformers_logging

from qlora_ray import eval_set, faults, memory, notices, tasks
from qlora_ray.config import METRICS, Config
from qlora_ray.data import TokenizedData
from qlora_ray.devices import device_note, trial_id
from qlora_ray.metrics import ROUGE_TYPES
from qlora_ray.model import (
    compile_blocks,
    compute_dtype,
    discover_architecture,
    load_base_model,
    load_tokenizer,
    lora_config,
    prepare_for_training,
    should_compile,
    trainable_to_fp32,
)

TRIAL_INFO = "qlora_ray.json"  # hyperparameters and metrics saved beside the adapter


# Halvings of the micro-batch a trial tries when out of GPU memory, before it gives up.
OOM_RETRIES = 3


@dataclass
class BatchPlan:
    """How the trial's effective batch is split; halved micro-batches keep its size."""

    micro_batch_size: int
    accumulation: int
    oom_retries: int = 0

    def halved(self) -> BatchPlan:
        return BatchPlan(self.micro_batch_size // 2, self.accumulation * 2, self.oom_retries + 1)


def run_trial(hparams: dict, *, config: Config, data: TokenizedData, model_path: str) -> None:
    """Tune trainable. hparams: r, lora_alpha, learning_rate, target_modules (a set name)."""
    started = time.perf_counter()
    _limit_threads(config)
    set_seed(config.train.seed)
    plan = plan_to_fit(model_path, config, hparams)
    tokenizer = load_tokenizer(model_path, config.model)
    model = build_model(model_path, config, hparams, warm=True)
    print(device_note(model, role="trial", trial_id=trial_id()), flush=True)  # its GPU, for bench/multi_gpu.sh
    try:
        _train(model, tokenizer, hparams, plan, config, data, started)
    finally:  # also when ASHA stops the trial (its thread exits inside tune.report) or it fails
        try:
            park_base(model, model_path, config)
        except Exception as e:  # a base that cannot be cleaned is not reused
            print(f"(not keeping the base for the next trial: {type(e).__name__}: {e})", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()


def _train(model, tokenizer, hparams: dict, plan: BatchPlan, config: Config, data: TokenizedData,
           started: float) -> None:
    fresh_adapter = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}

    with tempfile.TemporaryDirectory() as work_dir:
        resume_from = None
        checkpoint = tune.get_checkpoint()
        if checkpoint:  # resumed or retried: the Trainer restores adapter, optimizer, schedule, RNG, data position
            resume_from = checkpoint.to_directory(os.path.join(work_dir, "restored"))
            saved_plan = json.loads(Path(resume_from, TRIAL_INFO).read_text()).get("batch")
            plan = BatchPlan(**saved_plan) if saved_plan else plan  # (checkpoints from before OOM retries)
        while True:
            trainer = build_trainer(model, tokenizer, data, config, work_dir, hparams["learning_rate"], plan)
            reporter = _ReportToTune(hparams, plan, config, setup_s=time.perf_counter() - started)
            trainer.add_callback(reporter)
            if injector := faults.trainer_callback(plan.micro_batch_size):
                trainer.add_callback(injector)
            if resume_from is None:
                set_seed(config.train.seed)
            try:
                trainer.train(resume_from_checkpoint=resume_from)
                break
            except torch.OutOfMemoryError as e:
                if plan.micro_batch_size == 1 or plan.oom_retries >= OOM_RETRIES:
                    raise
                reason = str(e).splitlines()[0][:200]
            # Out of memory (handled outside the except block, so the traceback's tensors are freed):
            # the same effective batch in smaller pieces, from the last checkpoint or the start.
            smaller = plan.halved()
            resume_from = reporter.last_checkpoint or resume_from
            where = f"the checkpoint {Path(resume_from).name}" if resume_from else "the start"
            print(f"Out of memory with micro-batch {plan.micro_batch_size} ({reason}); retrying with micro-batch "
                  f"{smaller.micro_batch_size} x {smaller.accumulation} accumulation (same effective batch) "
                  f"from {where}", flush=True)
            plan = smaller
            if resume_from is None:
                set_peft_model_state_dict(model, fresh_adapter)
            model.zero_grad(set_to_none=True)
            del trainer, reporter
            gc.collect()
            torch.cuda.empty_cache()
        if reporter.diverged_at is not None:
            # Marked and ended: NaN metrics rank the trial last; its earlier checkpoints are not published.
            nan = float("nan")
            tune.report({key: nan for key in METRICS} | {"score": nan, "step": reporter.diverged_at,
                                                          "train_loss": nan, "diverged": 1} | reporter.batch_metrics())


class DoesNotFit(RuntimeError):
    """The predicted peak memory exceeds the limit even at micro-batch 1."""


def memory_limit_gb(config: Config) -> float | None:
    """What a trial may plan for: the set limit, else its share of the GPU (the share Ray gave it, which
    --gpus-per-trial auto sizes by its prediction) times the GPU's memory (CUDA's figure; where there is
    no CUDA but Ray gave it a GPU, e.g. a GPU declared for tests, search.gpu_memory_gb). None without."""
    if config.train.memory_limit_gb:
        return config.train.memory_limit_gb
    given = ray.get_runtime_context().get_assigned_resources().get("GPU") if ray.is_initialized() else None
    number = config.search.gpus_per_trial if isinstance(config.search.gpus_per_trial, (int, float)) else None
    share = min(1.0, given or number or 1.0)
    if torch.cuda.is_available():
        gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    elif given and config.search.gpu_memory_gb:
        gpu_gb = float(config.search.gpu_memory_gb)
    else:
        return None
    if given:
        print(f"GPU share {share:g} of a {gpu_gb:.1f} GB GPU: planning within {share * gpu_gb:.2f} GB", flush=True)
    return gpu_gb * share


def plan_to_fit(model_path: str, config: Config, hparams: dict) -> BatchPlan:
    """The configured batch plan, split into smaller micro-batches (same effective batch) until the
    memory estimate fits; DoesNotFit when not even micro-batch 1 does."""
    plan = BatchPlan(config.train.batch_size, config.train.gradient_accumulation_steps)
    limit = memory_limit_gb(config)
    if limit is None:
        return plan
    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
    dtype = str(compute_dtype(config.model)).removeprefix("torch.")

    def predicted(micro: int) -> float:
        return memory.estimate_trial(model_config, config, hparams, micro_batch_size=micro,
                                     compute_dtype=dtype).total_gb

    try:
        first = predicted(plan.micro_batch_size)
    except (ValueError, KeyError, TypeError) as e:  # an architecture the estimator does not know: as configured
        print(f"No memory estimate for this model ({e}); training at micro-batch {plan.micro_batch_size}")
        return plan
    if first <= limit:
        return plan
    while plan.micro_batch_size > 1 and predicted(plan.micro_batch_size) > limit:
        plan = BatchPlan(plan.micro_batch_size // 2, plan.accumulation * 2)
    if predicted(plan.micro_batch_size) > limit:
        raise DoesNotFit(f"predicted peak {predicted(1):.1f} GB at micro-batch 1 exceeds the {limit:.1f} GB limit")
    print(f"Predicted peak {first:.1f} GB at micro-batch {config.train.batch_size} exceeds {limit:.1f} GB: "
          f"training at micro-batch {plan.micro_batch_size} x {plan.accumulation} accumulation "
          f"({predicted(plan.micro_batch_size):.1f} GB predicted; same effective batch)", flush=True)
    return plan


def evaluate_base(*, config: Config, data: TokenizedData, model_path: str) -> dict[str, float]:
    """The un-adapted base's metrics, through the very evaluation the trials run.

    A fresh LoRA adapter is the identity (B is initialised to zero, dropout is off in
    eval, modules_to_save start as copies), so this measures the base exactly.
    """
    _limit_threads(config)
    set_seed(config.train.seed)
    tokenizer = load_tokenizer(model_path, config.model)
    hparams = {"r": 1, "lora_alpha": 1, "target_modules": "all-linear", "learning_rate": 0.0}
    model = build_model(model_path, config, hparams)
    with tempfile.TemporaryDirectory() as work_dir:
        trainer = build_trainer(model, tokenizer, data, config, work_dir, learning_rate=0.0)
        metrics = trainer.evaluate()
    return _tune_metrics(metrics) | {"footprint_bytes": int(model.get_base_model().get_memory_footprint())}


def build_model(model_path: str, config: Config, hparams: dict, *, warm: bool = False):
    """The 4-bit base with a fresh LoRA adapter, ready to train. warm: the base this process's previous
    trial parked (park_base), when it was loaded and prepared the same way, instead of a fresh load."""
    base = _take_warm_base(model_path, config) if warm else None
    if base is None:
        base = prepare_for_training(load_base_model(model_path, config.model), config.model,
                                    config.train.gradient_checkpointing)
    targets = discover_architecture(base).resolve_targets(hparams["target_modules"])
    task = tasks.resolve(config.model.task, base.config)
    lora = lora_config(int(hparams["r"]), int(hparams["lora_alpha"]), targets, config.lora, task.PEFT_TASK_TYPE)
    set_seed(config.train.seed)  # the adapter's initial weights, whether the base was loaded now or kept warm
    model = get_peft_model(base, lora)
    trainable_to_fp32(model)
    if should_compile(config.train.compile, causal=task.PEFT_TASK_TYPE == "CAUSAL_LM",
                      gradient_checkpointing=config.train.gradient_checkpointing):
        compile_blocks(model)  # compiled on the first training step; evaluation runs eagerly
    return model


# ---- warm trials ----------------------------------------------------------------------------------
# Tune reuses a trial's actor process for the next trial (TuneConfig(reuse_actors=True)), so imports are
# paid once per worker. The prepared 4-bit base is kept too: a trial parks it at its end with its adapter
# stripped (PEFT's unload: the LoRA layers give back their base layers, unmerged), and the next trial
# whose base would be loaded and prepared the same way takes it. Only LoRA layers, the trainer and the
# optimizer are per trial; tests/test_warm_trials.py checks that a trial's losses do not depend on
# what ran before it in the process.
_warm: tuple[tuple, torch.nn.Module] | None = None
WARM_BASE_NOTE = "Warm worker: the 4-bit base of this process's previous trial, its adapter stripped"


def _warm_key(model_path: str, config: Config) -> tuple:
    return model_path, json.dumps(asdict(config.model), sort_keys=True), config.train.gradient_checkpointing


def _take_warm_base(model_path: str, config: Config) -> torch.nn.Module | None:
    global _warm
    parked, _warm = _warm, None  # taken, so a trial that fails before parking it leaves nothing half-used
    if parked is not None and parked[0] == _warm_key(model_path, config):
        print(f"{WARM_BASE_NOTE} (pid {os.getpid()})", flush=True)
        return parked[1]
    del parked
    gc.collect()
    torch.cuda.empty_cache()
    return None


def park_base(model, model_path: str, config: Config) -> None:
    """The trial's end: strip its adapter and keep the base for this process's next trial."""
    global _warm
    base = model.get_base_model()
    _strip_adapter(base)
    for name in ("peft_config", "_hf_peft_config_loaded"):
        if name in vars(base):
            delattr(base, name)
    base.zero_grad(set_to_none=True)
    _warm = (_warm_key(model_path, config), base)


def _strip_adapter(module: torch.nn.Module) -> None:
    """Every LoRA layer back to its base layer, every modules_to_save wrapper back to its original module.
    (PEFT's unload() keeps the *trained* copy of a modules_to_save module, e.g. T5's lm_head: the next
    trial would start from this one's head.)"""
    for name, child in list(module.named_children()):
        if isinstance(child, AuxiliaryTrainingWrapper):
            child = child.original_module
            setattr(module, name, child)
        elif isinstance(child, BaseTunerLayer):
            child = child.get_base_layer()
            setattr(module, name, child)
        _strip_adapter(child)


def build_trainer(model, tokenizer, data: TokenizedData, config: Config, work_dir: str, learning_rate: float,
                  plan: BatchPlan | None = None, max_steps: int | None = None) -> Trainer:
    """The task's trainer with what every trial shares: batch plan, optimizer, checkpoints, logging."""
    train = config.train
    plan = plan or BatchPlan(train.batch_size, train.gradient_accumulation_steps)
    dtype = compute_dtype(config.model)
    optim = train.optim
    if optim == "auto":
        optim = "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch"
    training_args = dict(
        output_dir=work_dir,
        max_steps=max_steps or train.max_steps,
        per_device_train_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.accumulation,
        per_device_eval_batch_size=train.eval_batch_size,
        learning_rate=learning_rate,
        weight_decay=train.weight_decay,
        warmup_steps=max(train.warmup_steps, math.ceil(train.warmup_ratio * (max_steps or train.max_steps))),
        lr_scheduler_type=train.lr_scheduler_type,
        max_grad_norm=train.max_grad_norm,
        **_sampling_args(train.group_by_length),
        optim=optim,
        eval_strategy="steps",
        eval_steps=train.eval_every,
        # A checkpoint at every evaluation, reported to Tune: adapter (no base weights), optimizer,
        # LR schedule, RNG and step, so a resumed trial continues the same run. One kept locally.
        save_strategy="steps",
        save_steps=train.eval_every,
        save_total_limit=1,
        logging_steps=max(1, min(10, train.eval_every)),
        logging_nan_inf_filter=False,  # a NaN loss must show, to stop the trial
        bf16=dtype == torch.bfloat16,  # autocast: fp32 trainable weights, bf16 matmuls
        use_cpu=not torch.cuda.is_available(),  # (transformers wants this said for bf16 on CPU)
        **_checkpointing_args(train.gradient_checkpointing == "full"),
        seed=train.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    task = tasks.resolve(config.model.task, model.config)
    trainer = task.build_trainer(model, tokenizer, data, config, training_args)
    trainer.remove_callback(PrinterCallback)  # Tune's table reports progress; raw log dicts are noise
    return trainer


def _checkpointing_args(full: bool) -> dict:
    # transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing*; the old names warn.
    known = {f.name for f in fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    return {name: full, f"{name}_kwargs": {"use_reentrant": False}}


def _sampling_args(group_by_length: bool) -> dict:
    # transformers 5.2x replaced group_by_length=True with train_sampling_strategy="group_by_length".
    if not group_by_length:
        return {}
    known = {f.name for f in fields(TrainingArguments)}
    if "train_sampling_strategy" in known:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _tune_metrics(metrics: dict[str, float]) -> dict[str, float]:
    out = {key: float(metrics[f"eval_{key}"]) for key in ROUGE_TYPES}
    out["eval_loss"] = float(metrics["eval_loss"])
    return out


class _ReportToTune(TrainerCallback):
    """Each evaluation becomes one Tune report (one ASHA rung step) with the Trainer's checkpoint: the
    metrics, how many eval examples they scored, and the `score` Tune keeps checkpoints by (eval_set.score).

    A non-finite training loss stops the trial before it evaluates or saves again.
    """

    def __init__(self, hparams: dict, plan: BatchPlan, config: Config, setup_s: float | None = None):
        self.hparams, self.plan, self.setup_s = hparams, plan, setup_s
        self.metric, self.mode = config.search.metric, config.search.mode
        self.train_loss: float | None = None
        self.pending: dict | None = None  # this step's evaluation, reported with its checkpoint
        self.last_checkpoint: str | None = None
        self.diverged_at: int | None = None

    def batch_metrics(self) -> dict:
        # setup_s: the trial's fixed cost, from its start to its Trainer (a warm worker skips the base's load)
        return {"micro_batch_size": self.plan.micro_batch_size, "oom_retries": self.plan.oom_retries,
                "setup_s": round(self.setup_s, 2) if self.setup_s is not None else None}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_loss = float(logs["loss"])
            if not math.isfinite(self.train_loss):
                self.diverged_at = state.global_step
                control.should_training_stop = True
                control.should_evaluate = control.should_save = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        scored = _tune_metrics(metrics)
        examples, total = int(metrics["eval_examples"]), int(metrics["eval_examples_total"])
        self.pending = scored | {"score": eval_set.score(scored, self.metric, self.mode, examples, total),
                                 "eval_examples": examples, "eval_examples_total": total,
                                 "step": state.global_step} | self.batch_metrics()
        if self.train_loss is not None:
            self.pending["train_loss"] = self.train_loss

    def on_save(self, args, state, control, **kwargs):
        if self.pending is None:  # the Trainer's own save at the last step, without an evaluation
            return
        ckpt_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # (score is Tune's bookkeeping, eval_set.PARTIAL off after a partial evaluation: not a metric)
        metrics = {k: v for k, v in self.pending.items() if k != "score"}
        info = {"hyperparameters": self.hparams, "metrics": metrics, "batch": asdict(self.plan)}
        (ckpt_dir / TRIAL_INFO).write_text(json.dumps(info, indent=2))
        tune.report(self.pending, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
        self.pending, self.last_checkpoint = None, str(ckpt_dir)


def _limit_threads(config: Config) -> None:
    if not notices.verbose():  # every trial loads the base and TRL re-maps its data: a bar each is noise
        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    # Trials share the machine: one torch thread per CPU Ray gave the trial.
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", config.search.cpus_per_trial)))
