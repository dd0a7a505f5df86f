"""One QLoRA trial: 4-bit base + LoRA adapter, trained by Seq2SeqTrainer, reported to Tune.

`run_trial` is the Tune trainable. Read it top to bottom: load the base 4-bit, add the
adapter, train, and at every evaluation report ROUGE and loss with an adapter-only
checkpoint. `evaluate_base` runs the same evaluation on the un-adapted base.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from peft import get_peft_model, set_peft_model_state_dict
from ray import tune
from safetensors.torch import load_file
from transformers import (
    DataCollatorForSeq2Seq,
    PrinterCallback,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
    set_seed,
)

from qlora_ray.config import Config
from qlora_ray.data import TokenizedData
from qlora_ray.metrics import ROUGE_TYPES, seq2seq_rouge
from qlora_ray.model import (
    compute_dtype,
    discover_architecture,
    load_base_model,
    load_tokenizer,
    lora_config,
    prepare_for_training,
    trainable_to_fp32,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRIAL_INFO = "qlora_ray.json"  # hyperparameters and metrics saved beside the adapter


def run_trial(hparams: dict, *, config: Config, data: TokenizedData, model_path: str) -> None:
    """Tune trainable. hparams: r, lora_alpha, learning_rate, target_modules (a set name)."""
    _limit_threads(config)
    set_seed(config.train.seed)
    tokenizer = load_tokenizer(model_path, config.model)
    model = build_model(model_path, config, hparams)

    start_step = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # resumed or retried: continue from the last reported adapter
        with checkpoint.as_directory() as ckpt_dir:
            set_peft_model_state_dict(model, load_file(Path(ckpt_dir) / ADAPTER_WEIGHTS))
            start_step = json.loads((Path(ckpt_dir) / TRIAL_INFO).read_text())["metrics"]["step"]
    remaining = config.train.max_steps - start_step
    if remaining <= 0:
        return

    with tempfile.TemporaryDirectory() as work_dir:
        trainer = build_trainer(model, tokenizer, data, config, work_dir, hparams["learning_rate"], remaining)
        trainer.add_callback(_ReportToTune(model, hparams, start_step))
        trainer.train()


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
        trainer = build_trainer(model, tokenizer, data, config, work_dir, learning_rate=0.0, max_steps=1)
        metrics = trainer.evaluate()
    return _tune_metrics(metrics) | {"footprint_bytes": int(model.get_base_model().get_memory_footprint())}


def build_model(model_path: str, config: Config, hparams: dict):
    """The 4-bit base with a fresh LoRA adapter, ready to train."""
    base = load_base_model(model_path, config.model)
    targets = discover_architecture(base).resolve_targets(hparams["target_modules"])
    base = prepare_for_training(base, config.model, config.train.gradient_checkpointing)
    lora = lora_config(int(hparams["r"]), int(hparams["lora_alpha"]), targets, config.lora)
    model = get_peft_model(base, lora)
    trainable_to_fp32(model)
    return model


def build_trainer(model, tokenizer, data: TokenizedData, config: Config, work_dir: str, learning_rate: float,
                  max_steps: int) -> Seq2SeqTrainer:
    train, gen = config.train, config.data
    dtype = compute_dtype(config.model)
    optim = train.optim
    if optim == "auto":
        optim = "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch"
    args = Seq2SeqTrainingArguments(
        output_dir=work_dir,
        max_steps=max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        learning_rate=learning_rate,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_steps,
        optim=optim,
        eval_strategy="steps",
        eval_steps=train.eval_every,
        save_strategy="no",  # checkpoints go to Tune, adapter only
        logging_steps=max(1, min(10, train.eval_every)),
        predict_with_generate=True,
        generation_max_length=gen.max_target_length,
        generation_num_beams=train.num_beams,
        bf16=dtype == torch.bfloat16,  # autocast: fp32 trainable weights, bf16 matmuls
        use_cpu=not torch.cuda.is_available(),  # (transformers wants this said for bf16 on CPU)
        gradient_checkpointing=train.gradient_checkpointing == "full",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=train.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        label_names=["labels"],
    )
    train_ds, eval_ds = data.datasets()
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        compute_metrics=seq2seq_rouge(tokenizer),
    )
    trainer.remove_callback(PrinterCallback)  # Tune's table reports progress; raw log dicts are noise
    return trainer


def _tune_metrics(metrics: dict[str, float]) -> dict[str, float]:
    out = {key: float(metrics[f"eval_{key}"]) for key in ROUGE_TYPES}
    out["eval_loss"] = float(metrics["eval_loss"])
    return out


class _ReportToTune(TrainerCallback):
    """Each evaluation becomes one Tune report (one ASHA rung step) with the adapter."""

    def __init__(self, model, hparams: dict, start_step: int):
        self.model, self.hparams, self.start_step = model, hparams, start_step
        self.train_loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_loss = float(logs["loss"])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        result = _tune_metrics(metrics) | {"step": self.start_step + state.global_step}
        if self.train_loss is not None:
            result["train_loss"] = self.train_loss
        with tempfile.TemporaryDirectory() as ckpt_dir:
            self.model.save_pretrained(ckpt_dir, safe_serialization=True)
            info = {"hyperparameters": self.hparams, "metrics": result}
            Path(ckpt_dir, TRIAL_INFO).write_text(json.dumps(info, indent=2))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))


def _limit_threads(config: Config) -> None:
    # Trials share the machine: one torch thread per CPU Ray gave the trial.
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", config.search.cpus_per_trial)))
