"""The ingress's view of the registry: what can be served, under which model ids, and whether
each adapter passes validation.

index.json is re-read whenever its (mtime, size, inode) changes, so `qlora-ray promote`,
`remove` and `import` show within the next request, without a restart. An adapter's check
(adapter_check.check_adapter against the base's config) is cached by the (mtime, size) of its
files, so listings stay cheap and a replaced adapter is checked again.
"""

from __future__ import annotations

import calendar
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_ray.adapter_check import AdapterInvalid, BaseSpec, check_adapter
from qlora_ray.registry import ADAPTER_FILES, INDEX, Registry, RegistryError

logger = logging.getLogger("ray.serve")

EMPTY_INDEX = {"default": None, "base_model": None, "base_metrics": {}, "adapters": []}
READY, REJECTED = "ready", "rejected"


def base_model_id(base_model: str | None) -> str | None:
    """The base's model id: the last component of a local path, or the hub id as it is."""
    if not base_model:
        return None
    text = str(base_model).rstrip("/\\")
    local = text.startswith(("/", "~", ".")) or os.path.isabs(text) or os.path.exists(text)
    return Path(text).name if local else text


def parse_created(value: object, fallback: int) -> int:
    """Unix seconds from the registry's "%Y-%m-%dT%H:%M:%SZ" timestamps."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        try:
            return calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            pass
    return fallback


@dataclass(frozen=True)
class Model:
    """A servable model id: the bare base (adapter None) or a registered adapter."""

    id: str
    adapter: str | None
    created: int
    entry: dict | None
    parent: str | None = None  # an adapter's base model id
    registry: int = 0  # which of the served registries (Catalogs) holds it


class Catalog:
    def __init__(self, root: str | Path, *, max_adapter_bytes: int):
        self.registry = Registry(root)
        self.max_adapter_bytes = max_adapter_bytes
        self._lock = threading.Lock()  # used from the event loop and from worker threads
        self._stamp: tuple | None = None
        self._index: dict = dict(EMPTY_INDEX)
        self._index_mtime = 0
        self._base: tuple[str, BaseSpec | None] | None = None  # (base_model, spec or None if unreadable)
        self._checks: dict[str, tuple[tuple, tuple[str, str | None]]] = {}

    # ---- the index ----

    def index(self) -> dict:
        path = self.registry.root / INDEX
        try:
            st = path.stat()
        except OSError:
            with self._lock:
                self._stamp, self._index = None, dict(EMPTY_INDEX)
            return self._index
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp == self._stamp:
                return self._index
        try:
            index = self.registry.read()
            if not isinstance(index, dict) or not isinstance(index.get("adapters", []), list):
                raise ValueError("index.json is not a registry index")
        except (OSError, ValueError) as e:  # mid-write, or damaged: keep serving the last good one
            logger.warning("cannot read the registry index %s: %s", path, e)
            return self._index
        index = dict(EMPTY_INDEX) | index
        index["adapters"] = [a for a in index["adapters"] if isinstance(a, dict) and isinstance(a.get("id"), str)]
        with self._lock:
            self._stamp, self._index, self._index_mtime = stamp, index, int(st.st_mtime)
            listed = {a["id"] for a in index["adapters"]}
            self._checks = {k: v for k, v in self._checks.items() if k in listed}
        return index

    def base_id(self, index: dict | None = None) -> str | None:
        return base_model_id((index or self.index()).get("base_model"))

    def default_id(self) -> str | None:
        return self.index().get("default")

    def entry(self, adapter_id: str) -> dict | None:
        return next((a for a in self.index()["adapters"] if a["id"] == adapter_id), None)

    def models(self) -> list[Model]:
        """The base (when the registry has one), then every adapter, in registry order."""
        index = self.index()
        fallback = self._index_mtime
        base = self.base_id(index)
        adapters = [Model(a["id"], a["id"], parse_created(a.get("created"), fallback), a, base)
                    for a in index["adapters"]]
        if base is None:
            return adapters
        created = min((m.created for m in adapters), default=fallback)
        return [Model(base, None, created, None), *(m for m in adapters if m.id != base)]

    def model(self, model_id: str) -> Model | None:
        return next((m for m in self.models() if m.id == model_id), None)

    # ---- adapter checks ----

    def adapter_status(self, adapter_id: str) -> tuple[str, str | None]:
        """("ready", None) or ("rejected", reason) for a registered adapter."""
        index = self.index()
        directory = self.registry.root / adapter_id
        key = (index.get("base_model"), *(_file_key(directory / name) for name in ADAPTER_FILES))
        with self._lock:
            cached = self._checks.get(adapter_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        spec = self._base_spec(index)
        if spec is None:  # the base's config cannot be read here: the replica checks on load
            result: tuple[str, str | None] = (READY, None)
        else:
            try:
                check_adapter(directory, spec, max_bytes=self.max_adapter_bytes)
                result = (READY, None)
            except AdapterInvalid as e:
                result = (REJECTED, str(e))
            except (OSError, ValueError) as e:
                result = (REJECTED, f"cannot be checked: {type(e).__name__}: {e}")
        with self._lock:
            self._checks[adapter_id] = (key, result)
        return result

    def _base_spec(self, index: dict) -> BaseSpec | None:
        base_model = index.get("base_model")
        if not base_model:
            return None
        with self._lock:
            if self._base is not None and self._base[0] == base_model:
                return self._base[1]
        try:
            spec: BaseSpec | None = self.registry.base_spec(index)
        except (RegistryError, OSError, ValueError) as e:
            logger.warning("adapters are not checked at the ingress: %s", e)
            spec = None
        with self._lock:
            self._base = (base_model, spec)
        return spec


class Catalogs:
    """Several registries served side by side (e.g. a T5 base and a causal base), each by its own
    model deployment. Model ids are looked up in registry order: an id that two registries share
    (or an adapter named like another registry's base) is served from the first."""

    def __init__(self, roots: list[str], *, max_adapter_bytes: int):
        self.catalogs = [Catalog(root, max_adapter_bytes=max_adapter_bytes) for root in roots]

    def models(self) -> list[Model]:
        seen: set[str] = set()
        out = []
        for i, catalog in enumerate(self.catalogs):
            for m in catalog.models():
                if m.id not in seen:
                    seen.add(m.id)
                    out.append(dataclasses.replace(m, registry=i))
        return out

    def model(self, model_id: str) -> Model | None:
        for i, catalog in enumerate(self.catalogs):
            found = catalog.model(model_id)
            if found is not None:
                return dataclasses.replace(found, registry=i)
        return None

    def owner(self, adapter_id: str) -> int | None:
        """The registry that serves this adapter id, or None."""
        return next((i for i, c in enumerate(self.catalogs) if c.entry(adapter_id) is not None), None)

    def entry(self, adapter_id: str) -> dict | None:
        owner = self.owner(adapter_id)
        return None if owner is None else self.catalogs[owner].entry(adapter_id)

    def default(self) -> tuple[str | None, int]:
        """The native API's default adapter: the first registry's default that is set."""
        for i, catalog in enumerate(self.catalogs):
            default = catalog.default_id()
            if default is not None:
                return default, i
        return None, 0

    def adapter_status(self, adapter_id: str) -> tuple[str, str | None]:
        owner = self.owner(adapter_id)
        if owner is None:
            return REJECTED, "not registered"
        return self.catalogs[owner].adapter_status(adapter_id)


def _file_key(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
