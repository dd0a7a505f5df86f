"""Serving settings: Serve config-file `args` override environment variables, which override defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

ENV_PREFIX = "QLORA_RAY_"


@dataclass
class ServeSettings:
    registry: str = "./runs/registry"
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: 1 per replica when the cluster has GPUs, else 0
    max_adapters_per_replica: int = 4  # LRU-bounded adapters held beside the base
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    default_max_new_tokens: int = 64
    max_new_tokens_limit: int = 256
    max_text_chars: int = 20_000  # per text; the model truncates to its own source length
    max_texts: int = 32  # per request

    @classmethod
    def load(cls, args: dict | None = None) -> ServeSettings:
        """Values from QLORA_RAY_<FIELD> (e.g. QLORA_RAY_REGISTRY), then from `args`."""
        values: dict = {}
        for f in dataclasses.fields(cls):
            env = os.environ.get(ENV_PREFIX + f.name.upper())
            if env is not None:
                values[f.name] = env
        unknown = set(args or {}) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown serve setting(s): {sorted(unknown)}")
        values.update(args or {})
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: _coerce(k, v, types[k]) for k, v in values.items()})


def _coerce(name: str, value, type_name: str):
    if value is None or value == "auto":
        if "None" in type_name:
            return None
        raise ValueError(f"serve setting {name} needs a value")
    try:
        if type_name.startswith("int"):
            return int(value)
        if type_name.startswith("float"):
            return float(value)
        return str(value)
    except ValueError:
        raise ValueError(f"serve setting {name}: cannot read {value!r} as {type_name}") from None
