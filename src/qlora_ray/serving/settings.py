"""Serving settings: Serve config-file `args` override environment variables, which override defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

ENV_PREFIX = "QLORA_RAY_"


@dataclass
class ServeSettings:
    # One registry directory, or several separated by commas (a list in a Serve config file):
    # each has its own base model and model deployment, all behind one API.
    registry: str = "./runs/registry"
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: 1 per replica when the cluster has GPUs, else 0
    # Adapters resident per replica beside the base (LRU; the registry's default is pinned
    # on top of this). Serve routes an adapter's requests to replicas that hold it.
    max_adapters_per_replica: int = 8
    max_adapter_bytes: int = 2 * 1024**3  # an adapter's safetensors file; bigger ones are rejected
    # The batching engine: rows (prompt x choice) decoded together in one step; new rows
    # join between steps.
    max_batch_size: int = 16
    max_queued_requests: int = 256  # per replica, waiting for a row slot; beyond this: 503
    base_weights: str = "4bit"  # "4bit" (NF4, the trained base) or "bf16" (dequantized once: faster, 4x memory)
    cuda_graphs: bool = True  # capture the decode step (GPU only)
    # A request's output is the same bit for bit whatever else is in its batch: every step and
    # encoder call has one shape (computes max_batch_size rows even when fewer are active).
    batch_invariant: bool = True
    default_max_new_tokens: int = 64
    max_new_tokens_limit: int = 256
    max_text_chars: int = 20_000  # per text; the model truncates to its own source length
    max_texts: int = 32  # per request
    max_body_bytes: int = 1024**2  # a request body; checked before it is parsed
    request_timeout_s: float = 120.0
    # Browser protection: requests whose Host is not one of these get 400 (DNS rebinding),
    # requests with an Origin header not listed get 403. "*" allows any.
    allowed_hosts: str = "localhost,127.0.0.1,[::1]"
    allowed_origins: str = ""
    show_paths: bool = False  # listings show local filesystem paths (else only their last part)
    registry_poll_s: float = 2.0  # how often replicas look for registry changes

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
        if isinstance(values.get("registry"), list | tuple):
            values["registry"] = ",".join(str(r) for r in values["registry"])
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        settings = cls(**{k: _coerce(k, v, types[k]) for k, v in values.items()})
        settings.validate()
        return settings

    def registries(self) -> list[str]:
        return [r.strip() for r in self.registry.split(",") if r.strip()]

    def validate(self) -> None:
        if not self.registries():
            raise ValueError("serve setting registry needs at least one directory")
        if len(set(self.registries())) != len(self.registries()):
            raise ValueError(f"serve setting registry names a directory twice: {self.registry!r}")
        for name in ("num_replicas", "max_adapters_per_replica", "max_batch_size", "max_queued_requests",
                     "default_max_new_tokens", "max_new_tokens_limit", "max_text_chars", "max_texts",
                     "max_body_bytes", "max_adapter_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"serve setting {name} must be positive, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"serve setting request_timeout_s must be positive, got {self.request_timeout_s}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError("serve setting default_max_new_tokens must be between 1 and max_new_tokens_limit")
        if self.base_weights not in ("4bit", "bf16"):
            raise ValueError(f"serve setting base_weights must be 4bit or bf16, got {self.base_weights!r}")


def _coerce(name: str, value, type_name: str):
    if value is None or value == "auto":
        if "None" in type_name:
            return None
        raise ValueError(f"serve setting {name} needs a value")
    try:
        if type_name.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if type_name.startswith("int"):
            return int(value)
        if type_name.startswith("float"):
            return float(value)
        return str(value)
    except ValueError:
        raise ValueError(f"serve setting {name}: cannot read {value!r} as {type_name}") from None
