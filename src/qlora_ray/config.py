"""Typed sweep configuration: the one source of truth for defaults.

A sweep is configured by, in order of precedence: CLI flags, a `--config` YAML file,
a `--preset` YAML file (shipped in `qlora_ray/presets/`), and the dataclass defaults
below. YAML files mirror the dataclasses section by section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

EMBEDDED_MODEL = "embedded:tiny-t5"
EMBEDDED_DATASET = "embedded:stdlib-docstrings"
DEFAULT_PRESET = "tiny-t5-stdlib"
# Local data files by suffix -> the `datasets` loader that reads them.
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class ConfigError(ValueError):
    """A user-facing configuration problem: reported in one line, before Ray starts."""


@dataclass
class ModelSettings:
    # Hub id, local directory, or EMBEDDED_MODEL (built offline on first use).
    name: str = EMBEDDED_MODEL
    quant_type: str = "nf4"
    double_quant: bool = True
    # "auto": bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.
    compute_dtype: str = "auto"
    trust_remote_code: bool = False
    # Build `name`'s architecture with random weights instead of loading its weights: for
    # machines without hub access (timing, tests). A known hub id or a local config.json.
    random_init: bool = False


@dataclass
class DataSettings:
    # Hub id, a local .json/.jsonl/.csv/.parquet file, or EMBEDDED_DATASET.
    dataset: str = EMBEDDED_DATASET
    text_column: str = "text"
    summary_column: str = "summary"
    prefix: str = "summarize: "
    max_source_length: int = 256
    max_target_length: int = 32
    train_size: int | None = None  # cap on training examples; None = all
    eval_size: int = 128
    seed: int = 42


@dataclass
class LoraSettings:
    """LoRA settings that are not searched (r, alpha and targets are: see SearchSettings)."""

    dropout: float = 0.05
    bias: str = "none"
    modules_to_save: list[str] = field(default_factory=lambda: ["lm_head"])


@dataclass
class TrainSettings:
    max_steps: int = 240
    eval_every: int = 60  # steps between evaluations; each one is a Tune report
    batch_size: int = 8  # micro-batch per step; halved (accumulation doubled) if a trial runs out of memory
    gradient_accumulation_steps: int = 1  # effective batch = batch_size x this
    eval_batch_size: int = 32
    weight_decay: float = 0.01
    warmup_steps: int = 0
    # "auto": paged_adamw_8bit on GPU (the QLoRA recipe), adamw_torch on CPU.
    optim: str = "auto"
    # What backward recomputes instead of storing: "none", "feed-forward" (each FFN block:
    # most of T5's activation memory for little recompute) or "full" (every layer).
    gradient_checkpointing: str = "none"
    num_beams: int = 1
    seed: int = 42

    @property
    def num_evals(self) -> int:
        return max(1, self.max_steps // self.eval_every)


@dataclass
class SearchSettings:
    num_samples: int = 8
    metric: str = "rougeL"
    mode: str = "max"
    # A list is a categorical choice; a single value pins the parameter.
    r: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    lora_alpha: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    # [low, high] searched log-uniformly; [x] or [x, x] pins it.
    learning_rate: list[float] = field(default_factory=lambda: [3e-4, 5e-3])
    # Named module sets discovered from the architecture (see model.target_module_sets),
    # or explicit module names joined with "+", e.g. "v+o".
    target_modules: list[str] = field(default_factory=lambda: ["qv", "attention", "all-linear"])
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent_trials: int | None = None  # None: as many as the resources allow
    cpus_per_trial: int = 1
    gpus_per_trial: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_failures: int = 1  # retries of a crashed trial; others keep running either way
    top_k: int = 5  # adapters that go to the registry
    seed: int = 0


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    output_dir: str = "./runs"
    # Where Tune keeps results and checkpoints (see storage.py): a directory every node sees or a
    # pyarrow URI (s3://, gs://, file://). None: <output_dir>/tune.
    storage: str | None = None
    # MLflow tracking URI (e.g. sqlite:///runs/mlflow.db or http://host:5000): one run per trial.
    mlflow: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def registry_dir(self) -> Path:
        return Path(self.output_dir).resolve() / "registry"

    @property
    def tune_dir(self) -> Path:
        return Path(self.output_dir).resolve() / "tune"


SECTIONS = {
    "model": ModelSettings,
    "data": DataSettings,
    "lora": LoraSettings,
    "train": TrainSettings,
    "search": SearchSettings,
}


def available_presets() -> list[str]:
    files = resources.files("qlora_ray") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in files.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    if name not in available_presets():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    return Path(str(resources.files("qlora_ray") / "presets" / f"{name}.yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def merge(config: Config, overrides: dict[str, Any], source: str) -> Config:
    """Return `config` with the sections/keys in `overrides` replaced; unknown keys are errors."""
    updates: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in ("output_dir", "mlflow", "storage"):
            updates[key] = None if value is None else str(value)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be a mapping")
            section = getattr(config, key)
            known = {f.name for f in dataclasses.fields(section)}
            unknown = set(value) - known
            if unknown:
                raise ConfigError(
                    f"{source}: unknown key(s) {sorted(unknown)} in {key!r}; known: {sorted(known)}"
                )
            updates[key] = dataclasses.replace(section, **value)
        else:
            raise ConfigError(
                f"{source}: unknown section {key!r}; known: {sorted(SECTIONS)}, output_dir, storage and mlflow")
    return dataclasses.replace(config, **updates)


def load_config(
    preset: str | None = DEFAULT_PRESET, config_file: str | None = None, overrides: dict | None = None
) -> Config:
    config = Config()
    if preset:
        config = merge(config, read_yaml(preset_path(preset)), f"preset {preset}")
    if config_file:
        config = merge(config, read_yaml(config_file), str(config_file))
    if overrides:
        config = merge(config, overrides, "command line")
    validate(config)
    return config


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def validate(config: Config) -> None:
    """Checks that need no model or data; model- and data-dependent checks live with them."""
    s, t, d = config.search, config.train, config.data
    s.r = [int(v) for v in _as_list(s.r)]
    s.lora_alpha = [int(v) for v in _as_list(s.lora_alpha)]
    s.learning_rate = [float(v) for v in _as_list(s.learning_rate)]
    s.target_modules = [str(v) for v in _as_list(s.target_modules)]
    if not s.r or min(s.r) <= 0:
        raise ConfigError(f"LoRA r must be positive integers, got {s.r}")
    if not s.lora_alpha or min(s.lora_alpha) <= 0:
        raise ConfigError(f"lora_alpha must be positive integers, got {s.lora_alpha}")
    if len(s.learning_rate) not in (1, 2) or min(s.learning_rate) <= 0:
        raise ConfigError(f"learning_rate must be one positive value or a [low, high] range, got {s.learning_rate}")
    if len(s.learning_rate) == 2 and s.learning_rate[0] > s.learning_rate[1]:
        raise ConfigError(f"learning_rate range low > high: {s.learning_rate}")
    if not s.target_modules:
        raise ConfigError("target_modules needs at least one choice")
    if s.mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min' or 'max', got {s.mode!r}")
    if s.metric not in METRICS:
        raise ConfigError(f"unknown metric {s.metric!r}; choose from {', '.join(METRICS)}")
    for name, value in [
        ("num_samples", s.num_samples),
        ("top_k", s.top_k),
        ("cpus_per_trial", s.cpus_per_trial),
        ("max_steps", t.max_steps),
        ("eval_every", t.eval_every),
        ("batch_size", t.batch_size),
        ("gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("eval_batch_size", t.eval_batch_size),
        ("max_source_length", d.max_source_length),
        ("max_target_length", d.max_target_length),
        ("eval_size", d.eval_size),
    ]:
        if int(value) <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if t.eval_every > t.max_steps:
        raise ConfigError(f"eval_every ({t.eval_every}) must not exceed max_steps ({t.max_steps})")
    if s.gpus_per_trial is not None and s.gpus_per_trial < 0:
        raise ConfigError(f"gpus_per_trial must be >= 0, got {s.gpus_per_trial}")
    if s.max_concurrent_trials is not None and s.max_concurrent_trials <= 0:
        raise ConfigError(f"max_concurrent_trials must be positive, got {s.max_concurrent_trials}")
    if Path(d.dataset).suffix.lower() in FILE_FORMATS and not Path(d.dataset).expanduser().is_file():
        raise ConfigError(f"data file not found: {d.dataset}")
    if isinstance(t.gradient_checkpointing, bool):  # YAML true/false: the whole model or nothing
        t.gradient_checkpointing = "full" if t.gradient_checkpointing else "none"
    if t.gradient_checkpointing not in CHECKPOINTING:
        raise ConfigError(
            f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)}, got {t.gradient_checkpointing!r}"
        )
    if config.model.compute_dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(
            f"compute_dtype must be auto, bfloat16, float16 or float32, got {config.model.compute_dtype!r}"
        )


CHECKPOINTING = ("none", "feed-forward", "full")

# Metrics each evaluation reports, and which direction is better.
METRICS = {"rougeL": "max", "rouge1": "max", "rouge2": "max", "eval_loss": "min"}
