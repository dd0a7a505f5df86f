"""Which adapters a replica holds, in which LoRA slot: validated loads, pinning, eviction.

An adapter is checked (adapter_check: config against weights, target modules against the
base, size, safetensors only) and its tensors are read and moved to the device off the
engine thread; only then does the engine copy them into a free slot between two steps.
Nothing is registered before it is complete, so a failed load leaves nothing behind: the
adapter is recorded as rejected with its reason, and the other adapters keep answering.

Eviction is decided by Serve's multiplexer (LRU over `max_adapters_per_replica`) and by
registry changes; the registry's default is pinned. An adapter with rows in flight is
freed when its last row ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_ray.adapter_check import AdapterInvalid, BaseSpec, check_adapter
from qlora_ray.registry import Registry, RegistryError
from qlora_ray.serving.engine import Engine
from qlora_ray.serving.multi_lora import MultiLoraLinear, wrap

logger = logging.getLogger("ray.serve")

SERVED_SAVED_MODULES = {"lm_head"}  # modules_to_save the engine applies per row


class AdapterRejected(Exception):
    pass


@dataclass
class Resident:
    slot: int
    signature: tuple  # (mtime_ns, size) of the weights file when loaded
    refs: int = 0
    evict_when_idle: bool = False


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on `device`: one read into (pinned) memory and one copy to
    the device, not one per tensor (an adapter has hundreds of small ones). Raises
    AdapterInvalid if the file is not what its header says (check_adapter checked it, but it
    may have changed since)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header_bytes = f.read(length)
        body = torch.empty(max(0, size - 8 - length), dtype=torch.uint8, pin_memory=device.type == "cuda")
        got = f.readinto(body.numpy())
    try:
        if got != body.numel():
            raise ValueError("the file changed while it was read")
        header = json.loads(header_bytes)
        body = body.to(device, non_blocking=True)
        tensors = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = _DTYPES[info["dtype"]]
            chunk = body[start:end]
            if start % dtype.itemsize:
                chunk = chunk.clone()  # unaligned
            tensors[key] = chunk.view(dtype).view(info["shape"])
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) == 1 and body.numel() % next(iter(dtypes)).itemsize == 0:
            finite = bool(torch.isfinite(body.view(next(iter(dtypes)))).all())  # one pass over the file
        else:
            finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all())
    except Exception as e:
        raise AdapterInvalid(f"cannot read {path.name}: {type(e).__name__}: {e}") from None
    if not finite:
        bad = next(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
        raise AdapterInvalid(f"weights contain NaN or infinity: {bad}")
    return tensors


def signature(directory: Path) -> tuple:
    stat = (directory / "adapter_model.safetensors").stat()
    return (stat.st_mtime_ns, stat.st_size)


class AdapterStore:
    def __init__(self, engine: Engine, base: BaseSpec, registry: Registry, *, base_model: str, max_bytes: int,
                 load_settings: dict, metrics=None):
        self.engine, self.base, self.registry = engine, base, registry
        self.base_model, self.max_bytes, self.load_settings = base_model, max_bytes, load_settings
        self.metrics = metrics
        self.wrappers: dict[str, MultiLoraLinear] = {}
        self.resident: dict[str, Resident] = {}
        self.free_slots = list(range(engine.ctx.capacity - 1, 0, -1))  # slot 0 is the bare base
        self.rejected: dict[str, tuple[tuple, str]] = {}  # id -> (file signature, reason)
        self.loads: list[dict] = []  # recent cold loads: {"adapter", "ms"}
        self.pinned: str | None = None
        # Loads run in worker threads and the multiplexer evicts from one: plain thread locks.
        self.cond = threading.Condition()
        self.loading: dict[str, threading.Lock] = {}

    # ---- residency ----

    async def acquire(self, adapter_id: str) -> int:
        """The adapter's slot, loading it if needed; the caller must `release` it."""
        while True:
            with self.cond:
                entry = self.resident.get(adapter_id)
                if entry is not None and not entry.evict_when_idle:
                    entry.refs += 1
                    return entry.slot
            await self.load(adapter_id)

    def release(self, adapter_id: str) -> None:
        with self.cond:
            entry = self.resident.get(adapter_id)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs <= 0 and entry.evict_when_idle:
                self._free(adapter_id)

    def evict(self, adapter_id: str, *, force: bool = False) -> None:
        """Drop an adapter (now, or when its last row ends); the pinned one only when forced."""
        with self.cond:
            entry = self.resident.get(adapter_id)
            if entry is None or (adapter_id == self.pinned and not force):
                return
            if entry.refs > 0:
                entry.evict_when_idle = True
            else:
                self._free(adapter_id)

    def _free(self, adapter_id: str) -> None:  # under self.cond
        entry = self.resident.pop(adapter_id)
        wrappers, heads = list(self.wrappers.values()), self.engine.heads

        def clear():
            for w in wrappers:
                w.clear_slot(entry.slot)
            heads.pop(entry.slot, None)

        self.engine.call(clear).add_done_callback(lambda _: self._slot_returned(entry.slot))
        if self.metrics:
            self.metrics.evictions.inc(tags={"adapter": adapter_id})

    def _slot_returned(self, slot: int) -> None:
        with self.cond:
            self.free_slots.append(slot)
            self.cond.notify_all()

    # ---- loading ----

    async def load(self, adapter_id: str) -> None:
        await asyncio.to_thread(self.load_blocking, adapter_id)

    def load_blocking(self, adapter_id: str, *, startup: bool = False) -> None:
        """Make the adapter resident; raises AdapterRejected with the reason."""
        with self.cond:
            lock = self.loading.setdefault(adapter_id, threading.Lock())
        with lock:  # one load per adapter at a time; later callers find it resident
            with self.cond:
                entry = self.resident.get(adapter_id)
                if entry is not None:
                    entry.evict_when_idle = False  # wanted again before its last row ended
                    return
            try:
                directory = self.registry.adapter_dir(adapter_id)
                sig = signature(directory)
            except (RegistryError, OSError) as e:
                raise AdapterRejected(str(e)) from None
            known = self.rejected.get(adapter_id)
            if known and known[0] == sig:
                raise AdapterRejected(known[1])
            start = time.perf_counter()
            try:
                weights = self._read(adapter_id, directory)
                read_ms = (time.perf_counter() - start) * 1000
            except AdapterInvalid as e:
                self.rejected[adapter_id] = (sig, str(e))
                logger.warning("adapter %s rejected: %s", adapter_id, e)
                if self.metrics:
                    self.metrics.rejections.inc(tags={"adapter": adapter_id})
                raise AdapterRejected(str(e)) from None
            self.rejected.pop(adapter_id, None)
            with self.cond:
                while not self.free_slots:  # every slot has rows in flight: wait for one to end
                    self.cond.wait()
                slot = self.free_slots.pop()
            try:
                self.engine.call(lambda: self._install(slot, weights)).result()
            except BaseException:
                self._slot_returned(slot)
                raise
            with self.cond:
                self.resident[adapter_id] = Resident(slot, sig)
            ms = (time.perf_counter() - start) * 1000
            load = {"adapter": adapter_id, "ms": round(ms, 2), "read_ms": round(read_ms, 2)}
            self.loads = [*self.loads[-255:], load | ({"startup": True} if startup else {})]
            if self.metrics:
                self.metrics.loads.inc(tags={"adapter": adapter_id})
                self.metrics.load_ms.observe(ms, tags={"adapter": adapter_id})
            logger.info("adapter %s loaded into slot %d in %.1f ms", adapter_id, slot, ms)

    def _read(self, adapter_id: str, directory: Path) -> dict:
        """Check and read an adapter; every failure is an AdapterInvalid with its reason."""
        entry = self.registry.adapter(adapter_id)
        if entry.get("base_model") and entry["base_model"] != self.base_model:
            raise AdapterInvalid(f"trained on base model {entry['base_model']!r}, this replica serves "
                                 f"{self.base_model!r}")
        load = entry.get("load") or {}
        for key in ("quant_type", "double_quant"):
            if key in load and load[key] != self.load_settings.get(key):
                raise AdapterInvalid(f"trained with {key}={load[key]!r}, the served base has "
                                     f"{key}={self.load_settings.get(key)!r}")
        checked = check_adapter(directory, self.base, max_bytes=self.max_bytes)
        unsupported = set(checked.saved_modules) - SERVED_SAVED_MODULES
        if unsupported:
            raise AdapterInvalid(f"saves full copies of {sorted(unsupported)}; only {sorted(SERVED_SAVED_MODULES)} "
                                 "can be served per request")
        device, dtype = self.engine.device, self.engine.ctx.dtype
        tensors = read_safetensors(directory / "adapter_model.safetensors", device)
        modules = {path: (tensors[m.a_key].to(dtype), tensors[m.b_key].to(dtype), float(m.scaling))
                   for path, m in checked.modules.items()}
        head = None
        if "lm_head" in checked.saved_modules:
            head = tensors[checked.saved_modules["lm_head"]].to(self.engine.model.lm_head.weight.dtype)
        return {"modules": modules, "head": head}

    def _install(self, slot: int, weights: dict) -> None:
        """On the engine thread: wrap newly targeted layers, copy the weights into the slot."""
        self.wrappers = wrap(self.engine.model, list(weights["modules"]), self.engine.ctx)
        for path, (a, b, scale) in weights["modules"].items():
            self.wrappers[path].set_slot(slot, a, b, scale)
        if weights["head"] is not None:
            self.engine.heads[slot] = weights["head"]

    def reserve(self, ranks: dict[str, int]) -> None:
        """On the engine thread: wrap layers and size ranks for adapters expected later, so
        their loads need no reallocation (and captured CUDA graphs stay valid)."""
        self.wrappers = wrap(self.engine.model, list(ranks), self.engine.ctx)
        for path, rank in ranks.items():
            self.wrappers[path].reserve_rank(rank)

    def changed_on_disk(self, adapter_id: str) -> bool:
        entry = self.resident.get(adapter_id)
        try:
            return entry is not None and signature(self.registry.root / adapter_id) != entry.signature
        except OSError:
            return True

    def status(self) -> dict:
        with self.cond:
            resident = sorted(self.resident)
        return {"resident": resident, "pinned": self.pinned,
                "rejected": {k: v[1] for k, v in self.rejected.items()}, "loads": list(self.loads)}
