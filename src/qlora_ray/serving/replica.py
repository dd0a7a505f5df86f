"""The model replica: one base (4-bit by default), every adapter, one batching engine.

Requests arrive with their adapter id in the request (and as Serve's multiplexed model
id, so Serve routes them to a replica that already holds the adapter). The replica
tokenizes each prompt with its adapter's own task settings, hands the rows to the engine,
and answers with completions or a ReplicaError; it never raises to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

import torch
from ray import serve
from ray.serve import metrics

from qlora_ray.adapter_check import AdapterInvalid, BaseSpec, check_adapter
from qlora_ray.config import ConfigError, ModelSettings
from qlora_ray.devices import device_note, replica_id
from qlora_ray.model import load_base_model, load_tokenizer
from qlora_ray.registry import INDEX, Registry, RegistryError, entry_load, entry_task
from qlora_ray.serving.adapter_store import AdapterRejected, AdapterStore
from qlora_ray.serving.catalog import base_model_id
from qlora_ray.serving.engine import Engine, QueueFull, Row, compute_dtype
from qlora_ray.serving.multi_lora import SlotContext
from qlora_ray.serving.protocol import (
    Completion,
    GenerationRequest,
    GenerationResult,
    ReplicaError,
    StreamChunk,
    error,
)
from qlora_ray.serving.settings import ServeSettings
from qlora_ray.tasks import causal as causal_task

logger = logging.getLogger("ray.serve")


class ReplicaMetrics:
    def __init__(self):
        tags = ("adapter",)
        self.loads = metrics.Counter("qlora_ray_adapter_loads", "Adapter loads into a replica", tag_keys=tags)
        self.evictions = metrics.Counter("qlora_ray_adapter_evictions", "Adapters evicted from a replica",
                                         tag_keys=tags)
        self.rejections = metrics.Counter("qlora_ray_adapter_rejections", "Adapters that failed validation",
                                          tag_keys=tags)
        self.load_ms = metrics.Histogram("qlora_ray_adapter_load_ms", "Adapter cold-load time (ms)",
                                         boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 5000], tag_keys=tags)


class _Handle:
    """What Serve's multiplexer caches per adapter; it calls __del__ when its LRU evicts it."""

    def __init__(self, store: AdapterStore, adapter_id: str):
        self.store, self.adapter_id, self.done = store, adapter_id, False

    def __del__(self):
        if not self.done:
            self.done = True
            self.store.evict(self.adapter_id)


def dequantize(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace every 4-bit layer by a plain one holding the same (dequantized) weights: the base
    the adapters were trained on, decoded without dequantizing at every step."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                    device=weight.device, dtype=dtype)
            plain.weight.data = weight
            if module.bias is not None:
                plain.bias.data = module.bias.data.to(dtype)
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)


@serve.deployment(name="AdapterModel")
class AdapterModel:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.registry = Registry(settings.registry)
        self.index = self.registry.read()
        if not self.index.get("base_model"):
            raise RuntimeError(f"no adapters registered in {self.registry.root}: run a sweep first")
        self.base_model = self.index["base_model"]
        self.base_model_id = base_model_id(self.base_model)
        default = self._entry(self.index.get("default"))
        load = entry_load(self.index, default or {})
        model_settings = ModelSettings(**{k: v for k, v in load.items() if k in ModelSettings.__dataclass_fields__})
        self.tokenizer = load_tokenizer(self.base_model, model_settings)
        model = load_base_model(self.base_model, model_settings)
        model.eval()
        base = BaseSpec.from_model(model, self.base_model)  # before any LoRA wrapper goes in
        self.causal = not getattr(model.config, "is_encoder_decoder", False)
        dtype = compute_dtype(model)
        if settings.base_weights == "bf16":
            dtype = torch.bfloat16 if torch.cuda.is_available() else dtype
            dequantize(model, dtype)
        device = next(p for p in model.parameters() if p.is_floating_point()).device
        logger.info(device_note(  # which GPU this replica is on (bench/multi_gpu.sh reads it)
            model, role="replica", replica_id=replica_id()))
        self.model = model
        self.vocab_size = model.get_input_embeddings().num_embeddings
        tasks = [entry_task(self.index, e) for e in self.index.get("adapters", [])] + [self.index.get("task") or {}]
        max_source = max(int(t.get("max_source_length") or 512) for t in tasks)
        capacity = settings.max_adapters_per_replica + 4  # + base, pinned default, two in flight while evicted
        ctx = SlotContext(capacity, device, dtype)
        self.engine = Engine(model, self.tokenizer, ctx, max_rows=settings.max_batch_size, max_source=max_source,
                             max_new=settings.max_new_tokens_limit, max_queued=settings.max_queued_requests,
                             cuda_graphs=settings.cuda_graphs, batch_invariant=settings.batch_invariant)
        self.metrics = ReplicaMetrics()
        self.store = AdapterStore(self.engine, base, self.registry, base_model=self.base_model,
                                  max_bytes=settings.max_adapter_bytes, load_settings=load, metrics=self.metrics)
        self._reserve_ranks(base)
        self._index_mtime = self._mtime()
        self._pin_default(startup=True)
        if self.engine.graphs is not None:
            seconds = self.engine.call(self.engine.graphs.capture_all).result()
            logger.info("captured the decode step for %s rows in %.1f s", self.engine.graphs.buckets, seconds)
        store = self.store

        # Serve caches its LRU wrapper on the decorated function, so a plain function (not a
        # bound method), decorated at run time because the bound comes from settings.
        async def load(adapter_id: str) -> _Handle:
            await store.load(adapter_id)
            return _Handle(store, adapter_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=settings.max_adapters_per_replica)(load)
        threading.Thread(target=self._watch_registry, name="qlora-ray-registry", daemon=True).start()

    # ---- Serve API (called through the Api deployment's handle) ----

    async def ping(self) -> bool:
        return True

    async def status(self) -> dict:
        return self.store.status() | self.engine.load()

    async def generate(self, request: GenerationRequest) -> GenerationResult | ReplicaError:
        rows: list[Row] = []
        try:
            async for item in self._run(request, rows, stream=False):
                if isinstance(item, ReplicaError):
                    return item
            completions = [self._completion(request, rows, i) for i in range(len(rows))]
            failed = next((r for r in rows if r.finish_reason == "error"), None)
            if failed is not None:
                return error("generation_failed", failed.error or "generation failed")
            return GenerationResult(request.adapter, completions)
        except asyncio.CancelledError:  # the client went away or timed out: free the rows' places
            for r in rows:
                r.cancelled = True
            raise

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk | ReplicaError]:
        rows: list[Row] = []
        try:
            async for item in self._run(request, rows, stream=True):
                yield item
        finally:
            for r in rows:
                if r.finish_reason is None:
                    r.cancelled = True

    # ---- internals ----

    async def _run(self, request: GenerationRequest, rows: list[Row], *, stream: bool):
        """Validate, submit the request's rows, yield StreamChunks (stream) and at most one ReplicaError."""
        adapter = request.adapter
        slot = 0
        if adapter is not None:
            try:
                if serve.get_multiplexed_model_id() == adapter:
                    await self.get_adapter(adapter)  # the multiplexer's LRU; loads through the store
                slot = await self.store.acquire(adapter)
            except AdapterRejected as e:
                yield error("adapter_rejected", f"adapter {adapter!r} was rejected: {e}")
                return
            except Exception as e:  # the multiplexer wraps the store's error
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                yield error("adapter_rejected", f"adapter {adapter!r} could not be loaded: {reason}")
                return
        try:
            task = self._task(adapter)
            made = self._rows(request, task, slot)
            if isinstance(made, ReplicaError):
                yield made
                return
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def on_event(row: Row, text: str, finished: bool) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (row, text, finished))

            for r in made:
                r.on_event = on_event
            rows.extend(made)
            try:
                self.engine.submit(rows)
            except QueueFull as e:
                yield error("queue_full", f"the replica is busy ({e}); retry later")
                return
            except ValueError as e:
                rows.clear()
                yield error("invalid_request", str(e))
                return
            pending = len(rows)
            index = {id(r): i for i, r in enumerate(rows)}
            while pending:
                row, text, finished = await events.get()
                pending -= finished
                if stream:
                    if row.finish_reason == "error":
                        yield error("generation_failed", row.error or "generation failed")
                        return
                    if text or finished:
                        yield StreamChunk(index[id(row)], text, row.finish_reason if finished else None,
                                          len(row.input_ids), len(row.tokens))
        finally:
            if adapter is not None:
                self.store.release(adapter)

    def _rows(self, request: GenerationRequest, task: dict, slot: int) -> list[Row] | ReplicaError:
        generation = task.get("generation") or {}
        penalty = generation.get("repetition_penalty")
        if penalty is None:
            penalty = getattr(self.model.generation_config, "repetition_penalty", None) or 1.0
        max_new = request.max_new_tokens or int(task.get("max_target_length") or self.settings.default_max_new_tokens)
        max_new = min(max_new, self.settings.max_new_tokens_limit)
        max_source = min(int(task.get("max_source_length") or self.engine.runner.max_source),
                         self.engine.runner.max_source)
        if request.messages is not None:
            chat_task = task
            if request.adapter is None and getattr(self.tokenizer, "chat_template", None):
                # the base itself was not trained on the sweep's prompts: chat through its own template
                chat_task = {"format": "messages", "chat_template": None}
            made = self._chat_ids(chat_task, request.messages, max_source)
            if isinstance(made, ReplicaError):
                return made
            prompts = [made]
        else:
            prompts = []
            for p, prompt in enumerate(request.prompts):
                try:
                    ids = self._prompt_ids(task, prompt, max_source)
                except Exception as e:  # e.g. text the tokenizer cannot encode: this request fails, no other
                    return error("invalid_request", f"prompt {p} cannot be tokenized: {type(e).__name__}")
                prompts.append(ids)
        rows = []
        for p, ids in enumerate(prompts):
            if not ids:
                return error("invalid_request", f"prompt {p} is empty after tokenization")
            if max(ids) >= self.vocab_size:  # a tokenizer larger than the model's embedding
                return error("invalid_request", f"prompt {p} has a token id the model does not have")
            for j in range(request.n):
                seed = None if request.seed is None else request.seed + j
                rows.append(Row(input_ids=ids, slot=slot, max_new_tokens=max_new, on_event=None,
                                temperature=request.temperature, top_p=request.top_p, seed=seed,
                                repetition_penalty=float(penalty), stop=list(request.stop),
                                ignore_eos=request.ignore_eos))
        return rows

    def _prompt_ids(self, task: dict, prompt: str, max_source: int) -> list[int]:
        """The prompt's tokens as the adapter saw its training prompts (the task's prefix, prompt template
        or chat template), the end cut at max_source as training cut it."""
        if self.causal:
            return causal_task.prompt_ids(task, self.tokenizer, prompt)[:max_source]
        return self.tokenizer(task.get("prefix", "") + prompt, truncation=True, max_length=max_source)["input_ids"]

    def _chat_ids(self, task: dict, messages: list[dict], max_source: int) -> list[int] | ReplicaError:
        """A conversation formatted as the adapter's training data was: through the chat template (the
        task's, else the tokenizer's) up to the assistant's turn for chat-trained adapters; a single user
        message through the prompt template for adapters trained on prompts."""
        if not self.causal:
            return error("unsupported", f"{self.base_model_id} is a sequence-to-sequence model and has no chat "
                                        "format: use /v1/completions")
        try:
            ids = causal_task.chat_prompt_ids(task, self.tokenizer, messages)
        except ConfigError as e:  # no chat template anywhere: this server cannot chat with this adapter
            return error("unsupported", f"{e}; use /v1/completions")
        except Exception as e:  # wrong turn shape, or a template that rejects these roles or this order
            reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            return error("invalid_messages", f"the messages cannot be formatted for this adapter: {reason}")
        if len(ids) > max_source:
            return error("invalid_messages", f"the conversation is {len(ids)} tokens long; this adapter takes at "
                                            f"most {max_source}")
        return ids

    def _completion(self, request: GenerationRequest, rows: list[Row], i: int) -> Completion:
        r = rows[i]
        return Completion(index=i, prompt_index=i // request.n, text=r.text, finish_reason=r.finish_reason or "stop",
                          prompt_tokens=len(r.input_ids), completion_tokens=len(r.tokens))

    def _entry(self, adapter_id: str | None) -> dict | None:
        return next((a for a in self.index.get("adapters", []) if a["id"] == adapter_id), None)

    def _task(self, adapter_id: str | None) -> dict:
        entry = self._entry(adapter_id) if adapter_id else None
        return entry_task(self.index, entry) if entry else (self.index.get("task") or {})

    def _reserve_ranks(self, base: BaseSpec) -> None:
        """Wrap every layer some registered adapter targets, sized for its rank, before any
        CUDA graph is captured (a later adapter needing more only costs a re-capture)."""
        ranks: dict[str, int] = {}
        for entry in self.index.get("adapters", []):
            try:
                checked = check_adapter(self.registry.root / entry["id"], base,
                                        max_bytes=self.settings.max_adapter_bytes)
            except (AdapterInvalid, OSError):
                continue  # rejected when requested, with its reason
            for path, m in checked.modules.items():
                ranks[path] = max(ranks.get(path, 0), m.r)
        self.engine.call(lambda: self.store.reserve(ranks)).result()

    def _pin_default(self, *, startup: bool = False) -> None:
        default = self.index.get("default")
        old, self.store.pinned = self.store.pinned, default
        if old and old != default:
            self.store.evict(old)  # unpinned: evicted unless the multiplexer or rows still use it
        if default:
            try:
                self.store.load_blocking(default, startup=startup)
            except AdapterRejected as e:
                logger.warning("the default adapter %s is rejected: %s", default, e)

    def _mtime(self) -> int:
        try:
            return (self.registry.root / INDEX).stat().st_mtime_ns
        except OSError:
            return 0

    def _watch_registry(self) -> None:
        """Registry changes (qlora-ray promote/remove/import, a new sweep) reach a running replica."""
        while True:
            time.sleep(self.settings.registry_poll_s)
            mtime = self._mtime()
            if mtime == self._index_mtime:
                continue
            try:
                index = self.registry.read()
            except (OSError, ValueError, RegistryError):
                continue  # mid-write by another tool: next time
            self._index_mtime, self.index = mtime, index
            listed = {a["id"] for a in index.get("adapters", [])}
            for adapter_id in self.store.status()["resident"]:
                if adapter_id not in listed or self.store.changed_on_disk(adapter_id):
                    self.store.evict(adapter_id, force=True)
            for adapter_id in list(self.store.rejected):
                self.store.rejected.pop(adapter_id, None)  # may have been replaced: check again on use
            self._pin_default()
            logger.info("registry changed: default %s, %d adapters", index.get("default"), len(listed))
