"""The model replica: one 4-bit base, many LoRA adapters, chosen per request.

Serve's model multiplexing routes a request to a replica that already holds its adapter
and bounds how many each replica holds (LRU). The adapters live side by side in one
PeftModel; generation names the adapter of every row (`adapter_names=`) instead of
switching a global active adapter, which would race between concurrent batches.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import torch
from peft import PeftModel
from ray import serve

from qlora_ray.config import ModelSettings
from qlora_ray.model import load_base_model, load_tokenizer
from qlora_ray.registry import Registry
from qlora_ray.serving.settings import ServeSettings


@dataclass
class _Row:
    text: str
    adapter_id: str
    max_new_tokens: int


class LoadedAdapter:
    """What the multiplexer caches; Serve calls __del__ when it evicts the adapter."""

    def __init__(self, owner: AdapterModel, adapter_id: str):
        self.owner, self.adapter_id, self._unloaded = owner, adapter_id, False

    def __del__(self):
        if not self._unloaded:
            self._unloaded = True
            self.owner._unload(self.adapter_id)


@serve.deployment(name="AdapterModel")
class AdapterModel:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.registry = Registry(settings.registry)
        index = self.registry.read()
        if not index.get("base_model"):
            raise RuntimeError(f"no adapters registered in {self.registry.root}: run a sweep first")
        self.task = index.get("task", {})
        self.tokenizer = load_tokenizer(index["base_model"], ModelSettings())
        self.model: PeftModel | torch.nn.Module = load_base_model(index["base_model"], ModelSettings())
        self.model.eval()
        self._lock = threading.Lock()  # adapters are added/removed/used from worker threads
        # The bound comes from settings, so decorate at run time; Serve caches its LRU
        # wrapper on the decorated object, which must be a plain function, not a method.
        async def load_adapter(adapter_id: str) -> LoadedAdapter:
            await asyncio.to_thread(self._load, adapter_id)
            return LoadedAdapter(self, adapter_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=settings.max_adapters_per_replica)(
            load_adapter
        )
        self._generate_batch.set_max_batch_size(settings.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def ping(self) -> bool:
        return True

    async def summarize(self, texts: list[str], max_new_tokens: int) -> list[str]:
        adapter_id = serve.get_multiplexed_model_id()
        await self.get_adapter(adapter_id)
        return await asyncio.gather(*(self._generate_batch(_Row(t, adapter_id, max_new_tokens)) for t in texts))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, rows: list[_Row]) -> list[str]:
        return await asyncio.to_thread(self._generate, rows)

    def _generate(self, rows: list[_Row]) -> list[str]:
        prefix = self.task.get("prefix", "")
        inputs = self.tokenizer([prefix + r.text for r in rows], max_length=self.task.get("max_source_length", 512),
                                truncation=True, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with self._lock:
            for adapter_id in {r.adapter_id for r in rows}:
                self._ensure_loaded(adapter_id)  # evicted between routing and generation
            # no_grad, not inference_mode: inference tensors would break PEFT's later
            # set_adapter/delete_adapter, which touch requires_grad.
            with torch.no_grad():
                out = self.model.generate(
                    **inputs,
                    adapter_names=[r.adapter_id for r in rows],
                    max_new_tokens=max(r.max_new_tokens for r in rows),
                    do_sample=False,
                    num_beams=1,
                )
        # out[:, 0] is the decoder start token; cut each row at its own token budget.
        return [
            self.tokenizer.decode(out[i, 1 : 1 + r.max_new_tokens], skip_special_tokens=True).strip()
            for i, r in enumerate(rows)
        ]

    def _load(self, adapter_id: str) -> None:
        with self._lock:
            self._ensure_loaded(adapter_id)

    def _ensure_loaded(self, adapter_id: str) -> None:
        path = str(self.registry.adapter_dir(adapter_id))  # only registered ids, safetensors only
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=adapter_id)
            self.model.eval()
        elif adapter_id not in self.model.peft_config:
            self.model.load_adapter(path, adapter_name=adapter_id)
            self.model.eval()

    def _unload(self, adapter_id: str) -> None:
        with self._lock:
            if isinstance(self.model, PeftModel) and adapter_id in self.model.peft_config:
                self.model.delete_adapter(adapter_id)
