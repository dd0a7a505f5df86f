"""Calibrate qlora_ray.memory: predicted vs measured peak GPU memory of real QLoRA training steps.

Run on a GPU (through the device tool), from the repository root:

    python3 bench/memory_calibrate.py --out bench/results/memory_estimate.json [--only t5] [--max-minutes 9]

Each configuration (ROWS below: T5-3b, a T5-base-sized T5, Phi-2 and Llama-2-7B architectures,
random weights, 4-bit NF4 + double quant, varying micro-batch, lengths, LoRA r/targets, optimizer,
checkpointing) runs in its own subprocess, so every row starts from an empty GPU:

- T5 rows take the project's own trial path: `random_init` builds the architecture's checkpoint
  once (cached in $QLORA_RAY_CACHE), then `trial.build_model` + `trial.build_trainer` (the sweep's
  Seq2SeqTrainer, optimizer, autocast and checkpointing), on full-length synthetic rows.
- Causal rows build the model from its config directly on
  the GPU in bf16, swap every nn.Linear but lm_head for a bitsandbytes Linear4bit quantized in
  memory (what `from_pretrained(quantization_config=...)` produces, without writing a 14 GB
  checkpoint), prepare it as `trial.build_model` does (fused tanh GELU, bf16 LayerNorm outputs under
  autocast, fp32 trainables) and train with transformers' Trainer (bf16 autocast, the named
  optimizer, non-reentrant checkpointing, the model's own loss over full logits). "feed-forward"
  checkpointing wraps each MLP block the way `model.checkpoint_feed_forward` does.

Each row runs `--steps` optimizer steps (default 3; the peak comes once optimizer states exist)
and records `torch.cuda.max_memory_allocated()` (measured_gb, compared with the estimate's
`allocated_gb`: predicted_gb), the reserved peak, the paged optimizer's managed memory and the
device-level use (`cudaMemGetInfo`, compared with the estimate's `total_gb`). Out of memory is
recorded per row. Results are merged by row name into --out after every row, so a killed run
keeps what it measured. Without a GPU, `--smoke` runs tiny configurations end to end (measured_gb
null): the test suite runs it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qlora_ray import memory  # noqa: E402  (pure: no torch)

ARCH_DIR = ROOT / "src" / "qlora_ray" / "architectures"

# A T5-base-sized T5 (google-t5/t5-base's dims), shipped nowhere: written to a temporary config.json.
T5_BASE = {
    "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 768, "d_ff": 3072, "d_kv": 64,
    "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12, "feed_forward_proj": "relu",
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-06, "initializer_factor": 1.0, "is_encoder_decoder": True,
    "tie_word_embeddings": True, "vocab_size": 32128, "pad_token_id": 0, "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}
TINY_PHI = {"model_type": "phi", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 512, "max_position_embeddings": 256, "resid_pdrop": 0.1,
            "partial_rotary_factor": 0.5}

# arch: "t5-3b", "t5-base", "phi-2", "llama-2-7b" (GPU) or "tiny-t5" (the embedded model), "tiny-llama", "tiny-phi".
# len: (source, target) for T5, seq for causal models. Defaults: bf16, LoRA dropout 0.05, full-length rows.
ROWS = [
    # T5-3b: the sweep's preset (full checkpointing, batch 32) and the recipe's neighbours.
    {"name": "t5-3b-full-b32-vo", "arch": "t5-3b", "b": 32, "len": (1024, 128), "r": 32, "targets": "v+o",
     "save": ["lm_head"], "optim": "paged_adamw_8bit", "ckpt": "full"},
    {"name": "t5-3b-ff-b8-vo", "arch": "t5-3b", "b": 8, "len": (1024, 128), "r": 32, "targets": "v+o",
     "save": ["lm_head"], "optim": "paged_adamw_8bit", "ckpt": "feed-forward"},
    {"name": "t5-3b-none-b4-all", "arch": "t5-3b", "b": 4, "len": (1024, 128), "r": 16, "targets": "all-linear",
     "save": ["lm_head"], "optim": "adamw_torch", "ckpt": "none"},
    {"name": "t5-3b-none-b8-qv-padded", "arch": "t5-3b", "b": 8, "len": (512, 64), "r": 64, "targets": "qv",
     "save": [], "optim": "paged_adamw_32bit", "ckpt": "none", "padded": True},
    # T5-base-sized.
    {"name": "t5-base-none-b32-attn", "arch": "t5-base", "b": 32, "len": (512, 128), "r": 8, "targets": "attention",
     "save": ["lm_head"], "optim": "adamw_torch", "ckpt": "none"},
    {"name": "t5-base-full-b128-all", "arch": "t5-base", "b": 128, "len": (512, 128), "r": 16,
     "targets": "all-linear", "save": ["lm_head"], "optim": "paged_adamw_8bit", "ckpt": "full"},
    {"name": "t5-base-ff-b32-qv-fp16", "arch": "t5-base", "b": 32, "len": (512, 128), "r": 16, "targets": "qv",
     "save": ["lm_head"], "optim": "paged_adamw_8bit", "ckpt": "feed-forward", "dtype": "float16"},
    # Phi-2.
    {"name": "phi-2-none-b4-attn", "arch": "phi-2", "b": 4, "len": 1024, "r": 16, "targets": "attention",
     "save": [], "optim": "paged_adamw_8bit", "ckpt": "none"},
    {"name": "phi-2-full-b8-all", "arch": "phi-2", "b": 8, "len": 2048, "r": 64, "targets": "all-linear",
     "save": [], "optim": "paged_adamw_32bit", "ckpt": "full"},
    {"name": "phi-2-ff-b4-all", "arch": "phi-2", "b": 4, "len": 1024, "r": 16, "targets": "all-linear",
     "save": [], "optim": "adamw_torch", "ckpt": "feed-forward"},
    # Llama-2-7B.
    {"name": "llama-2-7b-none-b2-qv", "arch": "llama-2-7b", "b": 2, "len": 1024, "r": 16, "targets": "qv",
     "save": [], "optim": "paged_adamw_8bit", "ckpt": "none"},
    {"name": "llama-2-7b-full-b8-all", "arch": "llama-2-7b", "b": 8, "len": 2048, "r": 64, "targets": "all-linear",
     "save": [], "optim": "adamw_torch", "ckpt": "full"},
    {"name": "llama-2-7b-ff-b2-all-lmhead", "arch": "llama-2-7b", "b": 2, "len": 2048, "r": 8,
     "targets": "all-linear", "save": ["lm_head"], "optim": "paged_adamw_8bit", "ckpt": "feed-forward"},
    {"name": "llama-2-7b-none-b4-qv-padded", "arch": "llama-2-7b", "b": 4, "len": 1024, "r": 16, "targets": "qv",
     "save": [], "optim": "paged_adamw_8bit", "ckpt": "none", "padded": True},
]
SMOKE_ROWS = [
    {"name": "smoke-tiny-t5", "arch": "tiny-t5", "b": 4, "len": (64, 16), "r": 4, "targets": "qv",
     "save": ["lm_head"], "optim": "adamw_torch", "ckpt": "feed-forward", "dtype": "float32"},
    {"name": "smoke-tiny-llama", "arch": "tiny-llama", "b": 2, "len": 64, "r": 4, "targets": "all-linear",
     "save": ["lm_head"], "optim": "adamw_torch", "ckpt": "full", "dtype": "float32", "padded": True},
    {"name": "smoke-tiny-phi", "arch": "tiny-phi", "b": 2, "len": 64, "r": 4, "targets": "attention",
     "save": [], "optim": "adamw_torch", "ckpt": "feed-forward", "dtype": "float32"},
]
ALL_ROWS = {row["name"]: row for row in ROWS + SMOKE_ROWS}
SEQ2SEQ_ARCHS = ("t5-3b", "t5-base", "tiny-t5")


# ----------------------------------------------------------------------------- configs and predictions


def arch_config(arch: str) -> dict:
    """The architecture's transformers config as a dict (what the estimator reads)."""
    if arch == "t5-3b":
        return json.loads((ARCH_DIR / "t5-3b.json").read_text())
    if arch in ("phi-2", "llama-2-7b"):
        return json.loads((ARCH_DIR / f"{arch}.json").read_text())
    if arch == "t5-base":
        return dict(T5_BASE)
    if arch == "tiny-llama":
        return dict(TINY_LLAMA)
    if arch == "tiny-phi":
        return dict(TINY_PHI)
    if arch == "tiny-t5":
        from qlora_ray import embedded

        model_dir = Path(embedded.default_cache_dir())
        found = sorted(model_dir.glob("tiny-t5*/config.json"))
        if not found:
            raise FileNotFoundError(f"the embedded tiny T5 is not built in {model_dir} (run the test suite or a sweep)")
        return json.loads(found[-1].read_text())
    raise ValueError(f"unknown arch {arch!r}")


def predict(row: dict, config: dict | None = None) -> memory.Estimate:
    config = config or arch_config(row["arch"])
    lengths = ({"source_len": row["len"][0], "target_len": row["len"][1]} if row["arch"] in SEQ2SEQ_ARCHS
               else {"seq_len": row["len"]})
    return memory.estimate(config, micro_batch_size=row["b"], r=row["r"], target_modules=row["targets"],
                           modules_to_save=row["save"], lora_dropout=row.get("lora_dropout", 0.05),
                           compute_dtype=row.get("dtype", "bfloat16"), optimizer=row["optim"],
                           gradient_checkpointing=row["ckpt"], padded=row.get("padded", False), **lengths)


# ----------------------------------------------------------------------------- one row (the subprocess)


def synthetic_rows(n: int, lengths: list[int], vocab: int, seed: int, padded: bool) -> list[list[int]]:
    """Random token ids, eos-terminated; with `padded` every other row is 10% shorter (so the batch
    needs a padding mask) while the longest stays full length."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, length in enumerate(lengths * n):
        if padded and i % 2:
            length = max(2, length - max(1, length // 10))
        out.append(torch.randint(3, vocab, (length,), generator=g).tolist()[:-1] + [1])
    return out


class _Meter:
    """Peak memory per optimizer step (a TrainerCallback's on_step_end, before any checkpoint save)."""

    def __init__(self):
        self.steps: list[dict] = []

    def callback(self):
        import torch
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                step = {"step": state.global_step}
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    free, total = torch.cuda.mem_get_info()
                    step |= {"max_allocated": torch.cuda.max_memory_allocated(),
                             "max_reserved": torch.cuda.max_memory_reserved(),
                             "reserved": torch.cuda.memory_reserved(), "device_used": total - free}
                    torch.cuda.reset_peak_memory_stats()
                meter.steps.append(step)

        return _Callback()


def _managed_bytes(optimizer) -> int:
    """Bytes of the optimizer's paged (CUDA managed) state tensors."""
    inner = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if getattr(value, "is_paged", False):
                total += value.numel() * value.element_size()
    return total


def _checkpointing_args(full: bool) -> dict:
    from dataclasses import fields

    from transformers import TrainingArguments

    known = {f.name for f in fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    return {name: full, f"{name}_kwargs": {"use_reentrant": False}}


def run_t5(row: dict, steps: int, meter: _Meter, work: str) -> tuple:
    """The sweep trial's own model and Trainer (trial.build_model + trial.build_trainer)."""
    from qlora_ray import trial
    from qlora_ray.config import load_config
    from qlora_ray.data import TokenizedData
    from qlora_ray.model import load_tokenizer, resolve_model_path

    if row["arch"] == "tiny-t5":
        name, random_init = "embedded:tiny-t5", False
    elif row["arch"] == "t5-3b":
        name, random_init = "google-t5/t5-3b", True
    else:
        path = Path(tempfile.gettempdir()) / "qlora-ray-memory" / row["arch"] / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(arch_config(row["arch"]), indent=2))
        name, random_init = str(path.parent), True
    src, tgt = row["len"]
    config = load_config("tiny-t5-stdlib", overrides={
        "model": {"name": name, "random_init": random_init, "compute_dtype": row.get("dtype", "auto")},
        "data": {"max_source_length": src, "max_target_length": tgt},
        "lora": {"dropout": row.get("lora_dropout", 0.05), "modules_to_save": row["save"]},
        "train": {"batch_size": row["b"], "gradient_checkpointing": row["ckpt"], "optim": row["optim"],
                  "max_steps": 1000, "eval_every": 1000},  # no evaluation or save inside the measured steps
    })
    model_dir = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_dir, config.model)
    hparams = {"r": row["r"], "lora_alpha": 2 * row["r"], "target_modules": row["targets"], "learning_rate": 1e-4}
    model = trial.build_model(model_dir, config, hparams)
    vocab = len(tokenizer)
    n = row["b"] * steps
    padded = row.get("padded", False)
    sources = synthetic_rows(n, [src], vocab, 1, padded)
    targets = synthetic_rows(n, [tgt], vocab, 2, False)
    columns = {"input_ids": sources, "attention_mask": [[1] * len(s) for s in sources], "labels": targets}
    data = TokenizedData(train=columns, eval={k: v[:1] for k, v in columns.items()})
    trainer = trial.build_trainer(model, tokenizer, data, config, work, hparams["learning_rate"], max_steps=steps)
    trainer.add_callback(meter.callback())
    return model, trainer


def quantize_linears(model, compute_dtype, double_quant: bool = True, quant_type: str = "nf4") -> int:
    """Replace every nn.Linear except the output head (and _keep_in_fp32_modules) with a bitsandbytes
    Linear4bit holding the same weights quantized on their device: the layout transformers'
    bitsandbytes loader produces. Returns how many layers were quantized."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    skip = {"lm_head", *(getattr(model, "_keep_in_fp32_modules", None) or [])}
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            device = child.weight.device
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=double_quant,
                                      quant_type=quant_type, device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=double_quant,
                                             quant_type=quant_type, module=layer).to(device)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
            count += 1
    model.is_loaded_in_4bit = True  # peft picks its bitsandbytes LoRA layer on this flag
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def checkpoint_mlps(model) -> int:
    """Recompute each MLP block in backward: causal models' counterpart of model.checkpoint_feed_forward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    wrapped = 0
    for module in model.modules():
        if not type(module).__name__.endswith("MLP"):
            continue
        forward = module.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        module.forward = checkpointed
        wrapped += 1
    return wrapped


def run_causal(row: dict, steps: int, meter: _Meter, work: str) -> tuple:
    """A causal LM built from its config, quantized in memory, LoRA as the trials add it, Trainer."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from qlora_ray.model import fuse_tanh_gelu, layer_norms_return_compute_dtype, trainable_to_fp32

    cfg_dict = arch_config(row["arch"])
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    dtype = getattr(torch, row.get("dtype", "bfloat16"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantize_linears(model, dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    fuse_tanh_gelu(model)  # as model.prepare_for_training does for the trials
    if dtype == torch.bfloat16:
        layer_norms_return_compute_dtype(model)
    if row["ckpt"] == "feed-forward":
        checkpoint_mlps(model)
    targets = memory.resolve_targets(cfg_dict | {"model_type": model_type}, row["targets"])
    lora = LoraConfig(r=row["r"], lora_alpha=2 * row["r"], lora_dropout=row.get("lora_dropout", 0.05), bias="none",
                      task_type="CAUSAL_LM", target_modules=targets, modules_to_save=row["save"] or None)
    model = get_peft_model(model, lora)
    trainable_to_fp32(model)
    seq, n = row["len"], row["b"] * steps
    ids = synthetic_rows(n, [seq], config.vocab_size, 3, row.get("padded", False))
    columns = {"input_ids": [], "attention_mask": [], "labels": []}
    for row_ids in ids:  # pre-padded to full length (right padding, labels -100 there)
        pad = seq - len(row_ids)
        columns["input_ids"].append(row_ids + [0] * pad)
        columns["attention_mask"].append([1] * len(row_ids) + [0] * pad)
        columns["labels"].append(row_ids + [-100] * pad)
    args = TrainingArguments(
        output_dir=work, max_steps=steps, per_device_train_batch_size=row["b"], learning_rate=1e-4,
        weight_decay=0.01, optim=row["optim"], bf16=dtype == torch.bfloat16, use_cpu=device == "cpu",
        save_strategy="no", eval_strategy="no", logging_steps=1000, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, **_checkpointing_args(row["ckpt"] == "full"))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(columns),
                      data_collator=default_data_collator)
    trainer.add_callback(meter.callback())
    return model, trainer


def run_row(row: dict, steps: int) -> dict:
    """Build and train one configuration in this process; the measurements as a dict."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    meter = _Meter()
    t0 = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    with tempfile.TemporaryDirectory() as work:
        try:
            build = run_t5 if row["arch"] in SEQ2SEQ_ARCHS else run_causal
            model, trainer = build(row, steps, meter, work)
            gc.collect()  # the build's temporaries (bf16 weights before quantization) leave the reserved pool
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            result["build_s"] = round(time.perf_counter() - t0, 1)
            trainable, _ = model.get_nb_trainable_parameters()
            result["trainable_params"] = trainable
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                result["static_gb"] = round(torch.cuda.memory_allocated() / memory.GB, 3)
                result["load_peak_gb"] = round(torch.cuda.max_memory_allocated() / memory.GB, 3)
                torch.cuda.reset_peak_memory_stats()
            t1 = time.perf_counter()
            trainer.train()
            result["train_s"] = round(time.perf_counter() - t1, 1)
            result["steps"] = meter.steps
            if torch.cuda.is_available() and meter.steps:
                managed = _managed_bytes(trainer.optimizer)
                last = meter.steps[-1]
                result |= {
                    "measured_gb": round(max(s["max_allocated"] for s in meter.steps) / memory.GB, 3),
                    "measured_reserved_gb": round(max(s["max_reserved"] for s in meter.steps) / memory.GB, 3),
                    "measured_managed_gb": round(managed / memory.GB, 3),
                    "measured_device_gb": round(max(s["device_used"] for s in meter.steps) / memory.GB, 3),
                    # what the device uses beyond torch's reserved pool and the managed states: the context
                    "cuda_context_gb": round((last["device_used"] - last["reserved"] - managed) / memory.GB, 3),
                }
        except torch.OutOfMemoryError as e:
            result |= {"oom": True, "error": str(e).splitlines()[0][:300]}
            if torch.cuda.is_available():
                result["measured_gb_at_oom"] = round(torch.cuda.max_memory_allocated() / memory.GB, 3)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


# ----------------------------------------------------------------------------- the driver


def _pct(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return round(100 * (predicted - measured) / measured, 1)


def _row_record(row: dict, child: dict | None, error: str | None, seconds: float) -> dict:
    config = {k: v for k, v in row.items() if k != "name"}
    record: dict = {"name": row["name"], "config": config}
    try:
        est = predict(row)
    except Exception as e:  # a row the estimator cannot take is still measured
        est, record["prediction_error"] = None, f"{type(e).__name__}: {e}"
    child = child or {}
    measured = child.get("measured_gb")
    record |= {
        "predicted_gb": round(est.allocated_gb, 3) if est else None,
        "measured_gb": measured,
        "error_pct": _pct(est.allocated_gb if est else None, measured),
        "predicted_total_gb": round(est.total_gb, 3) if est else None,
        "measured_device_gb": child.get("measured_device_gb"),
        "device_error_pct": _pct(est.total_gb if est else None, child.get("measured_device_gb")),
        "predicted_breakdown_gb": {k: round(v / memory.GB, 3) for k, v in est.breakdown.items()} if est else None,
        "predicted_static_gb": round(sum(est.breakdown[k] for k in ("base_4bit", "quant_constants",
                                                                     "base_unquantized", "adapter"))
                                     / memory.GB, 3) if est else None,
        "predicted_trainable_params": est.trainable_params if est else None,
    }
    record |= {k: v for k, v in child.items() if k not in record}
    if error:
        record["error"] = error
    record["wall_s"] = round(seconds, 1)
    return record


def _summary(rows: list[dict]) -> dict:
    errors = [abs(r["error_pct"]) for r in rows if r.get("error_pct") is not None]
    device_errors = [abs(r["device_error_pct"]) for r in rows if r.get("device_error_pct") is not None]
    out = {"rows": len(rows), "measured": len(errors),
           "oom": [r["name"] for r in rows if r.get("oom")],
           "failed": [r["name"] for r in rows if r.get("error") and not r.get("oom")]}
    if errors:
        out |= {"mean_abs_error_pct": round(sum(errors) / len(errors), 1), "max_abs_error_pct": max(errors),
                "within_15pct": sum(e <= 15 for e in errors)}
    if device_errors:
        out["mean_abs_device_error_pct"] = round(sum(device_errors) / len(device_errors), 1)
    return out


def _versions() -> dict:
    # From package metadata: importing bitsandbytes here could open a CUDA context in this process,
    # which the rows' device-level measurements would then include.
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _document(rows: list[dict], device: str | None, date: str, versions: dict) -> dict:
    return {"device": device, "date": date, "versions": versions,
            "what": "predicted_gb: qlora_ray.memory.estimate(...).allocated_gb; measured_gb: "
                    "torch.cuda.max_memory_allocated() over the steps (GB = 1e9 bytes); predicted_total_gb vs "
                    "measured_device_gb: the whole device (context, managed memory, allocator slack)",
            "summary": _summary(rows), "rows": rows}


def merge(paths: list[str], out: Path) -> None:
    """Rows of several runs (e.g. one device command per model family) in one file, in ROWS order."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    rows = {r["name"]: r for doc in docs for r in doc.get("rows", [])}
    ordered = [rows[n] for n in ALL_ROWS if n in rows] + [r for n, r in rows.items() if n not in ALL_ROWS]
    first = next((d for d in docs if d.get("device")), docs[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_document(ordered, first.get("device"), max(d.get("date") or "" for d in docs),
                                        first.get("versions", {})), indent=2) + "\n")
    print(json.dumps(_summary(ordered)))
    print(f"-> {out}")


def repredict(out: Path) -> None:
    """After an estimator change: the committed measurements against its new predictions (the rows
    themselves are measured by this script's own model code, which the estimator does not change)."""
    doc = json.loads(out.read_text())
    rows = [_row_record(ALL_ROWS[r["name"]], r, r.get("error"), r.get("wall_s") or 0.0) for r in doc["rows"]]
    doc |= {"summary": _summary(rows), "rows": rows, "predicted_on": time.strftime("%Y-%m-%d")}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["summary"]))
    print(f"-> {out}")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()  # no CUDA context is created here: the rows' measurements stay clean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_estimate.json"))
    ap.add_argument("--only", help="comma-separated substrings of row names (e.g. t5-3b,llama)")
    ap.add_argument("--max-minutes", type=float, default=9.0, help="wall-time budget for all rows")
    ap.add_argument("--row-timeout", type=float, default=300.0, help="seconds one row may take")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per row")
    ap.add_argument("--smoke", action="store_true", help="tiny configurations only (runs on a CPU)")
    ap.add_argument("--fresh", action="store_true", help="replace --out instead of merging rows by name")
    ap.add_argument("--list", action="store_true", help="print the rows and their predictions, run nothing")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="combine the rows of earlier runs' files (later files win) into --out; runs nothing")
    ap.add_argument("--repredict", action="store_true",
                    help="recompute --out's predictions with the current estimator, keeping its measurements")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row here, print its result
    args = ap.parse_args()

    if args.row:
        result = run_row(ALL_ROWS[args.row], args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return

    if args.merge:
        merge(args.merge, Path(args.out))
        return
    if args.repredict:
        repredict(Path(args.out))
        return
    rows = SMOKE_ROWS if args.smoke else ROWS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        rows = [r for r in rows if any(w in r["name"] for w in wanted)]
    if args.list:
        for row in rows:
            est = predict(row)
            print(f"{row['name']:32} predicted {est.allocated_gb:7.2f} GB allocated, {est.total_gb:7.2f} GB total")
        return
    if not args.smoke and not _has_gpu():
        sys.exit("no GPU: run with --smoke for the CPU smoke test")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = {}
    if out.is_file() and not args.fresh:
        previous = {r["name"]: r for r in json.loads(out.read_text()).get("rows", [])}
    start = time.perf_counter()
    budget = args.max_minutes * 60
    results: dict[str, dict] = dict(previous)
    device = None
    for i, row in enumerate(rows, 1):
        left = budget - (time.perf_counter() - start)
        if left < 30:
            print(f"[{i}/{len(rows)}] {row['name']}: skipped (time budget of {args.max_minutes} min spent)", flush=True)
            continue
        timeout = min(args.row_timeout, left - 5)
        print(f"[{i}/{len(rows)}] {row['name']} (timeout {timeout:.0f} s) ...", flush=True)
        t0 = time.perf_counter()
        child, error = None, None
        cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row["name"], "--steps", str(args.steps)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                child = json.loads(lines[-1][len("RESULT "):])
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
                error = f"exit {proc.returncode}: " + " | ".join(tail)[-800:]
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
        record = _row_record(row, child, error, time.perf_counter() - t0)
        device = device or record.get("device")
        results[row["name"]] = record
        status = ("OOM" if record.get("oom") else f"error: {error[:200]}" if error else
                  f"measured {record['measured_gb']} GB" if record.get("measured_gb") is not None else "ran (no GPU)")
        print(f"    predicted {record['predicted_gb']} GB, {status}, error {record['error_pct']}% "
              f"(device: predicted {record['predicted_total_gb']}, measured {record.get('measured_device_gb')}) "
              f"in {record['wall_s']} s", flush=True)
        ordered = [results[n] for n in ALL_ROWS if n in results]
        doc = _document(ordered, device or (json.loads(out.read_text()).get("device") if previous else None),
                        time.strftime("%Y-%m-%d", time.gmtime()), _versions())
        out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(_summary([results[n] for n in ALL_ROWS if n in results])), flush=True)
    print(f"-> {out}", flush=True)


if __name__ == "__main__":
    main()
