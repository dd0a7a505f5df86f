"""The adapter registry: `<root>/<adapter-id>/` PEFT files plus `<root>/index.json`.

index.json: {"default": id, "pinned_default": bool, "base_model": ..., "base_metrics": {...},
"metric": ..., "mode": ..., "load": {...}, "task": {...},
"adapters": [{"id", "metrics", "hyperparameters", "base_model", "created", "load", "task",
              "sweep", "trial_id", "step"}  (a sweep's adapter)
             {"id", "metrics": {}, "hyperparameters", "base_model", "created", "load", "task",
              "source": "import", "imported_from"}  (an imported one)]}

Each entry carries the settings it was made with: "load" (how the base is quantized and
loaded: quant_type, double_quant, compute_dtype, trust_remote_code) and "task" (prefix,
max_source_length, max_target_length and "generation", the decoding settings it was
evaluated with). `entry_load` / `entry_task` read them, falling back for entries written
before they existed. The index-level "load" and "task" are the latest sweep's.

It accumulates across sweeps; the default is the best adapter overall by the metric, unless
one was promoted (`promote`, "pinned_default": true): later sweeps then leave the default
alone until it is removed or another is promoted.
Adapter ids are checked against a strict pattern and the index, so a request's id never
becomes a path of its choosing. Every index write is atomic (a temporary file and
os.replace) and under a file lock, so a server re-reading index.json never sees half a file,
and an adapter directory is complete before the index names it.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import json
import math
import os
import re
import shutil
import stat
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qlora_ray import eval_set, faults
from qlora_ray.adapter_check import CONFIG_FILE, WEIGHTS_FILE, AdapterInvalid, BaseSpec, check_adapter
from qlora_ray.config import DataSettings, ModelSettings, TrainSettings

INDEX = "index.json"
# Files an adapter directory may hold: safetensors weights only, never pickles.
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, "qlora_ray.json")
# What an import copies: the adapter itself, nothing else from a foreign directory.
IMPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
DEFAULT_MAX_BYTES = 2 * 1024**3
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")
LOAD_KEYS = ("quant_type", "double_quant", "compute_dtype", "trust_remote_code")
# The DataSettings an adapter was trained with that serving formats prompts by (tasks.causal.prompt_ids and
# chat_prompt_ids take the entry's "task" dict holding them).
TASK_KEYS = ("prefix", "max_source_length", "max_target_length", "prompt_template", "format", "chat_template")
# generation_config.json values that change what generate() decodes (token ids aside).
DECODING_KEYS = (
    "do_sample", "temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "length_penalty", "exponential_decay_length_penalty", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "min_length", "min_new_tokens", "bad_words_ids", "suppress_tokens",
    "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "renormalize_logits",
)


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


# --- per-entry settings -------------------------------------------------------------------


def load_settings(model: ModelSettings) -> dict:
    """An entry's "load": how its base model is quantized and loaded."""
    return {k: getattr(model, k) for k in LOAD_KEYS}


def task_settings(data: DataSettings, *, num_beams: int, base_model: str | None) -> dict:
    """An entry's "task": its input prefix and lengths, and the generation settings it was evaluated with
    (the base's generation_config.json decoding values, then the trainer's num_beams)."""
    generation = base_generation_defaults(base_model) | {"num_beams": int(num_beams)}
    return {k: getattr(data, k) for k in TASK_KEYS} | {"generation": generation}


@functools.lru_cache(maxsize=64)
def _generation_file(base_model: str) -> dict:
    path = Path(base_model).expanduser()
    candidate: str | Path | None = path / "generation_config.json" if path.is_dir() else None
    if candidate is None and not path.is_absolute() and base_model.count("/") <= 1:
        try:  # a hub id: the copy in the local cache, never the network
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(base_model, "generation_config.json")
            candidate = found if isinstance(found, str) else None
        except Exception:  # no hub cache, an odd id: no defaults to read
            candidate = None
    if candidate is None or not Path(candidate).is_file():
        return {}
    try:
        data = json.loads(Path(candidate).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def base_generation_defaults(base_model: str | None) -> dict:
    """The decoding settings in the base's generation_config.json (local directory or hub cache), if any."""
    if not base_model:
        return {}
    data = _generation_file(str(base_model))
    return {k: copy.deepcopy(data[k]) for k in DECODING_KEYS if k in data}


def entry_load(index: dict, entry: dict) -> dict:
    """The entry's load settings; entries from before per-entry settings get the index's or the defaults."""
    defaults = load_settings(ModelSettings())
    merged = defaults | _known(index.get("load"), LOAD_KEYS) | _known(entry.get("load"), LOAD_KEYS)
    return merged


def entry_task(index: dict, entry: dict) -> dict:
    """The entry's task settings (prefix, lengths, "generation"); entries from before per-entry settings
    fall back to the index-level task, then the defaults, with the base's generation defaults and
    num_beams 1 (what they were evaluated with)."""
    d = DataSettings()
    index_task = index.get("task") if isinstance(index.get("task"), dict) else {}
    own = entry.get("task") if isinstance(entry.get("task"), dict) else {}
    task = {k: getattr(d, k) for k in TASK_KEYS} | _known(index_task, TASK_KEYS) | _known(own, TASK_KEYS)
    for source in (own, index_task):
        if isinstance(source.get("generation"), dict):
            task["generation"] = copy.deepcopy(source["generation"])
            break
    else:
        task["generation"] = base_generation_defaults(entry.get("base_model") or index.get("base_model")) | {
            "num_beams": TrainSettings.num_beams}
    return task


def _known(section: object, keys: tuple[str, ...]) -> dict:
    if not isinstance(section, dict):
        return {}
    return {k: copy.deepcopy(section[k]) for k in keys if k in section}


# --- the registry -------------------------------------------------------------------------


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

    def exists(self) -> bool:
        return (self.root / INDEX).is_file()

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
        if path.parent != self.root or not (path / WEIGHTS_FILE).is_file():
            raise RegistryError(f"adapter {adapter_id!r} has no safetensors weights in {self.root}")
        return path

    def check_base(self, base_model: str) -> None:
        current = self.read().get("base_model")
        if current and current != base_model:
            raise RegistryError(
                f"the registry at {self.root} serves base model {current!r}, not {base_model!r}; "
                "use another --output-dir for another base model"
            )

    def base_spec(self, index: dict | None = None) -> BaseSpec:
        """The registry's base model, from its config (no weights read)."""
        index = self.read() if index is None else index
        if not index.get("base_model"):
            raise RegistryError(f"the registry at {self.root} has no base model yet: run a sweep into it first")
        try:
            remote_code = entry_load(index, {})["trust_remote_code"]
            return BaseSpec.from_config(index["base_model"], trust_remote_code=remote_code)
        except ValueError as e:
            raise RegistryError(str(e)) from None

    def publish(self, candidates: list[Candidate], *, base_model: str, base_metrics: dict, task: dict,
                metric: str, mode: str, sweep: str, load: dict | None = None) -> list[str]:
        """Copy adapters in and rewrite the index (atomically, under a lock).

        `task` and `load` are recorded on every new entry (and as the index-level settings);
        `load` defaults to the default ModelSettings. The default becomes the best adapter
        overall by the metric, unless one was promoted and is still registered.
        """
        load = load_settings(ModelSettings()) | (load or {})
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self.check_base(base_model)
            index = self.read()
            known = {a["id"] for a in index["adapters"]}
            created = _now()
            published = []
            for c in candidates:
                if c.adapter_id in known:
                    continue
                target = self.root / check_adapter_id(c.adapter_id)
                staging = self._staging(c.adapter_id)
                try:
                    for name in ADAPTER_FILES:
                        if (c.source_dir / name).is_file():
                            shutil.copy2(c.source_dir / name, staging / name)
                    if not (staging / WEIGHTS_FILE).is_file():
                        raise RegistryError(f"trial {c.trial_id}: checkpoint has no {WEIGHTS_FILE}")
                    self._install(staging, target)
                    faults.exit_point("publish_installed")
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                index["adapters"].append({
                    "id": c.adapter_id, "metrics": finite_metrics(c.metrics), "hyperparameters": c.hyperparameters,
                    "base_model": base_model, "created": created, "load": dict(load), "task": copy.deepcopy(task),
                    "sweep": sweep, "trial_id": c.trial_id, "step": c.step,
                })
                known.add(c.adapter_id)
                published.append(c.adapter_id)
            index.update(base_model=base_model, base_metrics=finite_metrics(base_metrics), task=task, load=load,
                         metric=metric,
                         mode=mode)
            self._settle_default(index)
            self._write(index)
        return published

    def import_adapter(self, directory: str | Path, adapter_id: str, *, allow_base_mismatch: bool = False,
                       max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
        """Validate a PEFT LoRA adapter directory against the registry's base and add it under `adapter_id`.

        Copies only adapter_config.json and adapter_model.safetensors (symlinks are refused) and
        checks the copy again before the index names it. Raises RegistryError (bad or taken id,
        no registry, another base model) or AdapterInvalid (with the adapter's problem).
        Returns the new entry. An imported adapter has no metrics: it becomes the default only
        when there is no other (or by `promote`).
        """
        check_adapter_id(adapter_id)
        source = Path(directory)
        self._require()
        index = self.read()
        self._check_new_id(index, adapter_id)
        base = self.base_spec(index)
        checked = check_adapter(source, base, max_bytes=max_bytes)  # a clear reason before anything is copied
        self._check_base_name(checked.base_model_name, index["base_model"], allow_base_mismatch)
        with self._lock():
            index = self.read()
            if index.get("base_model") != base.name:
                raise RegistryError(f"the registry at {self.root} changed its base model during the import; retry")
            self._check_new_id(index, adapter_id)
            staging = self._staging(adapter_id)
            try:
                for name in IMPORT_FILES:
                    _copy_regular_file(source / name, staging / name, max_bytes)
                checked = check_adapter(staging, base, max_bytes=max_bytes)  # what is stored is what was checked
                self._check_base_name(checked.base_model_name, index["base_model"], allow_base_mismatch)
                self._install(staging, self.root / adapter_id)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            config = checked.config
            targets = config.get("target_modules")
            entry = {
                "id": adapter_id, "metrics": {},
                "hyperparameters": {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                                    "target_modules": sorted(targets) if isinstance(targets, list) else targets},
                "base_model": index["base_model"], "created": _now(), "source": "import",
                "imported_from": Path(os.path.abspath(source)).name,  # its name only, never a path
                "load": entry_load(index, {}), "task": entry_task(index, {}),  # the registry's, as it will be served
            }
            index["adapters"].append(entry)
            self._settle_default(index)
            self._write(index)
        return entry

    def promote(self, adapter_id: str) -> dict:
        """Make `adapter_id` the default and pin it: later sweeps' publish keeps it the default."""
        check_adapter_id(adapter_id)
        self._require()
        with self._lock():
            index = self.read()
            entry = next((a for a in index["adapters"] if a["id"] == adapter_id), None)
            if entry is None:
                raise UnknownAdapter(f"unknown adapter {adapter_id!r}")
            index["default"] = adapter_id
            index["pinned_default"] = True
            self._write(index)
        return entry

    def remove(self, adapter_id: str) -> str | None:
        """Drop an adapter and its directory; returns the default afterwards.

        Removing the default makes the best remaining adapter by the metric the default (None
        when none is left) and unpins it. The index is rewritten before the directory goes,
        so a reader never finds an entry without its files.
        """
        check_adapter_id(adapter_id)
        self._require()
        with self._lock():
            index = self.read()
            if not any(a["id"] == adapter_id for a in index["adapters"]):
                raise UnknownAdapter(f"unknown adapter {adapter_id!r}")
            index["adapters"] = [a for a in index["adapters"] if a["id"] != adapter_id]
            if index.get("default") == adapter_id:
                index["pinned_default"] = False
            self._settle_default(index)
            self._write(index)
            self._discard(self.root / adapter_id)
        return index["default"]

    # --- internals (callers hold the lock) ---

    def _require(self) -> None:
        if not self.exists():
            raise RegistryError(f"no registry at {self.root} (no {INDEX}): run a sweep into it first")

    def _check_new_id(self, index: dict, adapter_id: str) -> None:
        if any(a["id"] == adapter_id for a in index["adapters"]):
            raise RegistryError(f"adapter id {adapter_id!r} already exists in {self.root}; choose another --id "
                                "or remove it first")

    @staticmethod
    def _check_base_name(name: str | None, base_model: str, allow_mismatch: bool) -> None:
        if name and not allow_mismatch and not _same_base(name, base_model):
            raise RegistryError(
                f"the adapter was trained on {name!r}, but this registry serves {base_model!r}; "
                "pass --allow-base-mismatch (allow_base_mismatch=True) if it fits this base (shapes are still checked)"
            )

    def _settle_default(self, index: dict) -> None:
        metric, mode = index.get("metric") or "rougeL", index.get("mode") or "max"
        index["adapters"].sort(key=lambda a: _rank_key(a, metric, mode))
        ids = [a["id"] for a in index["adapters"]]
        if index.get("pinned_default") and index.get("default") in ids:
            return
        index["default"] = ids[0] if ids else None
        index["pinned_default"] = False

    def _staging(self, adapter_id: str) -> Path:
        staging = self.root / f".{adapter_id}.tmp"
        self._discard(staging)
        staging.mkdir()
        return staging

    def _install(self, staging: Path, target: Path) -> None:
        """Move a complete adapter directory into place. A directory already there belongs to no
        index entry (callers check): a crash between an earlier move and its index write left
        it, so it is replaced."""
        self._discard(target)
        os.replace(staging, target)

    def _discard(self, path: Path) -> None:
        if not os.path.lexists(path):
            return
        if path.is_symlink() or not path.is_dir():
            path.unlink()
            return
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        os.replace(path, trash)  # gone from its name at once, then deleted
        shutil.rmtree(trash, ignore_errors=True)

    def _write(self, index: dict) -> None:
        tmp = self.root / f".{INDEX}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(index, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / INDEX)

    @contextmanager
    def _lock(self):
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _copy_regular_file(source: Path, target: Path, max_bytes: int) -> None:
    """Copy a regular file without following a symlink, refusing more than max_bytes."""
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if os.path.islink(source):
            raise AdapterInvalid(f"{source.name} is a symlink; adapters must hold the real files") from None
        raise AdapterInvalid(f"cannot read {source.name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise AdapterInvalid(f"{source.name} is not a regular file")
        with open(target, "wb") as dst:
            copied = 0
            while chunk := src.read(1 << 20):
                copied += len(chunk)
                if copied > max_bytes:
                    raise AdapterInvalid(f"{source.name} grew over the limit of {max_bytes} bytes while copying")
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())


def _same_base(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def metric_rank_key(value, mode: str) -> tuple:
    """Sort key, best first; a missing, NaN or infinite value ranks after every real one."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return (1, 0.0)
    return (0, -value if mode == "max" else value)


def finite_metrics(metrics: dict) -> dict:
    """The metrics with NaN and infinities as None: JSON has no NaN (json.dumps would write a bare NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in (metrics or {}).items()}


def rank_key(metrics: dict, metric: str, mode: str) -> tuple:
    """Sort key of an adapter's (or a trial's) metrics, best first: scored on the whole eval set before scored
    on part of it (a growing eval set's early evaluation: other examples, and ASHA judged it the weaker),
    then by the metric."""
    return (eval_set.partial(metrics or {}), *metric_rank_key((metrics or {}).get(metric), mode))


def _rank_key(entry: dict, metric: str, mode: str) -> tuple:
    return rank_key(entry.get("metrics"), metric, mode)
