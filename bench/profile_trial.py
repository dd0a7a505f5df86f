"""Where a T5-3b QLoRA training step spends its time, and what each candidate change gives.

Exploration for bench/NOTES-trial-speed.md, run on the GPU through the device tool: each
variant is the seed recipe's step (forward, backward, optimizer) with one or more changes,
written out plainly here so that the changes can be measured one at a time. The product's
own trial path is measured by bench/trial_throughput.py.

    python3 bench/profile_trial.py --out DIR [--variants seed,bf16_base,...] [--profile seed,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SRC_LEN, TGT_LEN = (1024, 128) if torch.cuda.is_available() else (64, 16)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of this script only


def synthetic_batches(n: int, batch: int, vocab: int, seed: int = 0) -> list[dict]:
    """Full-length batches (the recipe's 1024/128 shapes), eos-terminated, on the GPU."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, SRC_LEN), generator=g)
        labels = torch.randint(3, vocab, (batch, TGT_LEN), generator=g)
        ids[:, -1] = 1
        labels[:, -1] = 1
        out.append({"input_ids": ids.to(DEV), "attention_mask": torch.ones_like(ids).to(DEV), "labels": labels.to(DEV)})
    return out


def build(model_dir: str, v: dict):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSeq2SeqLM, BitsAndBytesConfig

    if v.get("attn") == "qlora_ray_sdpa":
        import qlora_ray.attention  # noqa: F401  (registers the backend)
    compute = getattr(torch, v.get("compute", "float16"))
    skip = v.get("skip_modules")
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        **({"llm_int8_skip_modules": skip} if skip is not None else {}),
    )
    kwargs = {"attn_implementation": v["attn"]} if v.get("attn") else {}
    model = AutoModelForSeq2SeqLM.from_pretrained(
        model_dir, quantization_config=bnb, device_map={"": 0 if DEV == "cuda" else "cpu"},
        dtype=getattr(torch, v.get("load_dtype", "float32")), **kwargs,
    )
    footprint = model.get_memory_footprint()
    if v.get("upcast", True):  # the recipe: prepare_model_for_kbit_training (casts the rest to fp32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=v.get("gc", False))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if v.get("gc"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if v.get("ffn_ckpt"):
        from qlora_ray.model import checkpoint_feed_forward

        checkpoint_feed_forward(model)
    lora = LoraConfig(r=32, lora_alpha=16, target_modules=["v", "o"], lora_dropout=0.05, bias="none",
                      task_type="SEQ_2_SEQ_LM", modules_to_save=["lm_head"])
    model = get_peft_model(model, lora)
    if not v.get("upcast", True):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights and their optimizer state stay fp32
    if v.get("compile"):
        for block in [*model.base_model.model.encoder.block, *model.base_model.model.decoder.block]:
            block.compile()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, footprint, trainable, total


def make_optimizer(model, v: dict):
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    if v.get("optim", "paged_adamw_8bit") == "paged_adamw_8bit" and DEV == "cuda":
        return bnb.optim.PagedAdamW8bit(params, lr=2e-5, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01, fused=DEV == "cuda")


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _trace_sdpa(limit: int = 8) -> None:
    """Print what the model hands to SDPA (dtypes, shapes, strides) for the first calls."""
    import torch.nn.functional as F

    original, calls = F.scaled_dot_product_attention, [0]

    def traced(q, k, v, attn_mask=None, dropout_p=0.0, **kw):
        if calls[0] < limit:
            calls[0] += 1
            desc = [(t.dtype, tuple(t.shape), t.stride(), t.requires_grad) for t in (q, k, v)]
            m = None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape), attn_mask.stride(),
                                                attn_mask.requires_grad)
            print(f"sdpa call q/k/v={desc} mask={m} dropout={dropout_p} kw={kw}", flush=True)
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, **kw)

    F.scaled_dot_product_attention = traced


def run_variant(model_dir: str, name: str, v: dict, *, warmup: int, steps: int, profile_dir: Path | None) -> dict:
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model, footprint, trainable, total = build(model_dir, v)
    if v.get("trace_sdpa"):
        _trace_sdpa()
    model.train()
    opt = make_optimizer(model, v)
    batch = v.get("batch", 4)
    batches = synthetic_batches(4, batch, vocab=4000)
    amp = v.get("autocast")
    autocast = (lambda: torch.autocast(DEV, dtype=getattr(torch, amp))) if amp else nullcontext
    if v.get("sdpa_backend"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, v["sdpa_backend"])

        def ctx():
            stack = ExitStack()
            stack.enter_context(autocast())
            stack.enter_context(sdpa_kernel([backend]))
            return stack
    else:
        ctx = autocast

    def step(b):
        with ctx():
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses = []
    for i in range(warmup):
        losses.append(step(batches[i % len(batches)]).item())
    _sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(batches[i % len(batches)])
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() if DEV == "cuda" else 0
    if profile_dir is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(2):
                step(batches[i])
            _sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
        (profile_dir / f"profile_{name}.txt").write_text(table)
    s = statistics.median(times)
    result = {
        "variant": name, "settings": v, "s_per_step": round(s, 4), "samples_per_s": round(batch / s, 3),
        "peak_gb": round(peak / 1e9, 2), "footprint_bytes": footprint, "trainable": trainable, "total": total,
        "losses": [round(x, 4) for x in losses],
    }
    return result


SEED = {"load_dtype": "float32", "compute": "float16", "upcast": True}
BF16 = {"load_dtype": "bfloat16", "compute": "bfloat16", "upcast": False, "autocast": "bfloat16"}
VARIANTS = {
    "seed": SEED,
    "seed_bf16": SEED | {"compute": "bfloat16"},
    "project_before": {"load_dtype": "bfloat16", "compute": "bfloat16", "upcast": True, "autocast": "bfloat16"},
    "bf16_base": BF16,
    "bf16_shared_bias": BF16 | {"attn": "qlora_ray_sdpa"},
    "bf16_shared_bias_adamw": BF16 | {"attn": "qlora_ray_sdpa", "optim": "adamw_fused"},
    "bf16_shared_bias_gc_b8": BF16 | {"attn": "qlora_ray_sdpa", "gc": True, "batch": 8},
    "bf16_shared_bias_gc_b16": BF16 | {"attn": "qlora_ray_sdpa", "gc": True, "batch": 16},
    "bf16_shared_bias_compile": BF16 | {"attn": "qlora_ray_sdpa", "compile": True},
    "bf16_eff": BF16 | {"attn": "qlora_ray_sdpa", "sdpa_backend": "EFFICIENT_ATTENTION"},
    "bf16_eff_compile": BF16 | {"attn": "qlora_ray_sdpa", "sdpa_backend": "EFFICIENT_ATTENTION", "compile": True},
    "bf16_eff_gc_b8": BF16 | {"attn": "qlora_ray_sdpa", "sdpa_backend": "EFFICIENT_ATTENTION", "gc": True,
                              "batch": 8},
    "bf16_shared_bias_b8": BF16 | {"attn": "qlora_ray_sdpa", "batch": 8},
    "bf16_shared_bias_compile_gc_b16": BF16 | {"attn": "qlora_ray_sdpa", "compile": True, "gc": True, "batch": 16},
    "ffn_ckpt_b8": BF16 | {"attn": "qlora_ray_sdpa", "ffn_ckpt": True, "batch": 8},
    "ffn_ckpt_b8_compile": BF16 | {"attn": "qlora_ray_sdpa", "ffn_ckpt": True, "batch": 8, "compile": True},
    "ffn_ckpt_b12": BF16 | {"attn": "qlora_ray_sdpa", "ffn_ckpt": True, "batch": 12},
    "gc_b32": BF16 | {"attn": "qlora_ray_sdpa", "gc": True, "batch": 32},
    "bf16_eff_trace": BF16 | {"attn": "qlora_ray_sdpa", "sdpa_backend": "EFFICIENT_ATTENTION", "trace_sdpa": True},
    "bf16_cudnn": BF16 | {"attn": "qlora_ray_sdpa", "sdpa_backend": "CUDNN_ATTENTION"},
}


def diagnose_sdpa() -> None:
    """Which fused SDPA kernels accept T5's shapes: float bias, dropout, bf16, grad."""
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, n, d = 4, 32, 1024, 128
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cases = {
        "bias_b1_dropout": (torch.randn(1, h, n, n, device="cuda", dtype=torch.bfloat16), 0.1),
        "bias_bB_dropout": (torch.randn(b, h, n, n, device="cuda", dtype=torch.bfloat16), 0.1),
        "bias_b1_nodropout": (torch.randn(1, h, n, n, device="cuda", dtype=torch.bfloat16), 0.0),
        "bias_fp32_dropout": (torch.randn(1, h, n, n, device="cuda"), 0.1),
    }
    for name, (mask, p) in cases.items():
        for backend in ["EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION"]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([getattr(SDPBackend, backend)]):
                        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)
                        out.sum().backward()
                    status = "ok"
                except RuntimeError as e:
                    status = "fails: " + str(e).splitlines()[0][:120]
            reasons = " | ".join(str(w.message)[:200] for w in caught)
            print(f"sdpa {name:20s} {backend:20s} {status} {reasons}", flush=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        qf = q.float()
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=cases["bias_b1_dropout"][0], dropout_p=0.1)
    print("autocast sdpa output dtype", out.dtype, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir", help="default: the random-weight T5-3b built by qlora_ray.random_init")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", default="seed,bf16_shared_bias")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--diagnose-sdpa", action="store_true")
    args = ap.parse_args()
    if args.diagnose_sdpa:
        diagnose_sdpa()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir
    if not model_dir:
        from qlora_ray.embedded import default_cache_dir
        from qlora_ray.random_init import build_random_model

        model_dir = str(build_random_model("google-t5/t5-3b", default_cache_dir()))
    results = []
    for name in args.variants.split(","):
        t0 = time.time()
        try:
            r = run_variant(model_dir, name, VARIANTS[name], warmup=args.warmup, steps=args.steps,
                            profile_dir=out if name in args.profile.split(",") else None)
        except Exception as e:  # an OOM or a failed compile is a result too
            r = {"variant": name, "settings": VARIANTS[name], "error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
        r["wall_s"] = round(time.time() - t0, 1)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "settings"}), flush=True)
        (out / "variants.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
