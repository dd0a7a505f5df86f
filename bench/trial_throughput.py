"""T5-3b QLoRA training throughput: the seed recipe against the product's trial path.

Run on a GPU (through the device tool, see bench/README.md):

    python3 bench/trial_throughput.py --out bench/results

Both paths train T5-3b's architecture (random weights from its config, built by
`qlora_ray.random_init`: speed and memory do not depend on weight values) on the recipe's
shapes, 1024 source / 128 target tokens per sample, full length.

- baseline: the seed recipe, written out plainly: fp32 checkpoint loaded 4-bit NF4 with
  double quant and fp16 compute, peft's prepare_model_for_kbit_training, LoRA r=32/alpha=16
  on v,o with lm_head saved, PagedAdamW8bit, batch 4, no gradient checkpointing, gradient
  clipping at 1.0 (the Trainer's default).
- project: what a sweep trial runs: `trial.build_model` + `trial.build_trainer` with the
  t5-3b-billsum preset's settings (batch size, checkpointing, optimizer), timed from one
  optimizer step to the next inside `Trainer.train()`.

The loss check trains both from the same weights (the baseline's fresh adapter copied into
the project's) on the same batch, dropout off, batch 4 for both, and compares the losses
step by step. Writes trial_throughput.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qlora_ray import trial  # noqa: E402
from qlora_ray.config import ModelSettings, load_config  # noqa: E402
from qlora_ray.data import TokenizedData  # noqa: E402
from qlora_ray.model import load_tokenizer, resolve_model_path  # noqa: E402

SRC_LEN, TGT_LEN = 1024, 128
SEED_BATCH = 4
HPARAMS = {"r": 32, "lora_alpha": 16, "target_modules": "v+o", "learning_rate": 2e-5}


def synthetic_examples(n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        src = torch.randint(3, vocab, (SRC_LEN,), generator=g).tolist()
        tgt = torch.randint(3, vocab, (TGT_LEN,), generator=g).tolist()
        out.append((src[:-1] + [1], tgt[:-1] + [1]))  # eos-terminated, like tokenizer output
    return out


def as_batch(examples) -> dict[str, torch.Tensor]:
    ids = torch.tensor([s for s, _ in examples], device="cuda")
    labels = torch.tensor([t for _, t in examples], device="cuda")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def as_data(examples) -> TokenizedData:
    columns = {"input_ids": [s for s, _ in examples], "attention_mask": [[1] * len(s) for s, _ in examples],
               "labels": [t for _, t in examples]}
    return TokenizedData(train=columns, eval={k: v[:1] for k, v in columns.items()})


def no_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):  # T5Attention keeps its rate as a float
            module.dropout = 0.0


def record_losses(model) -> list[float]:
    """Training-mode losses of every forward, read from the model's output."""
    losses: list[float] = []

    def hook(module, args, output):
        if module.training and getattr(output, "loss", None) is not None:
            losses.append(float(output.loss.detach()))

    model.get_base_model().register_forward_hook(hook)
    return losses


# ----------------------------------------------------------------------------- the seed recipe


def seed_model(model_dir: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSeq2SeqLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float16)
    # dtype fp32: the hub's t5-3b checkpoint is fp32, and from_pretrained keeps it.
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, quantization_config=bnb, device_map={"": 0},
                                                  dtype=torch.float32)
    footprint = model.get_memory_footprint()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=32, lora_alpha=16, target_modules=["v", "o"], lora_dropout=0.05, bias="none",
                      task_type="SEQ_2_SEQ_LM", modules_to_save=["lm_head"])
    return get_peft_model(model, lora), footprint


def seed_train(model, batches: list[dict], lr: float, on_step=None) -> None:
    import bitsandbytes as bnb
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, 0, len(batches))  # the Trainer's default schedule
    model.train()
    for i, batch in enumerate(batches):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(i)


# ----------------------------------------------------------------------------- measurement


class StepClock:
    """Wall time between consecutive optimizer steps (GPU synchronized); peak memory after warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.last = warmup, [], None

    def __call__(self, step: int) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        if step + 1 == self.warmup:
            torch.cuda.reset_peak_memory_stats()
        if step + 1 > self.warmup and self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def trainer_callback(clock: StepClock, last: int):
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step <= last:  # (profiled steps after these are not timed)
                clock(state.global_step - 1)

    return _Clock()


def profiler_callback(after: int, steps: int, table: Path):
    """torch.profiler over steps after+1 .. after+steps: the ops by GPU time, and how much of the window the
    GPU was running kernels at all (the union of kernel intervals over the wall time; the rest it waited
    on the host)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class _Profile(TrainerCallback):
        prof = None
        started = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == after:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.started = time.perf_counter()
            elif state.global_step == after + steps and self.prof is not None:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.started
                self.prof.__exit__(None, None, None)
                trace = table.with_suffix(".trace.json")
                self.prof.export_chrome_trace(str(trace))
                kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in json.loads(trace.read_text())["traceEvents"]
                                 if e.get("cat") == "kernel" and "dur" in e)
                busy, end = 0.0, -1.0
                for a, b in kernels:  # the union of the kernels' intervals (µs)
                    if b > end:
                        busy += b - max(a, end)
                        end = b
                trace.unlink()  # (hundreds of MB)
                summary = (f"{steps} steps, wall {wall:.3f} s, GPU running kernels {busy / 1e6:.3f} s "
                           f"({busy / 1e6 / wall:.0%}), {len(kernels)} kernels\n\n")
                table.write_text(summary + self.prof.key_averages().table(
                    sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90))
                print(f"profile: {summary.strip()} -> {table}", flush=True)

    return _Profile()


def summarize(clock: StepClock, batch: int, flops_per_sample: float, peak_flops: float) -> dict:
    s = statistics.median(clock.times)
    samples = batch / s
    return {
        "batch_size": batch,
        "s_per_step": round(s, 4),
        "samples_per_s": round(samples, 3),
        "source_tokens_per_s": round(samples * SRC_LEN),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "mfu_vs_measured_bf16_peak": round(samples * flops_per_sample / peak_flops, 4),
        "timed_steps": len(clock.times),
    }


def param_counts(model) -> dict:
    # peft's convention, as in the recipe's print_trainable_parameters: a packed 4-bit byte is 2 parameters.
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_params": trainable, "all_params": total}


def print_table(result: dict) -> None:
    rows = [("", "baseline (seed recipe)", "project (trial path)")]
    fields = [("batch size", "batch_size", "{}"), ("s/step", "s_per_step", "{:.3f}"),
              ("samples/s", "samples_per_s", "{:.2f}"), ("source tokens/s", "source_tokens_per_s", "{:,}"),
              ("peak GPU memory (GB)", "peak_gb", "{:.2f}"), ("4-bit footprint (bytes)", "footprint_bytes", "{:,}"),
              ("trainable params", "trainable_params", "{:,}"), ("all params", "all_params", "{:,}"),
              ("MFU (measured bf16 peak)", "mfu_vs_measured_bf16_peak", "{:.1%}")]
    for label, key, fmt in fields:
        rows.append((label, *(fmt.format(result[side][key]) if key in result.get(side, {}) else "-"
                              for side in ("baseline", "project"))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"{result['device']}, {result['date']}")
    for row in rows:
        label, *values = row
        print("  ".join([label.ljust(widths[0])] + [v.rjust(w) for v, w in zip(values, widths[1:], strict=True)]))
    if "speedup" in result:
        print(f"speedup {result['speedup']}x, loss_check {str(result['loss_check']).lower()}")


def flops_per_sample(cfg) -> float:
    """Matmul FLOPs of forward + backward-to-activations (the base is frozen: no weight grads)."""
    d, inner, ff, n_enc, n_dec = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers
    s, t = SRC_LEN, TGT_LEN
    enc = n_enc * ((4 * d * inner + 2 * d * ff) * s + 2 * s * s * inner)
    dec = n_dec * ((4 * d * inner + 2 * d * inner + 2 * d * ff) * t + 2 * d * inner * s + 2 * t * t * inner
                   + 2 * t * s * inner)
    forward = 2 * (enc + dec + d * cfg.vocab_size * t)
    return 2.0 * forward


def measured_bf16_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0)


def free_gpu() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def sdpa_backend(choice: str | None):
    """Restrict SDPA to one kernel (exploration), or leave PyTorch's choice."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if choice is None:
        return contextlib.nullcontext()
    return sdpa_kernel([{"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                         "flash": SDPBackend.FLASH_ATTENTION}[choice]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--preset", default="t5-3b-billsum")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--loss-steps", type=int, default=12)
    ap.add_argument("--loss-lr", type=float, default=1e-3, help="high enough that one batch is visibly learned")
    ap.add_argument("--loss-tolerance", type=float, default=0.02, help="max relative difference per step")
    ap.add_argument("--batch-size", type=int, help="override the preset's (exploration; writes a separate file)")
    ap.add_argument("--gradient-checkpointing", choices=["none", "feed-forward", "full"],
                    help="override the preset's (exploration; writes a separate file)")
    ap.add_argument("--compile", choices=["auto", "none", "blocks"],
                    help="override the preset's train.compile (exploration; writes a separate file)")
    ap.add_argument("--project-only", action="store_true", help="skip the baseline and the loss check")
    ap.add_argument("--attention-dropout", type=float,
                    help="exploration: T5's attention dropout instead of the model's (a recipe change)")
    ap.add_argument("--compile-attention", action="store_true",
                    help="exploration: with compiled blocks, also compile T5's attention sublayers (projections, "
                         "LoRA, norm, residual), the shared-mask SDPA call left eager (a graph break)")
    ap.add_argument("--compile-mode", help="exploration: torch.compile mode for the compiled blocks, e.g. "
                                           "reduce-overhead (CUDA graphs)")
    ap.add_argument("--sdpa-backend", choices=["efficient", "cudnn", "flash"],
                    help="exploration: the only SDPA kernel the project's steps may use")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile N project steps after the timed ones (torch.profiler: a table by GPU time, "
                         "and the share of the wall time the GPU ran kernels)")
    ap.add_argument("--show", metavar="JSON", help="print the table of a saved result and exit (no GPU needed)")
    args = ap.parse_args()
    if args.show:
        print_table(json.loads(Path(args.show).read_text()))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train = {k: v for k, v in (("batch_size", args.batch_size),
                                ("gradient_checkpointing", args.gradient_checkpointing),
                                ("compile", args.compile)) if v is not None}
    config = load_config(args.preset, overrides={"model": {"random_init": True}, "train": train})
    name = "trial_throughput" + "".join(f"-{k}-{v}" for k, v in train.items())
    name += "-project" if args.project_only else ""
    model_dir = resolve_model_path(ModelSettings(name=config.model.name, random_init=True))
    tokenizer = load_tokenizer(model_dir, config.model)
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(model_dir)
    fps = flops_per_sample(arch)
    peak = measured_bf16_peak()
    vocab = len(tokenizer)
    timed = args.warmup + args.steps
    if args.profile:
        name += "-profiled"
    if args.attention_dropout is not None:
        name += f"-attention-dropout-{args.attention_dropout:g}"
    if args.compile_attention:
        from transformers import AttentionInterface

        from qlora_ray import attention
        from qlora_ray import model as model_parts

        model_parts._COMPILED_T5_PARTS = (*model_parts._COMPILED_T5_PARTS, "T5LayerSelfAttention",
                                          "T5LayerCrossAttention")
        AttentionInterface.register(attention.SHARED_BIAS_SDPA,
                                    torch.compiler.disable(attention.shared_bias_sdpa_forward))
        name += "-compile-attention"
    if args.sdpa_backend:
        name += f"-sdpa-{args.sdpa_backend}"
    if args.compile_mode:
        module_compile = torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, *a, **k: module_compile(self, *a, **{**k, "mode": args.compile_mode})
        name += f"-mode-{args.compile_mode}"
    result: dict = {
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "model": f"{config.model.name} architecture, random weights (--random-init)",
        "shapes": {"source_tokens": SRC_LEN, "target_tokens": TGT_LEN},
        "flops_per_sample": fps,
        "measured_bf16_matmul_peak_flops": round(peak),
        "versions": _versions(),
    }

    if not args.project_only:
        baseline(result, model_dir, vocab, fps, peak, args)

    # Project: the sweep trial's own model and Trainer, with the preset's settings.
    batch = config.train.batch_size
    examples = synthetic_examples(batch * (timed + args.profile), vocab, seed=100)
    model = trial.build_model(model_dir, config, HPARAMS)
    if args.attention_dropout is not None:  # exploration: T5Attention passes its dropout to SDPA in training
        for module in model.modules():
            if type(module).__name__ == "T5Attention":
                module.dropout = args.attention_dropout
    clock = StepClock(args.warmup)
    with tempfile.TemporaryDirectory() as work:
        trainer = trial.build_trainer(model, tokenizer, as_data(examples), config, work, HPARAMS["learning_rate"],
                                      max_steps=timed + args.profile)
        trainer.add_callback(trainer_callback(clock, timed))
        if args.profile:
            trainer.add_callback(profiler_callback(timed, args.profile, out / f"{name}.txt"))
        with sdpa_backend(args.sdpa_backend):
            trainer.train()
    result["project"] = summarize(clock, batch, fps, peak) | {
        "footprint_bytes": model.get_base_model().get_memory_footprint(),
        **param_counts(model),
        "gradient_checkpointing": config.train.gradient_checkpointing,
        "compile": config.train.compile,
        "optim": config.train.optim,
        "compute_dtype": str(trial.compute_dtype(config.model)).removeprefix("torch."),
        "path": "qlora_ray.trial.build_model + build_trainer (what run_trial runs), preset " + args.preset
                + (f" with {train}" if train else ""),
    }
    print("project", json.dumps(result["project"]), flush=True)
    del model, trainer
    free_gpu()

    if not args.project_only:
        result["speedup"] = round(result["project"]["samples_per_s"] / result["baseline"]["samples_per_s"], 3)
        result["loss_check"], result["loss_check_detail"] = loss_check(model_dir, config, tokenizer, vocab, args)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"-> {path}")


def baseline(result: dict, model_dir: str, vocab: int, fps: float, peak: float, args) -> None:
    """The seed recipe, timed the same way."""
    timed = args.warmup + args.steps
    model, footprint = seed_model(model_dir)
    clock = StepClock(args.warmup)
    batches = [as_batch(synthetic_examples(SEED_BATCH, vocab, seed=i)) for i in range(timed)]
    seed_train(model, batches, lr=2e-5, on_step=clock)
    result["baseline"] = summarize(clock, SEED_BATCH, fps, peak) | {
        "footprint_bytes": footprint,
        **param_counts(model),
        "recipe": "fp32 load, NF4 + double quant, fp16 compute, prepare_model_for_kbit_training, "
                  "LoRA r32/a16 v,o + lm_head, PagedAdamW8bit, batch 4, no checkpointing",
    }
    print("baseline", json.dumps(result["baseline"]), flush=True)
    del model, batches
    free_gpu()


def loss_check(model_dir: str, config, tokenizer, vocab: int, args) -> tuple[bool, dict]:
    """Same weights, same batch, dropout off: the two paths' losses must agree step by step."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    examples = synthetic_examples(SEED_BATCH, vocab, seed=7)
    steps, lr = args.loss_steps, args.loss_lr

    model, _ = seed_model(model_dir)
    initial = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    no_dropout(model)
    base_losses = record_losses(model)
    seed_train(model, [as_batch(examples)] * steps, lr=lr)
    del model
    free_gpu()

    import dataclasses

    cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=SEED_BATCH))
    model = trial.build_model(model_dir, cfg, HPARAMS)
    set_peft_model_state_dict(model, initial)
    no_dropout(model)
    proj_losses = record_losses(model)
    with tempfile.TemporaryDirectory() as work:
        trainer = trial.build_trainer(model, tokenizer, as_data(examples), cfg, work, lr, max_steps=steps)
        trainer.train()
    del model, trainer
    free_gpu()

    rel = [abs(p - b) / b for p, b in zip(proj_losses, base_losses, strict=False)]
    drop = 1 - base_losses[-1] / base_losses[0]
    ok = len(proj_losses) == len(base_losses) == steps and max(rel) <= args.loss_tolerance and drop >= 0.05
    detail = {
        "steps": steps, "learning_rate": lr, "batch_size": SEED_BATCH, "dropout": 0.0,
        "baseline_losses": [round(x, 4) for x in base_losses],
        "project_losses": [round(x, 4) for x in proj_losses],
        "max_relative_difference": round(max(rel), 5),
        "tolerance": args.loss_tolerance,
        "baseline_loss_drop": round(drop, 4),
        "rule": "every step within tolerance, and the baseline's loss fell by >= 5% (so training is exercised)",
    }
    print("loss check", json.dumps(detail), flush=True)
    return ok, detail


def _versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "driver": smi}


if __name__ == "__main__":
    main()
