"""Causal QLoRA training throughput: two published recipes against the project's trial path.

Run on a GPU (through the device tool, see bench/README.md):

    python3 bench/causal_throughput.py --out bench/results

Both sides of each pair train the same architecture (random weights from its config, built by
`qlora_ray.random_init`: speed and memory do not depend on weight values) on the same rows:
full-length 512-token rows, no padding.

- phi2 (Phi-2 on DialogSum). baseline: the recipe as published, through transformers'
  Trainer: 4-bit NF4 without double quant, fp16 compute, `gradient_checkpointing_enable()` +
  peft's `prepare_model_for_kbit_training`, LoRA r=32/alpha=32/dropout 0.05 on
  q_proj,k_proj,v_proj,dense, batch 1 x 4 accumulation, lr 2e-4, paged_adamw_32bit, warmup 1
  step, group_by_length, DataCollatorForLanguageModeling (the loss covers every token).
- llama2_7b (Llama-2-7B SFT). baseline: the recipe as published, through TRL's SFTTrainer
  (`peft_config=` LoRA r=64/alpha=16/dropout 0.05 on every linear projection): 4-bit NF4 with
  double quant, bf16 compute, batch 5 x 2 accumulation, lr 2e-4, weight decay 0.001,
  max_grad_norm 0.3, warmup ratio 0.03, constant schedule, gradient checkpointing, packing,
  max_seq_length 512, pad token = eos, right padding.
- project: what a sweep trial runs: `trial.plan_to_fit` (on a GPU of the goal's size: 16 GB for
  Phi-2, 24 GB for Llama-2-7B), `trial.build_model` + `trial.build_trainer` with the preset's
  settings (phi-2-dialogsum, llama2-7b-sft) and the recipe's hyperparameters, timed from one
  optimizer step to the next inside `Trainer.train()`. Its rows are the causal task's columns:
  Phi-2's preset reads prompt + completion pairs (the loss covers the last max_target_length = 64
  tokens), Llama-2's formatted text (the loss covers every token, as in the recipe).

samples/s is rows per second from the median optimizer step after warm-up; peak_gb is
`torch.cuda.max_memory_allocated()` over the timed steps (paged optimizer states live in CUDA
managed memory, outside it: `paged_optimizer_gb` gives them, `peak_with_paged_gb` the sum).

The loss check trains both sides of a pair from the same adapter weights (the baseline's fresh
adapter copied into the project's), dropout off, on the same batch of 4 rows with the loss on
every token (the project's rows then count every token as completion), accumulation 1, and
compares the losses step by step. Writes causal_throughput.json under --out (merged by model,
so `--models` runs can be done one at a time). `--smoke` runs tiny configs on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qlora_ray import memory, trial  # noqa: E402
from qlora_ray.config import ModelSettings, available_presets, load_config  # noqa: E402
from qlora_ray.data import TokenizedData  # noqa: E402
from qlora_ray.model import load_tokenizer, resolve_model_path  # noqa: E402

SEQ = 512
LOSS_BATCH = 4
GPU = torch.cuda.is_available()

# The recipes. "hparams" are the published LoRA settings, the project's trial gets the same.
MODELS = {
    "phi2": {
        "preset": "phi-2-dialogsum",
        "hparams": {"r": 32, "lora_alpha": 32, "target_modules": "q_proj+k_proj+v_proj+dense", "learning_rate": 2e-4},
        "goal": {"min_speedup": 6.0, "max_peak_gb": 16.0},
        "recipe": "transformers Trainer: NF4 (no double quant), fp16 compute, gradient_checkpointing_enable + "
                  "prepare_model_for_kbit_training, LoRA r32/a32/d0.05 on q,k,v,dense, batch 1 x 4 accumulation, "
                  "lr 2e-4, paged_adamw_32bit, warmup 1 step, group_by_length, loss on every token",
        "project_differs": [
            "torch.compile of each decoder layer's norms, attention and MLP (train.compile auto; the loss "
            "check's compile_check compares its gradients with eager and fp32)",
            "bf16 compute with autocast (the recipe: fp16 compute, no autocast; prepare_model_for_kbit_training "
            "makes norms, embeddings and head fp32, so its residual stream is fp32)",
            "micro-batch 8 x 1 accumulation = effective batch 8 (the recipe: 1 x 4 = 4), same lr, optimizer and "
            "schedule; project_variants has micro-batch 4 x 1, the recipe's effective batch",
            "no gradient checkpointing (the recipe: every layer)",
            "Phi's gelu_new as torch's fused tanh GELU (the same function) and LayerNorm outputs in bf16 under "
            "autocast (model.prepare_for_training)",
            "loss on the completion (64 of 512 tokens, the preset's prompt/completion split) through TRL's fused "
            "LM head; the recipe: every token through full logits (the head is ~5% of Phi-2's matmul work)",
        ],
    },
    "llama2_7b": {
        "preset": "llama2-7b-sft",
        "hparams": {"r": 64, "lora_alpha": 16, "target_modules": "all-linear", "learning_rate": 2e-4},
        "goal": {"min_speedup": 2.0, "max_peak_gb": 24.0},
        # The preset says constant_with_warmup (what the recipe's warmup_ratio meant); the check compares the
        # two paths' arithmetic, so the project takes the recipe's literal schedule there.
        "loss_check_train": {"lr_scheduler_type": "constant"},
        "recipe": "TRL SFTTrainer(peft_config=...): NF4 + double quant, bf16 compute, LoRA r64/a16/d0.05 on "
                  "q,k,v,o,gate,up,down, batch 5 x 2 accumulation, lr 2e-4, weight decay 0.001, max_grad_norm 0.3, "
                  "warmup ratio 0.03, constant schedule, gradient checkpointing, packing, max_seq_length 512, "
                  "pad = eos, right padding, loss on every token",
        "project_differs": [
            "torch.compile of each decoder layer's norms, attention and MLP (train.compile auto; the loss "
            "check's compile_check compares its gradients with eager and fp32)",
            "micro-batch 10 x 1 accumulation (the recipe: 5 x 2): the same effective batch 10 in one "
            "forward/backward per step",
            "packed rows attended sequence by sequence (attention.PACKED_SDPA: causal SDPA without a mask) "
            "instead of SDPA with a block-diagonal mask over the padding-free row",
            "schedule constant_with_warmup (the preset's reading of warmup_ratio 0.03; the recipe's literal "
            "constant ignores warmup); the loss check uses constant for both",
        ],
    },
}

# --smoke: tiny versions of the two architectures, trained on the CPU.
TINY = {
    "phi2": {"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_size": 64, "intermediate_size": 256,
             "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 4096, "max_position_embeddings": 256,
             "resid_pdrop": 0.1, "partial_rotary_factor": 0.4, "hidden_act": "gelu_new"},
    "llama2_7b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                  "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 4096,
                  "max_position_embeddings": 256},
}

# --smoke or --standin (exploration), while presets/llama2-7b-sft.yaml does not exist: the recipe's settings.
STANDIN = {"llama2_7b": {
    "model": {"name": "meta-llama/Llama-2-7b-hf", "compute_dtype": "bfloat16"},
    "data": {"max_source_length": 448, "max_target_length": 64},
    "lora": {"dropout": 0.05, "modules_to_save": []},
    "train": {"batch_size": 5, "gradient_accumulation_steps": 2, "optim": "paged_adamw_32bit", "weight_decay": 0.001,
              "max_grad_norm": 0.3, "warmup_ratio": 0.03, "lr_scheduler_type": "constant",
              "gradient_checkpointing": "full", "packing": True},
}}


# ----------------------------------------------------------------------------- data


def synthetic_rows(n: int, tokenizer, seq: int, seed: int) -> list[list[int]]:
    """Random token rows of exactly `seq` tokens, no special tokens (no eos: the recipes pad with it)."""
    special = set(tokenizer.all_special_ids)
    ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return ids[torch.randint(0, len(ids), (n, seq), generator=g)].tolist()


def project_data(rows: list[list[int]], completion: int) -> TokenizedData:
    """The causal task's columns: the last `completion` tokens of each row are the completion.
    (The eval row, never used here, keeps a prompt.)"""
    def columns(rows, completion):
        return {"input_ids": rows, "completion_mask": [[0] * (len(r) - completion) + [1] * completion for r in rows]}

    return TokenizedData(train=columns(rows, completion), eval=columns(rows[:1], min(completion, len(rows[0]) // 2)))


# ----------------------------------------------------------------------------- the recipes


def quiet_kwargs() -> dict:
    return {"report_to": "none", "disable_tqdm": True, "save_strategy": "no", "logging_steps": 25,
            "dataloader_num_workers": 0, "use_cpu": not GPU}


def phi2_recipe(model_dir: str, tokenizer, rows, work: str, *, steps: int, lr: float = 2e-4, batch: int = 1,
                accumulation: int = 4, smoke: bool = False):
    """The Phi-2 / DialogSum recipe as published, written out plainly (transformers Trainer)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    compute = torch.float32 if smoke else torch.float16  # (bitsandbytes' CPU path has no fp16 4-bit matmul)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                             bnb_4bit_use_double_quant=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map=_device_map())
    footprint = model.get_memory_footprint()
    model.gradient_checkpointing_enable()
    model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(r=32, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "dense"], bias="none",
                      lora_dropout=0.05, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    args = TrainingArguments(
        output_dir=work, warmup_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=lr, optim="paged_adamw_32bit" if GPU else "adamw_torch",
        **trial._checkpointing_args(True), **trial._sampling_args(True), **quiet_kwargs())
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    return trainer, footprint


def llama2_recipe(model_dir: str, tokenizer, rows, work: str, *, steps: int, lr: float = 2e-4, batch: int = 5,
                  accumulation: int = 2, smoke: bool = False):
    """The Llama-2-7B SFT recipe as published: TRL's SFTTrainer with a peft_config."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                             bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map=_device_map())
    footprint = model.get_memory_footprint()
    model.config.use_cache = False
    model.config.pretraining_tp = 1
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    args = SFTConfig(
        output_dir=work, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        optim="paged_adamw_32bit" if GPU else "adamw_torch", learning_rate=lr, weight_decay=0.001,
        bf16=GPU or not smoke, max_grad_norm=0.3, max_steps=steps, warmup_steps=math.ceil(0.03 * steps),
        lr_scheduler_type="constant", **trial._checkpointing_args(True), packing=True, max_length=SEQ if not smoke
        else len(rows[0]), **quiet_kwargs())
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=tokenizer, peft_config=lora)
    return trainer, footprint


RECIPES = {"phi2": (phi2_recipe, 1, 4), "llama2_7b": (llama2_recipe, 5, 2)}  # builder, batch, accumulation


def _device_map() -> dict:
    return {"": 0} if GPU else {"": "cpu"}


# ----------------------------------------------------------------------------- measurement


class StepClock:
    """Wall time between consecutive optimizer steps (GPU synchronized); peak memory after warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.last = warmup, [], None
        self.optimizer = None

    def __call__(self, step: int) -> None:
        if GPU:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step + 1 == self.warmup and GPU:
            torch.cuda.reset_peak_memory_stats()
        if step + 1 > self.warmup and self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def trainer_callback(clock: StepClock | None):
    """Times the steps; and no evaluation or checkpoint at the last step (they are not training)."""
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            control.should_evaluate = control.should_save = False
            if clock is not None:
                clock.optimizer = optimizer
                clock(state.global_step - 1)

    return _Clock()


def managed_bytes(optimizer) -> int:
    """Bytes of a paged optimizer's state tensors (CUDA managed memory, outside torch's allocator)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if getattr(value, "is_paged", False):
                total += value.numel() * value.element_size()
    return total


def time_training(trainer, warmup: int, samples_per_step: int) -> dict:
    clock = StepClock(warmup)
    trainer.add_callback(trainer_callback(clock))
    trainer.train()
    s = statistics.median(clock.times)
    out = {"s_per_step": round(s, 4), "samples_per_s": round(samples_per_step / s, 3),
           "tokens_per_s": round(samples_per_step * SEQ / s), "timed_steps": len(clock.times),
           "step_times_s": [round(t, 4) for t in clock.times]}
    if GPU:
        paged = managed_bytes(clock.optimizer)
        free, total = torch.cuda.mem_get_info()
        out |= {"peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
                "paged_optimizer_gb": round(paged / 1e9, 3),
                "peak_with_paged_gb": round((torch.cuda.max_memory_allocated() + paged) / 1e9, 2),
                "device_used_after_gb": round((total - free) / 1e9, 2)}
    else:
        out |= {"peak_gb": None}
    return out


def param_counts(model) -> dict:
    # peft's convention, as in the recipes' print_trainable_parameters: a packed 4-bit byte is 2 parameters.
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_params": trainable, "all_params": total}


def free_gpu() -> None:
    gc.collect()
    if GPU:
        torch.cuda.empty_cache()


def allocated_gb() -> float:
    return round(torch.cuda.memory_allocated() / 1e9, 3) if GPU else 0.0


def no_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def record_losses(model) -> list[float]:
    """Training-mode losses of every forward, read from the model's output (the Trainer's and TRL's
    fused LM head both return one)."""
    losses: list[float] = []

    def hook(module, args, output):
        if module.training and getattr(output, "loss", None) is not None:
            losses.append(float(output.loss.detach()))

    model.get_base_model().register_forward_hook(hook)
    return losses


# ----------------------------------------------------------------------------- one architecture


class Setup:
    """One architecture: its preset config, random-weight checkpoint and tokenizer."""

    def __init__(self, key: str, args):
        self.key, self.spec, self.args = key, MODELS[key], args
        overrides: dict = {"model": {"random_init": True}}
        if args.smoke:
            tiny = Path(args.work) / f"tiny-{key}"
            tiny.mkdir(parents=True, exist_ok=True)
            (tiny / "config.json").write_text(json.dumps(TINY[key]))
            overrides["model"]["name"] = str(tiny)
        # Timing only: no evaluation or checkpoint inside the timed steps.
        overrides["train"] = {"max_steps": 100_000, "eval_every": 100_000}
        if args.compute_dtype:
            overrides["model"]["compute_dtype"] = args.compute_dtype
        preset, config_file = self.spec["preset"], None
        self.standin = preset not in available_presets()
        if self.standin:
            if not (args.smoke or args.standin):
                raise SystemExit(f"preset {preset!r} is not in src/qlora_ray/presets/ (yet); --standin explores "
                                 "with the recipe's settings instead")
            # Before the preset exists: the recipe's settings as a stand-in config file.
            preset, config_file = "tiny-llama-stdlib", Path(args.work) / f"{key}-standin.yaml"
            config_file.write_text(json.dumps(STANDIN[key]))
        self.config = load_config(preset, config_file, overrides=overrides)
        if args.memory_limit_gb or GPU:
            limit = args.memory_limit_gb or self.spec["goal"]["max_peak_gb"]
            self.config = _replace_train(self.config, memory_limit_gb=limit)
        t0 = time.perf_counter()
        self.model_dir = resolve_model_path(ModelSettings(name=self.config.model.name, random_init=True))
        self.build_s = round(time.perf_counter() - t0, 1)
        self.tokenizer = load_tokenizer(self.model_dir, self.config.model)
        self.seq = SEQ if not args.smoke else 64
        # The loss's tokens per row: format text (the Llama SFT preset) counts every token, as the recipe does;
        # prompt-completion rows (Phi-2 / DialogSum) the completion, max_target_length of them.
        text = getattr(self.config.data, "format", None) == "text"
        self.completion = self.seq if text else min(self.config.data.max_target_length, self.seq // 2)
        self.hparams = dict(self.spec["hparams"])

    def fresh_tokenizer(self):
        return load_tokenizer(self.model_dir, self.config.model)


def _replace_train(config, **changes):
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))


def run_baseline(setup: Setup, args) -> dict:
    build, batch, accumulation = RECIPES[setup.key]
    timed = args.warmup + args.steps
    rows = synthetic_rows(batch * accumulation * timed, setup.tokenizer, setup.seq, seed=100)
    start = allocated_gb()
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        trainer, footprint = build(setup.model_dir, setup.fresh_tokenizer(), rows, work, steps=timed,
                                   smoke=args.smoke)
        load_s = time.perf_counter() - t0
        result = time_training(trainer, args.warmup, batch * accumulation)
        result |= {"batch_size": batch, "gradient_accumulation_steps": accumulation,
                   "effective_batch": batch * accumulation, "gradient_checkpointing": "full",
                   "footprint_bytes": footprint, **param_counts(trainer.model),
                   "loss_tokens_per_row": setup.seq - 1, "load_s": round(load_s, 1),
                   "allocated_before_gb": start, "recipe": setup.spec["recipe"]}
    del trainer
    free_gpu()
    print(setup.key, "baseline", json.dumps(result), flush=True)
    return result


def run_project(setup: Setup, args, variants: list[dict]) -> tuple[dict, list[dict]]:
    """The sweep trial's path with the preset's settings; then, on the same loaded model, variants of
    micro-batch / accumulation / checkpointing (exploration: each a separate record)."""
    from qlora_ray.model import checkpoint_feed_forward

    config, hparams = setup.config, setup.hparams
    start = allocated_gb()
    plan = trial.plan_to_fit(setup.model_dir, config, hparams)
    t0 = time.perf_counter()
    model = trial.build_model(setup.model_dir, config, hparams)
    load_s = time.perf_counter() - t0
    footprint = model.get_base_model().get_memory_footprint()
    dtype = str(trial.compute_dtype(config.model)).removeprefix("torch.")
    model_config = model.get_base_model().config

    def measure(model, cfg, plan) -> dict:
        timed = args.warmup + args.steps
        per_step = plan.micro_batch_size * plan.accumulation
        rows = synthetic_rows(per_step * timed, setup.tokenizer, setup.seq, seed=200)
        with tempfile.TemporaryDirectory() as work:
            trainer = trial.build_trainer(model, setup.fresh_tokenizer(), project_data(rows, setup.completion), cfg,
                                          work, hparams["learning_rate"], plan, max_steps=timed)
            out = time_training(trainer, args.warmup, per_step)
            del trainer
        free_gpu()
        try:
            est = memory.estimate_trial(model_config, cfg, hparams, micro_batch_size=plan.micro_batch_size,
                                        compute_dtype=dtype)
            out |= {"predicted_gb": round(est.allocated_gb, 2), "predicted_total_gb": round(est.total_gb, 2)}
            if out.get("peak_gb"):
                out["predicted_error_pct"] = round(100 * (est.allocated_gb - out["peak_gb"]) / out["peak_gb"], 1)
        except (ValueError, KeyError, TypeError) as e:
            out["predicted_gb"] = f"no estimate: {e}"
        return out | {"batch_size": plan.micro_batch_size, "gradient_accumulation_steps": plan.accumulation,
                      "effective_batch": per_step, "gradient_checkpointing": cfg.train.gradient_checkpointing,
                      "compute_dtype": dtype, "optim": cfg.train.optim, "packing": cfg.train.packing}

    result = measure(model, config, plan)
    result |= {"footprint_bytes": footprint, **param_counts(model), "load_s": round(load_s, 1),
               "loss_tokens_per_row": setup.completion, "allocated_before_gb": start,
               "memory_limit_gb": config.train.memory_limit_gb,
               "preset_batch": [config.train.batch_size, config.train.gradient_accumulation_steps],
               "path": f"qlora_ray.trial.plan_to_fit + build_model + build_trainer (what run_trial runs), preset "
                       f"{setup.spec['preset']}, hyperparameters {hparams}"}
    print(setup.key, "project", json.dumps(result), flush=True)

    explored = []
    layers = model.get_base_model().model.layers
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64
    for v in variants:
        ckpt, _, compiled = v["ckpt"].partition("+")
        cfg = _replace_train(config, gradient_checkpointing=ckpt)
        compiled_modules = []
        if compiled == "compile":  # torch.compile each decoder layer (one graph shared by all of them)
            compiled_modules = list(layers)
        elif compiled in ("compile-parts", "compile-blocks"):  # the norms and MLPs (and the attention blocks)
            kinds = ("RMSNorm", "MLP") + (("Attention",) if compiled == "compile-blocks" else ())
            compiled_modules = [m for m in model.modules() if type(m).__name__.endswith(kinds)]
        for m in compiled_modules:
            m.compile()
        wrapped = []
        if ckpt == "feed-forward":
            checkpoint_feed_forward(model)
            wrapped = [m for m in model.modules()
                       if type(m).__name__ in ("LlamaMLP", "PhiMLP") and "forward" in vars(m)]
        if ckpt != "full":
            model.gradient_checkpointing_disable()
        try:
            rec = measure(model, cfg, trial.BatchPlan(v["micro"], v["accum"]))
        except torch.OutOfMemoryError as e:
            rec = {"batch_size": v["micro"], "gradient_accumulation_steps": v["accum"],
                   "gradient_checkpointing": v["ckpt"], "error": "OutOfMemoryError: " + str(e).splitlines()[0][:160]}
            free_gpu()
        for m in wrapped:
            del m.forward
        for m in compiled_modules:
            m._compiled_call_impl = None  # back to eager for the next variant
        rec["variant"] = v["ckpt"]
        explored.append(rec)
        print(setup.key, "variant", json.dumps(rec), flush=True)
    model.gradient_checkpointing_disable()
    del model
    free_gpu()
    return result, explored


def loss_check(setup: Setup, args) -> tuple[bool, dict]:
    """Same adapter weights, same batch, dropout off, loss on every token: the losses must agree."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    build = RECIPES[setup.key][0]
    rows = synthetic_rows(LOSS_BATCH, setup.tokenizer, setup.seq, seed=7)
    steps, lr = args.loss_steps, args.loss_lr
    with tempfile.TemporaryDirectory() as work:
        # One batch of all 4 rows per epoch: every step sees the same batch, whatever the sampler's order.
        trainer, _ = build(setup.model_dir, setup.fresh_tokenizer(), rows, work, steps=steps, lr=lr,
                           batch=LOSS_BATCH, accumulation=1, smoke=args.smoke)
        model = trainer.model
        initial = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
        no_dropout(model)
        base_losses = record_losses(model)
        trainer.add_callback(trainer_callback(None))
        trainer.train()
    del trainer, model
    free_gpu()

    def project_losses(compile_setting: str) -> list[float]:
        config = _replace_train(setup.config, batch_size=LOSS_BATCH, gradient_accumulation_steps=1,
                                compile=compile_setting, **setup.spec.get("loss_check_train", {}))
        model = trial.build_model(setup.model_dir, config, setup.hparams)
        set_peft_model_state_dict(model, initial)
        no_dropout(model)
        losses = record_losses(model)
        with tempfile.TemporaryDirectory() as work:
            data = project_data(rows, setup.seq)  # every token a completion token: the recipes' loss
            trainer = trial.build_trainer(model, setup.fresh_tokenizer(), data, config, work, lr,
                                          trial.BatchPlan(LOSS_BATCH, 1), max_steps=steps)
            trainer.add_callback(trainer_callback(None))
            trainer.train()
        del model, trainer
        free_gpu()
        return losses

    def max_rel(losses: list[float]) -> float | None:
        rel = [abs(p - b) / b for p, b in zip(losses, base_losses, strict=False)]
        return round(max(rel), 5) if rel else None

    # The recipe against the project's trial run eagerly: the same kernels, so the same trajectory. The compiled
    # blocks (train.compile, on by default on a GPU) round differently, which Adam's first, sign-like steps at
    # this learning rate amplify; compile_check compares their gradients with the eager ones directly.
    eager = project_losses("none")
    drop = 1 - base_losses[-1] / base_losses[0]
    ok = (len(eager) == len(base_losses) == steps and max_rel(eager) <= args.loss_tolerance and drop >= 0.05)
    detail = {
        "steps": steps, "learning_rate": lr, "batch_size": LOSS_BATCH, "gradient_accumulation_steps": 1,
        "dropout": 0.0, "rows": "the same 4 rows at every step, loss on every token for both",
        "baseline_losses": [round(x, 4) for x in base_losses],
        "project_losses": [round(x, 4) for x in eager],
        "project": "the trial's path with train.compile none",
        "max_relative_difference": max_rel(eager),
        "tolerance": args.loss_tolerance,
        "baseline_loss_drop": round(drop, 4),
        "rule": "every step within tolerance, and the baseline's loss fell by >= 5% (so training is exercised); "
                "with compiled blocks, compile_check's gradients agree with the eager ones",
    }
    if GPU:
        compiled = project_losses("blocks")
        check = compile_check(setup)
        detail |= {"project_compiled_losses": [round(x, 4) for x in compiled],
                   "compiled_max_relative_difference": max_rel(compiled), "compile_check": check}
        ok = ok and check["ok"]
    print(setup.key, "loss check", json.dumps(detail), flush=True)
    return ok, detail


def compile_check(setup: Setup, loss_tolerance: float = 1e-3) -> dict:
    """The compiled blocks against the same model run eagerly, and both against an fp32 reference: one forward
    and backward of the same rows, same weights (lora_B random, so every LoRA weight gets a gradient), dropout
    off, the trial's checkpointing. Each trainable tensor's gradient is compared by cosine and by norm.

    In bf16 the two orders of rounding give gradients only ~0.98-0.99 alike for Llama, so the rule is that the
    compiled gradients are as close to the fp32 reference as the eager ones (within 0.005 in cosine), have
    the same norms (within 2%) and the same loss."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from qlora_ray.model import compile_blocks

    ids = torch.tensor(synthetic_rows(LOSS_BATCH, setup.tokenizer, setup.seq, seed=11), device="cuda")

    def build(dtype_name: str | None, state: dict | None):
        config = _replace_train(setup.config, compile="none")
        if dtype_name:
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, compute_dtype=dtype_name))
        model = trial.build_model(setup.model_dir, config, setup.hparams)
        no_dropout(model)
        if state is None:
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.requires_grad and "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=gen) * 1e-2)
        else:
            set_peft_model_state_dict(model, state)
        if config.train.gradient_checkpointing == "full":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return model, trial.compute_dtype(config.model)

    def backward(model, dtype) -> tuple[float, dict]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss), {n: p.grad.detach().float().flatten().clone() for n, p in model.named_parameters()
                             if p.requires_grad and p.grad is not None}

    model, dtype = build(None, None)
    eager_loss, eager = backward(model, dtype)
    compiled_parts = compile_blocks(model)
    compiled_loss, compiled = backward(model, dtype)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    model.gradient_checkpointing_disable()
    del model
    free_gpu()
    model, ref_dtype = build("float32", state)
    ref_loss, ref = backward(model, ref_dtype)
    model.gradient_checkpointing_disable()
    del model
    free_gpu()

    def cosines(a: dict, b: dict) -> dict:
        return {n: float(torch.nn.functional.cosine_similarity(a[n], b[n], dim=0)) for n in a if n in b}

    def low(c: dict) -> tuple[float, str]:
        worst = min(c, key=c.get)
        return round(c[worst], 6), worst

    def mean(c: dict) -> float:
        return round(sum(c.values()) / len(c), 6)

    vs_eager, eager_ref, compiled_ref = cosines(eager, compiled), cosines(eager, ref), cosines(compiled, ref)
    norm_ratio = [float(compiled[n].norm() / eager[n].norm()) for n in eager if n in compiled and eager[n].norm() > 0]
    worst_norm = max(norm_ratio, key=lambda r: abs(r - 1))
    rel_loss = abs(compiled_loss - eager_loss) / eager_loss
    out = {"compiled_modules": compiled_parts, "eager_loss": round(eager_loss, 5),
           "compiled_loss": round(compiled_loss, 5), "fp32_reference_loss": round(ref_loss, 5),
           "loss_relative_difference": round(rel_loss, 6),
           "gradients_compared": len(vs_eager), "gradients_missing": len(eager) - len(vs_eager),
           "compiled_vs_eager_cosine": {"min": low(vs_eager), "mean": mean(vs_eager)},
           "eager_vs_fp32_cosine": {"min": low(eager_ref), "mean": mean(eager_ref)},
           "compiled_vs_fp32_cosine": {"min": low(compiled_ref), "mean": mean(compiled_ref)},
           "worst_norm_ratio_compiled_to_eager": round(worst_norm, 5),
           "rule": f"loss within {loss_tolerance:g} relative; every gradient's norm within 2% of eager; the "
                   "compiled gradients' min and mean cosine to fp32 no more than 0.005 below eager's"}
    out["ok"] = bool(rel_loss <= loss_tolerance and abs(worst_norm - 1) <= 0.02 and not out["gradients_missing"]
                     and low(compiled_ref)[0] >= low(eager_ref)[0] - 0.005
                     and mean(compiled_ref) >= mean(eager_ref) - 0.005)
    return out


# ----------------------------------------------------------------------------- main


def parse_variants(text: str | None) -> dict[str, list[dict]]:
    """"llama2_7b:none:4:2,phi2:full+compile:16:1" -> {model: [{"ckpt", "micro", "accum"}]} (+compile:
    torch.compile each decoder layer)."""
    out: dict[str, list[dict]] = {}
    for item in filter(None, (text or "").split(",")):
        key, ckpt, micro, accum = item.split(":")
        out.setdefault(key, []).append({"ckpt": ckpt, "micro": int(micro), "accum": int(accum)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--models", default="phi2,llama2_7b")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--loss-steps", type=int, default=12)
    ap.add_argument("--loss-lr", type=float, default=1e-3, help="high enough that one batch is visibly learned")
    ap.add_argument("--loss-tolerance", type=float, default=0.02, help="max relative difference per step")
    ap.add_argument("--variants", help="extra project settings to time, MODEL:CKPT:MICRO:ACCUM,... (exploration)")
    ap.add_argument("--skip", default="", help="parts to skip: baseline, project, loss (comma-separated)")
    ap.add_argument("--memory-limit-gb", type=float, help="plan the project's trial for this GPU size "
                    "(default: the goal's, 16 GB for phi2 and 24 GB for llama2_7b)")
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU (a check of the code, no numbers)")
    ap.add_argument("--standin", action="store_true", help="a missing preset replaced by the recipe's settings "
                    "(exploration before the preset exists; marked in the output)")
    ap.add_argument("--compute-dtype", choices=["bfloat16", "float16", "float32"],
                    help="override the presets' (with --smoke: bfloat16 exercises the GPU's autocast path)")
    ap.add_argument("--name", default="causal_throughput", help="output file name (without .json)")
    args = ap.parse_args()
    if args.smoke:
        args.warmup, args.steps, args.loss_steps = 1, 2, 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    skip = set(filter(None, args.skip.split(",")))
    variants = parse_variants(args.variants)
    with tempfile.TemporaryDirectory() as scratch:
        args.work = scratch
        result: dict = json.loads(path.read_text()) if path.is_file() else {}
        result |= {
            "device": torch.cuda.get_device_name(0) if GPU else "cpu (smoke)",
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "shapes": {"tokens_per_row": SEQ if not args.smoke else 64, "padding": "none (full-length rows)"},
            "versions": _versions(),
            "timing": f"median of {args.steps} optimizer steps after {args.warmup} warm-up steps; samples = rows",
        }
        for key in filter(None, args.models.split(",")):
            t0 = time.perf_counter()
            setup = Setup(key, args)
            entry: dict = dict(result.get(key, {}))
            entry |= {"model": f"{setup.config.model.name} architecture, random weights (--random-init)",
                      "preset": setup.spec["preset"] + (" (missing: the recipe's settings stood in)" if setup.standin
                                                        else ""),
                      "hparams": setup.hparams, "goal": setup.spec["goal"],
                      "project_differs": setup.spec["project_differs"],
                      "build_s": setup.build_s}
            if "baseline" not in skip:
                entry["baseline"] = run_baseline(setup, args)
            if "project" not in skip:
                entry["project"], explored = run_project(setup, args, variants.get(key, []))
                if explored:
                    entry["project_variants"] = explored
            if "loss" not in skip:
                entry["loss_check"], entry["loss_check_detail"] = loss_check(setup, args)
            if "baseline" in entry and "project" in entry:
                b, p = entry["baseline"], entry["project"]
                entry["speedup"] = round(p["samples_per_s"] / b["samples_per_s"], 3)
                goal = setup.spec["goal"]
                entry["goal_met"] = bool(entry["speedup"] >= goal["min_speedup"] and p.get("peak_gb") is not None
                                         and p["peak_gb"] <= goal["max_peak_gb"] and entry.get("loss_check"))
            entry["wall_s"] = round(time.perf_counter() - t0, 1)
            result[key] = entry
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(summary_line(key, entry), flush=True)
    print(f"-> {path}")


def summary_line(key: str, entry: dict) -> str:
    b, p = entry.get("baseline", {}), entry.get("project", {})
    return (f"{key}: baseline {b.get('samples_per_s')} samples/s at {b.get('peak_gb')} GB; project "
            f"{p.get('samples_per_s')} samples/s at {p.get('peak_gb')} GB (micro-batch {p.get('batch_size')} x "
            f"{p.get('gradient_accumulation_steps')}, {p.get('gradient_checkpointing')} checkpointing); speedup "
            f"{entry.get('speedup')}x; loss check {entry.get('loss_check')}; goal met {entry.get('goal_met')}")


def _versions() -> dict:
    import bitsandbytes
    import peft
    import transformers
    import trl

    smi = ""
    if GPU:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__, "driver": smi}


if __name__ == "__main__":
    main()
