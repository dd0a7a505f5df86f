"""The batching engine in one process, against PEFT's mixed-adapter generate, on one model.

    python3 bench/engine_check.py --model t5-3b --out bench/results/engine_check.json   # GPU
    python3 bench/engine_check.py                                                      # CPU, embedded tiny T5

Builds `--adapters` random LoRA adapters (r 16 on q,v unless told otherwise) in a temporary
registry, then measures, on the same base:
- PEFT: `generate(adapter_names=...)` on a batch of `--rows` rows, all on one adapter and
  spread over every adapter (the baseline of issue 8);
- the engine (serving/engine.py): the same batches, each row a request, cold-load time
  per adapter, CUDA-graph capture time, and whether every row's greedy output in the mixed
  batch equals the same row decoded alone.
No HTTP here: bench/serve_throughput.py measures the whole service.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_registry(model_path: str, root: Path, count: int, rank: int, targets: list[str], lm_head: bool,
                  source_tokens: int) -> list[str]:
    from peft import LoraConfig, get_peft_model

    from qlora_ray.config import ModelSettings
    from qlora_ray.model import load_base_model
    from qlora_ray.registry import Candidate, Registry

    base = load_base_model(model_path, ModelSettings())
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="SEQ_2_SEQ_LM",
                        modules_to_save=["lm_head"] if lm_head else None)
    model = get_peft_model(base, config)
    staging = root.parent / "staging"
    candidates = []
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    noise = torch.randn(p.shape, generator=generator) * (0.5 / p.shape[-1] ** 0.5)
                    p.copy_(noise.to(p.device, p.dtype))
                elif "modules_to_save" in name:
                    p.add_((torch.randn(p.shape, generator=generator) * 0.01).to(p.device, p.dtype))
        out = staging / f"adapter-{i:02d}"
        model.save_pretrained(out)
        candidates.append(Candidate(f"adapter-{i:02d}", out, {"rougeL": 0.0}, {"r": rank}, str(i), 0))
    Registry(root).publish(candidates, base_model=model_path, base_metrics={},
                           task={"prefix": "summarize: ", "max_source_length": source_tokens,
                                 "max_target_length": 32},
                           metric="rougeL", mode="max", sweep="bench")
    del model, base
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return [c.adapter_id for c in candidates]


def prompts(tokenizer, rows: int, source_tokens: int) -> list[list[int]]:
    """Token ids of exactly source_tokens tokens each (different per row)."""
    from qlora_ray import embedded

    corpus = embedded.load_corpus(embedded.build_corpus(embedded.default_cache_dir(), progress=False), "train")
    out = []
    for i in range(rows):
        text = " ".join(r["text"] for r in corpus[i * 7 : i * 7 + 40])
        ids = tokenizer("summarize: " + text, truncation=True, max_length=source_tokens)["input_ids"]
        out.append(ids)
    return out


def peft_baseline(model_path: str, registry: Path, ids: list[str], inputs: list[list[int]], new_tokens: int,
                  repeats: int) -> dict:
    from peft import PeftModel

    from qlora_ray.config import ModelSettings
    from qlora_ray.model import load_base_model

    base = load_base_model(model_path, ModelSettings())
    model = PeftModel.from_pretrained(base, str(registry / ids[0]), adapter_name=ids[0])
    for adapter_id in ids[1:]:
        model.load_adapter(str(registry / adapter_id), adapter_name=adapter_id)
    model.eval()
    device = next(model.parameters()).device
    batch = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in inputs], batch_first=True).to(device)
    mask = (batch != 0).long()
    mask[:, 0] = 1
    out = {}
    for name, names in (("one_adapter", [ids[0]] * len(inputs)),
                        ("mixed", [ids[i % len(ids)] for i in range(len(inputs))])):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=batch, attention_mask=mask, adapter_names=names, do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            sync()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times[1:])
        out[f"{name}_tokens_per_s"] = round(len(inputs) * new_tokens / seconds, 1)
        out[f"{name}_s"] = round(seconds, 3)
    del model, base
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def run_rows(engine, rows) -> float:
    done = threading.Semaphore(0)
    for r in rows:
        r.on_event = lambda row, text, finished: done.release() if finished else None
    sync()
    start = time.perf_counter()
    engine.submit(rows)
    for _ in rows:
        done.acquire()
    sync()
    return time.perf_counter() - start


def engine_measure(model_path: str, registry_root: Path, ids: list[str], inputs: list[list[int]], new_tokens: int,
                   repeats: int, graphs: bool, max_rows: int, batch_invariant: bool) -> dict:
    from qlora_ray.adapter_check import BaseSpec
    from qlora_ray.config import ModelSettings
    from qlora_ray.model import load_base_model, load_tokenizer
    from qlora_ray.registry import Registry
    from qlora_ray.serving.adapter_store import AdapterStore
    from qlora_ray.serving.engine import Engine, Row
    from qlora_ray.serving.multi_lora import SlotContext

    model = load_base_model(model_path, ModelSettings())
    model.eval()
    tokenizer = load_tokenizer(model_path, ModelSettings())
    device = next(p for p in model.parameters() if p.is_floating_point()).device
    dtype = model.get_decoder().final_layer_norm.weight.dtype
    base = BaseSpec.from_model(model, model_path)
    ctx = SlotContext(len(ids) + 4, device, dtype)
    engine = Engine(model, tokenizer, ctx, max_rows=max_rows, max_source=max(len(x) for x in inputs),
                    max_new=max(new_tokens, 64), max_queued=1024, cuda_graphs=graphs,
                    batch_invariant=batch_invariant)
    store = AdapterStore(engine, base, Registry(registry_root), base_model=model_path, max_bytes=2 * 1024**3,
                         load_settings={"quant_type": "nf4", "double_quant": True})
    result: dict = {}
    load_ms = []
    for adapter_id in ids:
        sync()
        start = time.perf_counter()
        store.load_blocking(adapter_id)
        sync()
        load_ms.append((time.perf_counter() - start) * 1000)
    result["cold_load_ms"] = {"first": round(load_ms[0], 1), "median": round(statistics.median(load_ms), 1),
                              "max": round(max(load_ms), 1),
                              "median_read": round(statistics.median(x["read_ms"] for x in store.loads), 1)}
    result["cold_load_breakdown_ms"] = load_breakdown(store, registry_root / ids[-1], device)
    if engine.graphs is not None:
        result["graph_capture_s"] = round(engine.call(engine.graphs.capture_all).result(), 2)
        result["graphs_failed"] = engine.graphs.failed
    slot = {a: store.resident[a].slot for a in ids}

    def rows(assign, ignore_eos=True):
        return [Row(input_ids=x, slot=slot[assign(i)], max_new_tokens=new_tokens, on_event=None,
                    repetition_penalty=1.0, ignore_eos=ignore_eos) for i, x in enumerate(inputs)]

    for name, assign in (("one_adapter", lambda i: ids[0]), ("mixed", lambda i: ids[i % len(ids)])):
        times = [run_rows(engine, rows(assign)) for _ in range(repeats + 1)]
        seconds = statistics.median(times[1:])
        result[f"{name}_tokens_per_s"] = round(len(inputs) * new_tokens / seconds, 1)
        result[f"{name}_s"] = round(seconds, 3)
    # Continuous batching: requests arriving one by one, each a fresh row.
    sync()
    start = time.perf_counter()
    wave = rows(lambda i: ids[i % len(ids)])
    done = threading.Semaphore(0)
    for r in wave:
        r.on_event = lambda row, text, finished: done.release() if finished else None
        engine.submit([r])
        time.sleep(0.002)
    for _ in wave:
        done.acquire()
    result["staggered_mixed_tokens_per_s"] = round(len(inputs) * new_tokens / (time.perf_counter() - start), 1)
    # Greedy outputs: mixed batch vs each row alone.
    mixed = rows(lambda i: ids[i % len(ids)], ignore_eos=False)
    run_rows(engine, mixed)
    alone = []
    for i in range(len(inputs)):
        (r,) = rows(lambda j: ids[j % len(ids)], ignore_eos=False)[i : i + 1]
        run_rows(engine, [r])
        alone.append(r)
    same = sum(a.tokens == b.tokens for a, b in zip(mixed, alone, strict=True))
    result["greedy_equal_rows"] = f"{same}/{len(inputs)}"
    result["steps"] = engine.steps
    engine.close()
    return result


def load_breakdown(store, directory: Path, device) -> dict:
    """Where a cold load's time goes (median of 5, after the loads above warmed the caches)."""
    from qlora_ray.adapter_check import check_adapter
    from qlora_ray.serving.adapter_store import read_safetensors

    def timed(fn):
        times = []
        for _ in range(5):
            sync()
            start = time.perf_counter()
            value = fn()
            sync()
            times.append((time.perf_counter() - start) * 1000)
        return value, round(statistics.median(times), 2)

    out = {}
    checked, out["check_adapter"] = timed(lambda: check_adapter(directory, store.base))
    tensors, out["read_to_device"] = timed(lambda: read_safetensors(directory / "adapter_model.safetensors", device))
    _, out["to_dtype"] = timed(lambda: [t.to(torch.bfloat16) for t in tensors.values()])
    _, out["whole_read"] = timed(lambda: store._read(directory.name, directory))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="embedded, t5-3b (random weights) or a local path")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q,v")
    parser.add_argument("--lm-head", action="store_true", help="adapters also save their own lm_head")
    parser.add_argument("--source-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--no-batch-invariance", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()

    from qlora_ray.config import ModelSettings
    from qlora_ray.model import load_tokenizer, resolve_model_path

    if args.model == "embedded":
        settings = ModelSettings()
    elif args.model == "t5-3b":
        settings = ModelSettings(name="google-t5/t5-3b", random_init=True)
    else:
        settings = ModelSettings(name=args.model)
    model_path = resolve_model_path(settings)
    work = Path(tempfile.mkdtemp(prefix="engine-check-"))
    try:
        registry = work / "registry"
        start = time.perf_counter()
        ids = make_registry(model_path, registry, args.adapters, args.rank, args.targets.split(","), args.lm_head,
                            args.source_tokens)
        print(f"{len(ids)} adapters in {time.perf_counter() - start:.1f} s", flush=True)
        inputs = prompts(load_tokenizer(model_path, ModelSettings()), args.rows, args.source_tokens)
        result = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor()})",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": args.model, "adapters": len(ids), "rows": args.rows, "rank": args.rank,
            "targets": args.targets, "lm_head": args.lm_head, "source_tokens": [len(x) for x in inputs][:1],
            "new_tokens": args.new_tokens, "base": "4-bit NF4 double quant",
        }
        if not args.no_peft:
            result["peft"] = peft_baseline(model_path, registry, ids, inputs, args.new_tokens, args.repeats)
            print("peft", result["peft"], flush=True)
        result["engine"] = engine_measure(model_path, registry, ids, inputs, args.new_tokens, args.repeats,
                                          not args.no_graphs, args.rows, not args.no_batch_invariance)
        result["engine"]["batch_invariant"] = not args.no_batch_invariance
        print("engine", result["engine"], flush=True)
        if torch.cuda.is_available():
            result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
