"""The adapter registry: `<root>/<adapter-id>/` PEFT files plus `<root>/index.json`.

index.json: {"default": id, "base_model": ..., "base_metrics": {...}, "metric": ..., "mode": ...,
"task": {"prefix", "max_source_length", "max_target_length"},
"adapters": [{"id", "metrics", "hyperparameters", "base_model", "created", "sweep", "trial_id", "step"}]}
It accumulates across sweeps; the default is the best adapter overall by the metric.
Adapter ids are checked against a strict pattern and the index, so a request's id never
becomes a path of its choosing.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

INDEX = "index.json"
# Files an adapter directory may hold: safetensors weights only, never pickles.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "qlora_ray.json")
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")


class RegistryError(ValueError):
    pass


class UnknownAdapter(RegistryError):
    pass


def check_adapter_id(adapter_id: object) -> str:
    if not isinstance(adapter_id, str) or not _ID.fullmatch(adapter_id):
        raise RegistryError(
            "adapter id must be 1-128 characters of lowercase letters, digits, '-' or '_', "
            f"starting with a letter or digit; got {adapter_id!r}"
        )
    return adapter_id


def make_adapter_id(sweep: str, trial_id: str) -> str:
    return check_adapter_id(re.sub(r"[^a-z0-9_-]+", "-", f"{sweep}-{trial_id}".lower()).strip("-_")[:128])


@dataclass
class Candidate:
    """A trial's best adapter, about to be published."""

    adapter_id: str
    source_dir: Path
    metrics: dict
    hyperparameters: dict
    trial_id: str
    step: int


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def read(self) -> dict:
        path = self.root / INDEX
        if not path.is_file():
            return {"default": None, "base_model": None, "base_metrics": {}, "adapters": []}
        return json.loads(path.read_text())

    def adapter(self, adapter_id: str) -> dict:
        check_adapter_id(adapter_id)
        for entry in self.read()["adapters"]:
            if entry["id"] == adapter_id:
                return entry
        raise UnknownAdapter(f"unknown adapter {adapter_id!r}")

    def adapter_dir(self, adapter_id: str) -> Path:
        """The directory of a registered adapter; only ids listed in the index resolve."""
        self.adapter(adapter_id)
        path = (self.root / adapter_id).resolve()
        if path.parent != self.root or not (path / "adapter_model.safetensors").is_file():
            raise RegistryError(f"adapter {adapter_id!r} has no safetensors weights in {self.root}")
        return path

    def check_base(self, base_model: str) -> None:
        current = self.read().get("base_model")
        if current and current != base_model:
            raise RegistryError(
                f"the registry at {self.root} serves base model {current!r}, not {base_model!r}; "
                "use another --output-dir for another base model"
            )

    def publish(self, candidates: list[Candidate], *, base_model: str, base_metrics: dict, task: dict,
                metric: str, mode: str, sweep: str) -> list[str]:
        """Copy adapters in and rewrite the index (atomically, under a lock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self.check_base(base_model)
            index = self.read()
            known = {a["id"] for a in index["adapters"]}
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            published = []
            for c in candidates:
                if c.adapter_id in known:
                    continue
                target = self.root / check_adapter_id(c.adapter_id)
                staging = self.root / f".{c.adapter_id}.tmp"
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
                for name in ADAPTER_FILES:
                    if (c.source_dir / name).is_file():
                        shutil.copy2(c.source_dir / name, staging / name)
                if not (staging / "adapter_model.safetensors").is_file():
                    shutil.rmtree(staging)
                    raise RegistryError(f"trial {c.trial_id}: checkpoint has no adapter_model.safetensors")
                os.replace(staging, target)
                index["adapters"].append({
                    "id": c.adapter_id, "metrics": c.metrics, "hyperparameters": c.hyperparameters,
                    "base_model": base_model, "created": created, "sweep": sweep, "trial_id": c.trial_id,
                    "step": c.step,
                })
                published.append(c.adapter_id)
            index.update(base_model=base_model, base_metrics=base_metrics, task=task, metric=metric, mode=mode)
            index["adapters"].sort(key=lambda a: _rank_key(a, metric, mode))
            index["default"] = index["adapters"][0]["id"] if index["adapters"] else None
            tmp = self.root / f".{INDEX}.tmp"
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            os.replace(tmp, self.root / INDEX)
        return published

    @contextmanager
    def _lock(self):
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _rank_key(entry: dict, metric: str, mode: str) -> tuple:
    value = entry.get("metrics", {}).get(metric)
    if value is None:
        return (1, 0.0)
    return (0, -value if mode == "max" else value)
