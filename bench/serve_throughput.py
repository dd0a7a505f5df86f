"""Serving throughput: many LoRA adapters on one 4-bit base, under concurrent load.

Run on a GPU (through the device tool: bench/serve_gpu.sh), or here on the CPU:

    python3 bench/serve_throughput.py --model t5-3b                  # GPU: T5-3b, random weights
    python3 bench/serve_throughput.py --model t5-3b --with-lm-head   # adapters that carry their own lm_head
    python3 bench/serve_throughput.py --seconds 10 --requests 100    # CPU: the embedded tiny T5
    python3 bench/serve_throughput.py --show bench/results/serve_throughput.json

What it does, in one bounded command:

1. Builds a registry of `--adapters` synthetic LoRA adapters (r=`--rank`, alpha 32, q and v;
   random non-zero A and B, so every adapter answers differently; `--with-lm-head` adds an
   lm_head of their own as the sweep's adapters have) in a temporary directory, published
   with `Registry.publish` like a sweep's.
2. PEFT baseline (a subprocess, so its memory is freed): the 4-bit base and every adapter in
   one PeftModel, `generate(adapter_names=...)` on a batch of `--concurrency` rows of
   `--source-tokens` source tokens and exactly `--max-new-tokens` new tokens: one adapter
   for every row, and the batch spread over all adapters.
3. Project: the Serve application (`qlora_ray.serving.build_app`) in its own process and
   Ray instance, on a free loopback port; a separate client process drives `--concurrency`
   closed-loop clients (asyncio + aiohttp) through scenarios: uniform popularity over 1, 8
   and all adapters, Zipf (s=`--zipf-s`) over 8 and all adapters. Each scenario is warmed
   up (every adapter in it requested), then timed until `--requests` or `--seconds`,
   whichever comes first. Adapter cold loads are measured first, one adapter at a time
   (the server's own numbers from GET /v1/stats where it has them).

Requests go to the OpenAI-style POST /v1/completions with `ignore_eos` (where the server
takes it), so every completion has `--max-new-tokens` tokens, like the baseline's
min_new_tokens; tokens/s counts usage.completion_tokens. A server without /v1/completions
gets the native POST /v1/summarize, which can stop early and reports no token counts (the
client re-tokenizes the summaries): compare its tokens/s only with "tok/req" in view.

Writes `--out` (JSON) and prints a table. In it, "mixed_32" is the uniform mix over all
`--adapters` (32 by default), "p99_ms" that scenario's p99 latency, "errors" every failed
request of every scenario (warm-ups included). Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

T5_3B = "google-t5/t5-3b"
PREFIX = "summarize: "
LORA_ALPHA = 32
TARGET_MODULES = ["q", "v"]
ADAPTER_ID = "bench-a{:03d}"
HEALTH_TIMEOUT_S = 420  # server start: Ray, the replica's base load, CUDA graph capture
BASELINE_TIMEOUT_S = 420


def log(msg: str) -> None:
    print(f"[serve_throughput {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- registry


def _lm_head_init(model_path: str, shape: tuple[int, ...]):
    """The base's lm_head (or the tied embedding it shares), read from its safetensors; None if absent."""
    import torch
    from safetensors import safe_open

    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in ("lm_head.weight", "shared.weight", "encoder.embed_tokens.weight"):
                if key in f.keys() and tuple(f.get_slice(key).get_shape()) == tuple(shape):
                    return f.get_tensor(key).to(torch.float32)
    return None


def build_registry(root: Path, model_path: str, *, n: int, rank: int, with_lm_head: bool, source_tokens: int,
                   max_new_tokens: int, seed: int) -> list[str]:
    """`n` random LoRA adapters published to a registry at `root`; returns their ids.

    The adapter's tensors (names and shapes) come from a PeftModel built once on the meta
    device, so no base weights are loaded; each adapter is those tensors refilled with
    random values and saved the way `save_pretrained` saves them (fp32 safetensors, like a
    trial's trainable weights).
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from qlora_ray.registry import Candidate, Registry

    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        base = AutoModelForSeq2SeqLM.from_config(config)
    lora = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=list(TARGET_MODULES), lora_dropout=0.0,
                      bias="none", task_type="SEQ_2_SEQ_LM", init_lora_weights=False,
                      modules_to_save=["lm_head"] if with_lm_head else None,
                      base_model_name_or_path=model_path)
    with warnings.catch_warnings():  # peft: "tie_word_embeddings ... ensure_weight_tying" (lm_head saved)
        warnings.simplefilter("ignore", UserWarning)
        peft_model = get_peft_model(base, lora)
    lora.inference_mode = True  # as PeftModel.save_pretrained writes it
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    lm_head_key = next((k for k in shapes if "lm_head" in k), None)
    lm_head = _lm_head_init(model_path, shapes[lm_head_key]) if lm_head_key else None
    del peft_model, base

    # Random values on the GPU where there is one (a T5-3b adapter with its lm_head is 45M values).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(seed)
    if lm_head is not None:
        lm_head = lm_head.to(device)

    def randn(shape: tuple[int, ...]):
        return torch.randn(shape, generator=g, device=device)

    staging = root.parent / f".{root.name}.staging"
    candidates, ids = [], []
    for i in range(n):
        adapter_id = ADAPTER_ID.format(i)
        tensors = {}
        for key, shape in shapes.items():
            if key == lm_head_key:
                noise = randn(shape) * 0.02
                tensor = (lm_head + noise) if lm_head is not None else noise
            elif "lora_A" in key:  # [r, in]: unit-variance projections of the input
                tensor = randn(shape) / shape[1] ** 0.5
            else:  # lora_B [out, r]: a small update, so the base still dominates
                tensor = randn(shape) * 0.02
            tensors[key] = tensor.cpu()
        out = staging / adapter_id
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        lora.save_pretrained(str(out))  # adapter_config.json
        candidates.append(Candidate(adapter_id=adapter_id, source_dir=out, metrics={"rougeL": 0.5 - i / (1000 * n)},
                                    hyperparameters={"r": rank, "lora_alpha": LORA_ALPHA,
                                                     "target_modules": "+".join(TARGET_MODULES),
                                                     "modules_to_save": "lm_head" if with_lm_head else ""},
                                    trial_id=f"synthetic{i:03d}", step=0))
        ids.append(adapter_id)
    task = {"prefix": PREFIX, "max_source_length": source_tokens, "max_target_length": max_new_tokens}
    try:  # where the registry records per-adapter task settings, the way a sweep writes them (greedy)
        from qlora_ray.config import DataSettings
        from qlora_ray.registry import task_settings

        task = task_settings(DataSettings(prefix=PREFIX, max_source_length=source_tokens,
                                          max_target_length=max_new_tokens), num_beams=1, base_model=model_path)
    except ImportError:
        pass
    Registry(root).publish(candidates, base_model=model_path, base_metrics={}, task=task, metric="rougeL",
                           mode="max", sweep="serve-throughput")
    shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in root.glob("*/adapter_model.safetensors"))
    log(f"registry: {n} adapters (r={rank}, {'q,v + lm_head' if with_lm_head else 'q,v'}, "
        f"{size / n / 1e6:.1f} MB each) in {time.perf_counter() - t0:.1f}s -> {root}")
    return ids


# ----------------------------------------------------------------------------- prompts


def build_prompts(model_path: str, count: int, source_tokens: int, max_chars: int = 15_000) -> list[str]:
    """`count` distinct source texts of at least `source_tokens` tokens (with the task prefix).

    Functions of the embedded corpus (the standard library's source), concatenated; the
    server truncates them to the task's max_source_length, which is `source_tokens`.
    """
    from transformers import AutoTokenizer

    from qlora_ray import embedded

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.model_max_length = 1 << 30  # only counting: no warning about texts over the model's length
    rows = embedded.load_corpus(embedded.build_corpus(embedded.default_cache_dir()))
    texts = [r["text"] for r in rows if r["text"].strip()]
    rng = random.Random(1234)
    rng.shuffle(texts)
    prompts, pos = [], 0
    for _ in range(count):
        parts: list[str] = []
        while True:
            parts.append(texts[pos % len(texts)])
            pos += 1
            text = "\n\n".join(parts)
            if len(text) > max_chars:
                text = text[:max_chars]
            if len(text) >= max_chars or len(tokenizer(PREFIX + text).input_ids) >= source_tokens + 4:
                break
        prompts.append(text)
    return prompts


# ----------------------------------------------------------------------------- PEFT baseline


def baseline_worker(spec: dict, result_path: Path) -> None:
    """(subprocess) The plain PEFT path: one PeftModel holding every adapter, generate(adapter_names=)."""
    import torch
    from peft import PeftModel

    from qlora_ray.config import ModelSettings
    from qlora_ray.model import load_base_model, load_tokenizer
    from qlora_ray.registry import Registry

    cuda = torch.cuda.is_available()
    registry = Registry(spec["registry"])
    ids, batch, new = spec["adapters"], spec["concurrency"], spec["max_new_tokens"]
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(spec["model_path"], ModelSettings())
    model = load_base_model(spec["model_path"], ModelSettings())
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = PeftModel.from_pretrained(model, str(registry.adapter_dir(ids[0])), adapter_name=ids[0])
    for adapter_id in ids[1:]:
        model.load_adapter(str(registry.adapter_dir(adapter_id)), adapter_name=adapter_id)
    model.eval()
    adapters_s = time.perf_counter() - t0
    log(f"baseline: base loaded in {base_s:.1f}s, {len(ids)} adapters in {adapters_s:.1f}s")

    prompts = spec["prompts"]
    rows = [PREFIX + prompts[i % len(prompts)] for i in range(batch)]
    inputs = tokenizer(rows, max_length=spec["source_tokens"], truncation=True, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def timed(names: list[str]) -> tuple[float, int]:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, adapter_names=names, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, num_beams=1)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, out.shape[0] * (out.shape[1] - 1)  # column 0: the decoder start token

    result: dict = {"batch": batch, "source_tokens": int(inputs["input_ids"].shape[1]), "max_new_tokens": new,
                    "base_load_s": round(base_s, 2), "adapters_load_s": round(adapters_s, 2)}
    cases = {"one_adapter": [ids[0]] * batch, f"mixed_{len(ids)}": [ids[i % len(ids)] for i in range(batch)]}
    for name, names in cases.items():
        timed(names)  # warm-up
        runs = [timed(names) for _ in range(spec["iterations"])]
        s = statistics.median(t for t, _ in runs)
        tokens = runs[0][1]
        result[name] = {"s_per_generate": round(s, 4), "new_tokens": tokens, "tokens_per_s": round(tokens / s, 1),
                        "iterations": len(runs)}
        log(f"baseline {name}: {tokens} new tokens in {s:.3f}s -> {tokens / s:.1f} tokens/s")
        if cuda:
            result["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        result_path.write_text(json.dumps(result))  # after each case: a baseline cut short keeps the first


# ----------------------------------------------------------------------------- server


def server_worker(spec: dict) -> None:
    """(subprocess, its own session) A Ray instance of its own and the Serve app on 127.0.0.1:port."""
    import threading

    import ray
    from ray import serve

    from qlora_ray.serving import build_app

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    init = {"address": "local", "include_dashboard": False, "namespace": "serve-throughput"}
    if spec.get("num_cpus"):
        init["num_cpus"] = spec["num_cpus"]
    ray.init(**init)
    try:
        log(f"server: Ray resources {ray.cluster_resources()}")
        serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})
        serve.run(build_app(spec["serve_args"]), name="qlora-ray", route_prefix="/", blocking=False)
        log(f"server: application running on 127.0.0.1:{spec['port']}")
        while not stop.wait(1.0):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """This environment for a subprocess: absolute PYTHONPATH (Ray workers start elsewhere) incl. src/."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the server starts its own Ray instance
    paths = [str(ROOT / "src")] + [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Worker:
    """This script in another process and session (`--worker KIND`), stopped by its process group."""

    started: list[Worker] = []  # every worker of this run, stopped at its end

    def __init__(self, kind: str, spec: dict, work: Path, log_path: Path | None = None):
        self.kind, self.stopped = kind, False
        self.spec_path = work / f"{kind}.spec.json"
        self.result_path = work / f"{kind}.result.json"
        self.spec_path.write_text(json.dumps(spec))
        self.result_path.unlink(missing_ok=True)
        self.log_path = log_path
        out = open(log_path, "w") if log_path else None  # closed in stop()
        self._out = out
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(self.spec_path),
               "--result", str(self.result_path)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), start_new_session=True,
                                     stdout=out, stderr=subprocess.STDOUT if out else None)
        Worker.started.append(self)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def result(self) -> dict | None:
        try:
            return json.loads(self.result_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM to the process group (the server shuts Serve and its Ray down), then SIGKILL."""
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if self.wait(grace_s) is None:
                log(f"worker {self.proc.pid} did not stop in {grace_s:.0f}s: SIGKILL to its process group")
        try:  # also whatever it left behind in its group (Ray's processes share it)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        if self._out:
            self._out.close()

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def wait_healthy(url: str, server: Worker, timeout: float) -> float:
    import urllib.error
    import urllib.request

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited ({server.proc.returncode}):\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    raise RuntimeError(f"the server was not healthy after {timeout:.0f}s:\n{server.log_tail()}")


# ----------------------------------------------------------------------------- client


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1 / (i + 1) ** s for i in range(n)]
    return [x / sum(w) for x in w]


class Client:
    def __init__(self, spec: dict, session):
        self.spec, self.session = spec, session
        self.url = spec["url"]
        self.api = spec["api"]
        self.tokenizer = None

    async def request(self, adapter: str, prompt: str, max_tokens: int) -> dict:
        """One request: {"ok", "latency_s", "tokens" (None: to count), "text", "status", "error"}."""
        import aiohttp

        if self.api == "completions":
            path = "/v1/completions"
            body = {"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    **self.spec["extra_body"]}
        else:
            path = "/v1/summarize"
            body = {"text": prompt, "adapter": adapter, "max_new_tokens": max_tokens}
        t0 = time.perf_counter()
        try:
            async with self.session.post(self.url + path, json=body) as r:
                raw = await r.read()
                latency = time.perf_counter() - t0
                if r.status != 200:
                    return {"ok": False, "latency_s": latency, "status": r.status,
                            "error": f"{r.status}: {raw[:300].decode(errors='replace')}"}
                data = json.loads(raw)
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
            return {"ok": False, "latency_s": time.perf_counter() - t0, "status": None,
                    "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if self.api == "completions":
            try:
                tokens = int(data["usage"]["completion_tokens"])
                text = data["choices"][0]["text"]
            except (KeyError, IndexError, TypeError, ValueError):
                return {"ok": False, "latency_s": latency, "status": 200, "error": f"bad body: {str(data)[:300]}"}
            prompt_tokens = data["usage"].get("prompt_tokens")
            return {"ok": True, "latency_s": latency, "tokens": tokens, "text": text, "status": 200,
                    "prompt_tokens": prompt_tokens, "finish_reason": data["choices"][0].get("finish_reason")}
        return {"ok": True, "latency_s": latency, "tokens": None, "text": data.get("summary", ""), "status": 200}

    def count_tokens(self, results: list[dict]) -> None:
        """/v1/summarize reports no usage: re-tokenize the summaries (after the timing)."""
        missing = [r for r in results if r["ok"] and r.get("tokens") is None]
        if not missing:
            return
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.spec["model_path"])
        for r in missing:
            r["tokens"] = len(self.tokenizer(r["text"], add_special_tokens=False).input_ids)

    async def run_many(self, plan: list[tuple[str, str]], concurrency: int, deadline: float | None) -> list[dict]:
        """Closed loop: `concurrency` clients take the next (adapter, prompt) of the plan until it or time runs out."""
        it = iter(plan)
        results: list[dict] = []

        async def worker():
            while deadline is None or time.perf_counter() < deadline:
                try:
                    adapter, prompt = next(it)
                except StopIteration:
                    return
                issued = time.perf_counter()
                r = await self.request(adapter, prompt, self.spec["max_new_tokens"])
                r["adapter"], r["issued"] = adapter, issued
                results.append(r)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results

    async def get_json(self, path: str) -> dict | None:
        try:
            async with self.session.get(self.url + path) as r:
                if r.status != 200:
                    return None
                return json.loads(await r.read())
        except Exception:  # absent or failing: the caller falls back
            return None

    async def cold_loads(self) -> dict:
        """Every adapter once, one at a time, then once more: the client's view of a cold load.

        The first adapter also takes the replica's first-request costs, so it is left out of
        the client-side estimate (the server's own load times, from /v1/stats, include it).
        """
        ids, prompt = self.spec["adapters"], self.spec["prompts"][0]
        first = await self.request(ids[0], prompt, 1)
        if not first["ok"]:
            return {"error": first["error"]}
        cold, warm, errors = {}, {}, []
        for adapter_id in ids[1:]:
            for store in (cold, warm):
                r = await self.request(adapter_id, prompt, 1)
                if r["ok"]:
                    store[adapter_id] = r["latency_s"] * 1000
                else:
                    errors.append(r["error"])
        deltas = [cold[a] - warm[a] for a in cold if a in warm]
        out: dict = {"client_first_minus_second_ms": _summary(deltas), "client_first_ms": _summary(list(cold.values())),
                     "errors": len(errors), "error_sample": errors[0] if errors else None}
        return out

    async def scenario(self, sc: dict, seed: int) -> dict:
        rng = random.Random(seed)
        ids = self.spec["adapters"][: sc["adapters"]]
        weights = zipf_weights(len(ids), self.spec["zipf_s"]) if sc["kind"] == "zipf" else [1.0] * len(ids)
        prompts = self.spec["prompts"]
        c = self.spec["concurrency"]

        # Warm-up, untimed: every adapter of the scenario, then a full batch drawn from its mix.
        warm = [(a, rng.choice(prompts)) for a in ids]
        warm += [(a, rng.choice(prompts)) for a in rng.choices(ids, weights, k=max(c, 2 * c - len(ids)))]
        warm_results = await self.run_many(warm, c, time.perf_counter() + max(60.0, self.spec["seconds"]))

        n = self.spec["requests"]
        plan = [(a, rng.choice(prompts)) for a in rng.choices(ids, weights, k=n)]
        t0 = time.perf_counter()
        results = await self.run_many(plan, c, t0 + self.spec["seconds"])
        wall = time.perf_counter() - t0
        self.count_tokens(results)
        ok = [r for r in results if r["ok"]]
        errors = [r for r in results if not r["ok"]]
        tokens = sum(r["tokens"] for r in ok)
        lat = [r["latency_s"] * 1000 for r in ok]
        prompt_tokens = [r["prompt_tokens"] for r in ok if isinstance(r.get("prompt_tokens"), int)]
        finish_reasons: dict[str, int] = {}
        for r in ok:
            if r.get("finish_reason"):
                finish_reasons[r["finish_reason"]] = finish_reasons.get(r["finish_reason"], 0) + 1
        used = {}
        for r in results:
            used[r["adapter"]] = used.get(r["adapter"], 0) + 1
        warm_errors = [r for r in warm_results if not r["ok"]]
        return {
            "name": sc["name"], "kind": sc["kind"], "adapters": len(ids), "concurrency": c,
            "requests": len(results), "ok": len(ok), "errors": len(errors),
            "error_sample": errors[0]["error"] if errors else None,
            "wall_s": round(wall, 3),
            # From the last request sent to the last answer: the closed loop winding down (fewer than
            # `concurrency` requests in flight), counted in wall_s.
            "drain_s": round(t0 + wall - max(r["issued"] for r in results), 3) if results else None,
            "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
            "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
            "completion_tokens": tokens,
            "mean_completion_tokens": round(tokens / len(ok), 2) if ok else None,
            "mean_prompt_tokens": round(statistics.fmean(prompt_tokens), 1) if prompt_tokens else None,
            "finish_reasons": finish_reasons,
            "latency_ms": {"p50": _round(percentile(lat, 50)), "p90": _round(percentile(lat, 90)),
                           "p99": _round(percentile(lat, 99)), "max": _round(max(lat) if lat else None),
                           "mean": _round(statistics.fmean(lat) if lat else None)},
            "adapters_used": len(used),
            "top_adapter_share": round(max(used.values()) / len(results), 3) if used else None,
            "stopped_by": "requests" if len(results) >= n else "seconds",
            "warmup": {"requests": len(warm_results), "errors": len(warm_errors),
                       "error_sample": warm_errors[0]["error"] if warm_errors else None},
        }


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "median": None, "max": None}
    return {"count": len(values), "median": round(statistics.median(values), 1), "max": round(max(values), 1)}


async def client_main(spec: dict, result_path: Path) -> None:
    import aiohttp

    result: dict = {"api": spec["api"], "scenarios": []}

    def save() -> None:  # after every phase: a timed-out client still leaves what it measured
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, result_path)

    timeout = aiohttp.ClientTimeout(total=spec["request_timeout_s"])
    connector = aiohttp.TCPConnector(limit=spec["concurrency"] + 4, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        client = Client(spec, session)
        if spec["cold_loads"]:
            t0 = time.perf_counter()
            result["cold_loads"] = await client.cold_loads()
            log(f"client: cold loads measured in {time.perf_counter() - t0:.1f}s: {result['cold_loads']}")
        result["stats_after_cold"] = await client.get_json("/v1/stats")
        save()
        for i, sc in enumerate(spec["scenarios"]):
            r = await client.scenario(sc, seed=1000 + i)
            result["scenarios"].append(r)
            log(f"client: {r['name']}: {r['requests']} requests in {r['wall_s']}s, {r['requests_per_s']} req/s, "
                f"{r['tokens_per_s']} tokens/s, p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms, "
                f"{r['errors']} errors" + (f" ({r['error_sample']})" if r["error_sample"] else ""))
            save()
        result["stats_end"] = await client.get_json("/v1/stats")
        save()


def http(url: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of a GET (or a POST of `body` as JSON); status 0 when nothing answered."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def detect_api(url: str, adapter: str, prefer: str) -> tuple[str, bool]:
    """("completions" | "summarize", whether GET /v1/stats answers)."""
    stats = http(url, "/v1/stats")[0] == 200
    if prefer != "auto":
        return prefer, stats
    status, body = http(url, "/openapi.json")
    if status == 200:
        try:
            paths = json.loads(body).get("paths", {})
            if "/v1/completions" in paths:
                return "completions", stats
            if "/v1/summarize" in paths:
                return "summarize", stats
        except (json.JSONDecodeError, AttributeError):
            pass
    # No schema: try a completion (a 404 that names no adapter means the route is not there).
    status, body = http(url, "/v1/completions", {"model": adapter, "prompt": "def f(): pass", "max_tokens": 1,
                                                 "temperature": 0}, timeout=300)
    if status in (404, 405) and adapter not in body.decode(errors="replace"):
        return "summarize", stats
    return "completions", stats


def check_extra_body(url: str, adapter: str, extra: dict) -> str | None:
    """None if the server takes a completion with these extra fields, else its answer."""
    status, body = http(url, "/v1/completions", {"model": adapter, "prompt": "def f(): pass", "max_tokens": 2,
                                                 "temperature": 0, **extra}, timeout=300)
    return None if status == 200 else f"{status}: {body[:300].decode(errors='replace')}"


def completion_extras(url: str, adapter: str, extra: dict, ignore_eos: bool) -> dict:
    """The extra fields every completion sends: `extra` (refused: an error), and ignore_eos where taken."""
    want = extra | ({"ignore_eos": True} if ignore_eos and "ignore_eos" not in extra else {})
    plain = check_extra_body(url, adapter, {})
    if plain is not None:  # the server fails completions anyway: send what was asked, count the errors
        log(f"a first completion failed ({plain})")
        return want
    if extra and (problem := check_extra_body(url, adapter, extra)) is not None:
        raise RuntimeError(f"the server refuses --extra-body {extra}: {problem}")
    if want != extra and (problem := check_extra_body(url, adapter, want)) is not None:
        log(f"the server refuses ignore_eos ({problem}): completions may stop early")
        return dict(extra)
    return want


# ----------------------------------------------------------------------------- report


def scenario_list(n: int, only: str | None) -> list[dict]:
    out, seen = [], set()
    for kind, sizes in (("uniform", (1, 8, n)), ("zipf", (8, n))):
        for size in sizes:
            size = min(size, n)
            name = f"{kind}-{size}"
            if (kind == "zipf" and size < 2) or name in seen:
                continue
            seen.add(name)
            out.append({"name": name, "kind": kind, "adapters": size})
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in seen]
        if unknown:
            raise SystemExit(f"unknown scenario(s) {unknown}; there are: {', '.join(sorted(seen))}")
        out = [s for s in out if s["name"] in wanted]
    return out


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {cpu}, {cores} cores"


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "ray"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def summarize_project(result: dict) -> None:
    by_name = {s["name"]: s for s in result["scenarios"]}
    n = result["settings"]["adapters"]

    def tps(name: str):
        s = by_name.get(name)
        return s["tokens_per_s"] if s else None

    mixed = by_name.get(f"uniform-{n}")
    result["project"] = {
        "one_adapter_tokens_per_s": tps("uniform-1"),
        "mixed_32_tokens_per_s": tps(f"uniform-{n}"),
        "zipf_32_tokens_per_s": tps(f"zipf-{n}"),
        "p99_ms": mixed["latency_ms"]["p99"] if mixed else None,
        "errors": sum(s["errors"] + s["warmup"]["errors"] for s in result["scenarios"]) if result["scenarios"]
        else None,
    }


def print_table(result: dict) -> None:
    s = result.get("settings", {})
    print(f"{result.get('device')}, {result.get('date')}")
    print(f"model {result.get('model')}; {s.get('adapters')} adapters r={s.get('rank')}"
          f"{' + lm_head' if s.get('with_lm_head') else ''}; concurrency {result.get('concurrency')}; "
          f"{s.get('source_tokens')} source tokens, {s.get('max_new_tokens')} new tokens; api {s.get('api')}")
    base = result.get("peft_baseline") or {}
    if base.get("one_adapter_tokens_per_s") is not None or base.get("mixed_32_tokens_per_s") is not None:
        print(f"PEFT baseline (generate, batch {result.get('concurrency')}): "
              f"one adapter {base.get('one_adapter_tokens_per_s')} tokens/s, "
              f"mixed over {s.get('adapters')} {base.get('mixed_32_tokens_per_s')} tokens/s")
    elif base.get("error"):
        print(f"PEFT baseline: failed: {base['error'][:300]}")
    rows = [("scenario", "requests", "req/s", "tokens/s", "tok/req", "p50 ms", "p99 ms", "errors")]
    for sc in result.get("scenarios", []):
        lat = sc["latency_ms"]
        rows.append((sc["name"], str(sc["requests"]), _fmt(sc["requests_per_s"], "{:.2f}"),
                     _fmt(sc["tokens_per_s"], "{:,.1f}"), _fmt(sc["mean_completion_tokens"], "{:.1f}"),
                     _fmt(lat["p50"], "{:,.0f}"), _fmt(lat["p99"], "{:,.0f}"), str(sc["errors"])))
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)]))
    for sc in result.get("scenarios", []):
        if sc.get("error_sample"):
            print(f"  {sc['name']}: {sc['errors']} errors, e.g. {sc['error_sample'][:200]}")
    cold = result.get("cold_load") or {}
    if cold.get("median") is not None:
        print(f"adapter cold load ({cold.get('source')}): median {cold['median']} ms, max {cold['max']} ms "
              f"over {cold.get('count')} adapters")
    for err in result.get("errors_run", []):
        print(f"run error: {err[:500]}")


def _fmt(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def collect_client(result: dict, out: dict) -> None:
    """The client's file into the result, and the headline numbers."""
    result["scenarios"] = out.get("scenarios", [])
    result["cold_loads_client"] = out.get("cold_loads")
    # cold_load_ms: the slowest load on request (the goal's figure); cold_load: median, count, source.
    result["cold_load"] = cold_load_summary(out)
    result["cold_load_ms"] = (result["cold_load"] or {}).get("max")
    stats = out.get("stats_end") or out.get("stats_after_cold")
    if isinstance(stats, dict) and isinstance(stats.get("loads"), list):
        stats = dict(stats, loads=len(stats["loads"]))  # keep the file small: how many, not every entry
    result["server_stats"] = stats
    summarize_project(result)


def cold_load_summary(client: dict) -> dict | None:
    for key in ("stats_after_cold", "stats_end"):  # the one-at-a-time pass, else whenever each first loaded
        stats = client.get(key)
        loads = stats.get("loads") if isinstance(stats, dict) else None
        if not isinstance(loads, list) or not loads:
            continue
        first: dict[str, float] = {}
        startup = [float(e["ms"]) for e in loads if isinstance(e, dict) and e.get("startup")]
        for entry in loads:
            if (isinstance(entry, dict) and not entry.get("startup") and entry.get("adapter") not in first
                    and entry.get("ms") is not None):
                first[entry["adapter"]] = float(entry["ms"])
        if first:
            when = "one at a time" if key == "stats_after_cold" else "during the scenarios' warm-ups"
            # The replica's own load of the pinned default at startup (the first use of its read path)
            # is reported apart: a request never waits for it.
            return _summary(list(first.values())) | {
                "source": f"server GET /v1/stats: first load of each adapter on request ({when})",
                "startup_load_ms": startup}
    estimate = (client.get("cold_loads") or {}).get("client_first_minus_second_ms")
    if estimate and estimate.get("count"):
        return estimate | {"source": "client: first request minus second request (max_tokens 1), one at a time"}
    return None


# ----------------------------------------------------------------------------- main


def run(args) -> dict:
    import torch

    from qlora_ray.config import ModelSettings
    from qlora_ray.model import resolve_model_path
    from qlora_ray.serving.settings import ServeSettings

    cuda = torch.cuda.is_available()
    started = time.perf_counter()

    def left(phase: str) -> float:
        """Seconds of --max-wall left; none left: the run ends here (stopping its workers, writing what it has)."""
        remaining = args.max_wall - (time.perf_counter() - started)
        if remaining <= 0:
            raise TimeoutError(f"--max-wall {args.max_wall:.0f}s reached before {phase}")
        return remaining
    n, c = args.adapters, args.concurrency
    result: dict = {
        "device": device_name(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": None,
        "concurrency": c,
        "peft_baseline": {"one_adapter_tokens_per_s": None, "mixed_32_tokens_per_s": None},
        "project": {"one_adapter_tokens_per_s": None, "mixed_32_tokens_per_s": None, "zipf_32_tokens_per_s": None,
                    "p99_ms": None, "errors": None},
        "cold_load_ms": None,
        "cold_load": None,
        "scenarios": [],
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "spec", "result", "show")},
        "versions": versions(),
        "errors_run": [],
    }
    work = Path(tempfile.mkdtemp(prefix="serve-throughput-"))
    server: Worker | None = None
    client: Worker | None = None
    Worker.started.clear()
    try:
        settings = (ModelSettings(name=T5_3B, random_init=True) if args.model == "t5-3b"
                    else ModelSettings(name=args.model) if args.model != "embedded" else ModelSettings())
        t0 = time.perf_counter()
        model_path = resolve_model_path(settings)
        result["model"] = (f"{T5_3B} architecture, random weights (--random-init)" if args.model == "t5-3b"
                           else "embedded:tiny-t5" if args.model == "embedded" else args.model)
        result["model_path"] = model_path
        log(f"model {result['model']} at {model_path} ({time.perf_counter() - t0:.1f}s)")
        registry = work / "registry"
        ids = build_registry(registry, model_path, n=n, rank=args.rank, with_lm_head=args.with_lm_head,
                             source_tokens=args.source_tokens, max_new_tokens=args.max_new_tokens, seed=args.seed)
        if cuda:  # the random-init build and the adapters' random values: give the GPU back to the workers
            torch.cuda.empty_cache()
        prompts = build_prompts(model_path, max(64, c), args.source_tokens)

        baseline = args.peft_baseline if args.peft_baseline is not None else cuda
        if baseline:
            log("PEFT baseline (subprocess)")
            spec = {"registry": str(registry), "model_path": model_path, "adapters": ids, "concurrency": c,
                    "max_new_tokens": args.max_new_tokens, "source_tokens": args.source_tokens, "prompts": prompts,
                    "iterations": args.baseline_iterations}
            w = Worker("baseline", spec, work)
            limit = min(BASELINE_TIMEOUT_S, left("the PEFT baseline"))
            rc = w.wait(limit)
            w.stop(grace_s=10)
            out = w.result()
            if out is None:
                msg = f"PEFT baseline failed (exit {rc if rc is not None else 'timeout'})"
                result["peft_baseline"]["error"] = msg
                result["errors_run"].append(msg)
            else:
                result["peft_baseline"] = {
                    "one_adapter_tokens_per_s": out.get("one_adapter", {}).get("tokens_per_s"),
                    "mixed_32_tokens_per_s": out.get(f"mixed_{n}", {}).get("tokens_per_s"), **out}
                if f"mixed_{n}" not in out:
                    result["errors_run"].append(f"PEFT baseline cut short (exit {rc if rc is not None else 'timeout'})")

        if not args.project:
            return result
        # The server: settings the tree's ServeSettings knows, plus --serve-arg overrides.
        known = set(ServeSettings.__dataclass_fields__)
        serve_args = {"registry": str(registry), "max_batch_size": c, "max_adapters_per_replica": n,
                      "max_queued_requests": max(256, 4 * c), "num_gpus": 1 if cuda else 0,
                      "max_new_tokens_limit": max(256, args.max_new_tokens), "request_timeout_s": 600.0}
        for item in args.serve_arg:
            key, _, value = item.partition("=")
            serve_args[key.strip()] = value.strip()
        dropped = sorted(set(serve_args) - known)
        if dropped:
            log(f"ServeSettings has no {dropped}: not passed")
        serve_args = {k: v for k, v in serve_args.items() if k in known}
        result["settings"]["serve_args"] = serve_args
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        server_log = Path(args.server_log) if args.server_log else work / "server.log"
        server_log.parent.mkdir(parents=True, exist_ok=True)
        log(f"server on {url} (log {server_log}), settings {serve_args}")
        server = Worker("server", {"port": port, "serve_args": serve_args, "num_cpus": args.ray_cpus}, work,
                        log_path=server_log)
        up = wait_healthy(url, server, min(HEALTH_TIMEOUT_S, left("the server start")))
        result["server_start_s"] = round(up, 1)
        api, has_stats = detect_api(url, ids[0], args.api)
        result["settings"]["api"] = api
        extra: dict = {}
        if api == "completions":
            extra = completion_extras(url, ids[0], json.loads(args.extra_body) if args.extra_body else {},
                                      args.ignore_eos)
        elif args.extra_body:
            log("--extra-body is for /v1/completions: not sent to /v1/summarize")
        result["settings"]["extra_body_sent"] = extra
        log(f"server healthy after {up:.0f}s; api /v1/{api}, /v1/stats {'yes' if has_stats else 'no'}")

        scenarios = scenario_list(n, args.scenarios)
        spec = {"url": url, "api": api, "adapters": ids, "prompts": prompts, "concurrency": c,
                "max_new_tokens": args.max_new_tokens, "requests": args.requests, "seconds": args.seconds,
                "zipf_s": args.zipf_s, "scenarios": scenarios, "model_path": model_path,
                "extra_body": extra,
                "request_timeout_s": args.request_timeout, "cold_loads": not args.no_cold_loads}
        # Cold loads (one at a time), then per scenario: warm-up (bounded by max(60 s, --seconds)), the
        # timed part (--seconds) and the requests still in flight at its end.
        budget = 300 + len(scenarios) * (max(60.0, args.seconds) + args.seconds + 120)
        client = Worker("client", spec, work)
        limit = min(budget, left("the client"))
        rc = client.wait(limit)
        if rc is None:
            result["errors_run"].append(f"the client ran past {limit:.0f}s and was stopped"
                                        + (" (--max-wall)" if limit < budget else ""))
        elif rc != 0:
            result["errors_run"].append(f"the client exited {rc}")
    except (Exception, KeyboardInterrupt) as e:  # report what was measured, and why the rest is missing
        import traceback

        traceback.print_exc()
        result["errors_run"].append(f"{type(e).__name__}: {e}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        # The client first (its file holds every scenario it finished), then the server (gracefully:
        # Serve and its Ray instance), and any worker cut short.
        for w in reversed(Worker.started):
            if w.proc.poll() is None or w is server:
                log(f"stopping the {w.kind}" + (" worker" if w is not server else ""))
            w.stop(grace_s=60 if w is server else 5)
        if client is not None:
            collect_client(result, client.result() or {})
        if args.keep_tmp:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded",
                    help="embedded (the tiny T5, CPU), t5-3b (its architecture with random weights, GPU), "
                         "or a local model directory")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--with-lm-head", action="store_true", help="adapters also save their own lm_head")
    ap.add_argument("--concurrency", type=int, default=32, help="closed-loop clients; also the batch size")
    ap.add_argument("--source-tokens", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2000, help="per scenario, at most")
    ap.add_argument("--seconds", type=float, default=20.0, help="per scenario, at most")
    ap.add_argument("--scenarios", help="comma list (default all): uniform-1,uniform-8,uniform-N,zipf-8,zipf-N")
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--peft-baseline", action=argparse.BooleanOptionalAction, default=None,
                    help="time plain PEFT generate too (default: on with a GPU)")
    ap.add_argument("--baseline-iterations", type=int, default=3, help="timed generate calls per case (median)")
    ap.add_argument("--project", action=argparse.BooleanOptionalAction, default=True,
                    help="start the server and run the scenarios (--no-project: registry and baseline only)")
    ap.add_argument("--api", choices=["auto", "completions", "summarize"], default="auto")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="completions run to max_tokens (as the baseline's min_new_tokens), where the server "
                         "takes ignore_eos; --no-ignore-eos: they stop at end of sequence")
    ap.add_argument("--extra-body", help="JSON merged into every /v1/completions body, e.g. '{\"top_p\": 0.9}'")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="a ServeSettings field for the server (repeatable), e.g. base_weights=bf16")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--no-cold-loads", action="store_true", help="skip the one-at-a-time cold-load pass")
    ap.add_argument("--ray-cpus", type=int, help="CPUs of the server's Ray instance (default: all)")
    ap.add_argument("--max-wall", type=float, default=1800.0,
                    help="seconds for the whole run: past it, workers are stopped and what was measured is written")
    ap.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON result (default bench/results/serve_throughput[_lm_head][_cpu].json)")
    ap.add_argument("--server-log", help="where the server's output goes (default: the temporary directory)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary registry and logs")
    ap.add_argument("--show", metavar="JSON", help="print the table of a saved result and exit")
    ap.add_argument("--worker", choices=["baseline", "server", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.show:
        print_table(json.loads(Path(args.show).read_text()))
        return
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        if args.worker == "server":
            server_worker(spec)
        elif args.worker == "baseline":
            baseline_worker(spec, Path(args.result))
        else:
            asyncio.run(client_main(spec, Path(args.result)))
        return
    if args.extra_body:
        try:
            if not isinstance(json.loads(args.extra_body), dict):
                raise ValueError
        except ValueError:
            ap.error("--extra-body must be a JSON object")
    for name in ("adapters", "rank", "concurrency", "source_tokens", "max_new_tokens", "requests"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")

    import torch

    if args.out is None:
        name = "serve_throughput" + ("_lm_head" if args.with_lm_head else "")
        name += "" if torch.cuda.is_available() else "_cpu"
        args.out = str(ROOT / "bench" / "results" / f"{name}.json")
    def terminate(signum, frame):  # a SIGTERM ends the run like Ctrl-C: workers stopped, the result written
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print_table(result)
    print(f"-> {out}")
    if result["errors_run"] or (result["project"]["errors"] or 0):
        sys.exit(1)  # the result is written all the same


if __name__ == "__main__":
    main()
