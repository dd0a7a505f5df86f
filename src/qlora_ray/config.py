"""Typed sweep configuration: the one source of truth for defaults.

A sweep is configured by, in order of precedence: CLI flags, a `--config` YAML file,
a `--preset` YAML file (shipped in `qlora_ray/presets/`), and the dataclass defaults
below. YAML files mirror the dataclasses section by section.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

EMBEDDED_MODEL = "embedded:tiny-t5"
EMBEDDED_CAUSAL_MODEL = "embedded:tiny-llama"
EMBEDDED_DATASET = "embedded:stdlib-docstrings"
DEFAULT_PRESET = "tiny-t5-stdlib"
DEFAULT_CAUSAL_PRESET = "tiny-llama-stdlib"
# Local data files by suffix -> the `datasets` loader that reads them.
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# DataSettings.format: how rows read. auto: from the columns (data.load_raw resolves it).
PROMPT_COMPLETION, MESSAGES, TEXT = "prompt-completion", "messages", "text"
DATA_FORMATS = ("auto", PROMPT_COMPLETION, MESSAGES, TEXT)
COMPILE = ("auto", "none", "blocks")
EVAL_GENERATION = ("auto", "engine", "generate")
EVAL_SETS = ("growing", "full")


class ConfigError(ValueError):
    """A user-facing configuration problem: reported in one line, before Ray starts."""


def setting(default: Any = dataclasses.MISSING, help: str | None = None, *, flag: str | None = None,
            choices: tuple | None = None, metavar: str | None = None, factory: Any = dataclasses.MISSING,
            aliases: tuple[str, ...] = ()) -> Any:
    """A settings field. One with `help` is also a command-line flag (cli.py derives the flags from
    these dataclasses): `--<name>` with dashes, or `flag`, and any `aliases` (other names of the same
    flag); its type comes from the annotation."""
    metadata = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "aliases": tuple(aliases)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelSettings:
    name: str = setting(EMBEDDED_MODEL, "hub id or local directory of the base model (the embedded tiny T5 is built "
                        "offline on first use)", flag="--model")
    task: str = setting("auto", "seq2seq or causal; auto: what the model's config implies",
                        choices=("auto", "seq2seq", "causal"))
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = setting("auto", "auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU",
                                 choices=("auto", "bfloat16", "float16", "float32"))
    trust_remote_code: bool = setting(False, "allow the model repository's own code to run (off unless asked)")
    random_init: bool = setting(False, "the model's architecture with random weights instead of its weights (no "
                                "hub needed; for timing and tests): a known hub id or a local config.json")


@dataclass
class DataSettings:
    dataset: str = setting(EMBEDDED_DATASET, "hub id or a local .json/.jsonl/.csv/.parquet file")
    # How the rows read (causal models; seq2seq takes prompt-completion only). load_raw resolves auto.
    format: str = setting("auto", "prompt-completion: the text (prompt) and summary (completion) columns; messages: "
                          "a column of chat turns [{role, content}], rendered with the chat template, loss on the "
                          "assistant turns; text: one formatted text column, loss on all of it (no ROUGE: use "
                          "--metric eval_loss); auto: prompt-completion if both its columns are there, else "
                          "messages if that column is, else text if the text column is the only column of strings",
                          flag="--data-format", choices=DATA_FORMATS)
    text_column: str = setting("text", "column with the source text (causal: the prompt; --data-format text: "
                               "the whole formatted text)", aliases=("--prompt-column",))
    summary_column: str = setting("summary", "column with the reference summary (causal: the completion)",
                                  aliases=("--completion-column",))
    messages_column: str = setting("messages", "column with the chat turns, for --data-format messages")
    prefix: str = "summarize: "
    # Causal models: the prompt, with {text} for the text column (default: prefix + text + newline).
    # With format "text" the rows are already formatted: the template is not applied in training, only
    # recorded for serving, which wraps a completion request's prompt in it (e.g. "[INST] {text} [/INST]").
    prompt_template: str | None = None
    # Format "messages": a Jinja chat template used instead of the tokenizer's (needed when it has none);
    # recorded with each adapter so serving renders chats with the same template.
    chat_template: str | None = None
    max_source_length: int = setting(256, "source tokens kept")
    max_target_length: int = setting(32, "summary tokens kept (and generated)")
    train_size: int | None = setting(None, "cap on training examples (default all)")
    eval_size: int = setting(128, "held-out examples scored at every evaluation")
    seed: int = 42


@dataclass
class LoraSettings:
    """LoRA settings that are not searched (r, alpha and targets are: see SearchSettings)."""

    dropout: float = 0.05
    bias: str = "none"
    modules_to_save: list[str] = setting(factory=lambda: ["lm_head"])


@dataclass
class TrainSettings:
    max_steps: int = setting(240, "optimizer steps per trial")
    eval_every: int = setting(60, "steps between evaluations (each is one Tune report and checkpoint)")
    batch_size: int = setting(8, "micro-batch per step (halved, accumulation doubled, if a trial runs out of memory)")
    gradient_accumulation_steps: int = 1  # effective batch = batch_size x this
    memory_limit_gb: float | None = setting(None, "GPU memory a trial may plan for (qlora_ray.memory predicts its "
                                            "peak; a config over it starts at a smaller micro-batch, or is skipped); "
                                            "default: the GPU's memory times the trial's GPU share")
    eval_batch_size: int = 32
    weight_decay: float = 0.01
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # of max_steps; the larger of the two warmups applies
    lr_scheduler_type: str = "linear"  # transformers' names: linear, constant, cosine, ...
    max_grad_norm: float = 1.0
    group_by_length: bool = False  # batches of similar lengths (less padding)
    packing: bool = False  # causal: pack several examples into each row (TRL's bfd packing)
    optim: str = setting("auto", "transformers optimizer name (auto: paged_adamw_8bit on GPU, the QLoRA recipe; "
                         "adamw_torch on CPU)")
    # "feed-forward": each FFN block, most of T5's activation memory for little recompute.
    gradient_checkpointing: str = setting("none", "what backward recomputes to save memory: FFN blocks only, or "
                                          "every layer", choices=("none", "feed-forward", "full"))
    # auto: on for causal models on a GPU (bench/causal_throughput.py: Llama-2-7B 1.35x faster steps), except
    # with feed-forward checkpointing (inductor fails on a compiled block holding a checkpointed one).
    compile: str = setting("auto", "torch.compile the decoder blocks' norms, attention and MLPs (auto: causal "
                           "models on a GPU)", choices=COMPILE)
    # auto: on a GPU, the serving engine's decode step (qlora_ray.eval_generation; a CUDA graph per token) where it
    # gives generate()'s tokens: T5-family models, greedy. Otherwise (and on CPU) transformers' generate().
    eval_generation: str = setting("auto", "how evaluation generates the summaries ROUGE scores (auto: on a GPU the "
                                   "serving engine's decode step for T5 models with greedy decoding, else generate)",
                                   choices=EVAL_GENERATION)
    # full by default: judging ASHA's first rung on a quarter of the set (growing) cost the search most of its
    # quality for ROUGE-L (bench/search_efficiency.py: 81% of the grid's gain, 99.5% with the whole set, at about
    # the same trial-seconds; README "Measured"). growing is for evaluations that cost far more than steps.
    eval_set: str = setting("full", "what each evaluation scores: full: all of the eval set every time; growing: "
                            "evaluation k of K the first k/K of it (at least 16 examples; the last one all of it; "
                            "ASHA compares trials on the same examples; only full evaluations rank trials)",
                            choices=EVAL_SETS)
    num_beams: int = 1
    seed: int = 42

    @property
    def num_evals(self) -> int:
        return max(1, self.max_steps // self.eval_every)


@dataclass
class SearchSettings:
    num_samples: int = setting(8, "number of trials")
    metric: str = setting("rougeL", "rougeL, rouge1, rouge2 or eval_loss")
    mode: str = setting("max", "max or min", choices=("max", "min"))
    # A list is a categorical choice; a single value pins the parameter.
    r: list[int] = setting(factory=lambda: [4, 8, 16, 32], help="LoRA ranks, e.g. 8,16,32")
    lora_alpha: list[int] = setting(factory=lambda: [8, 16, 32, 64], help="LoRA alphas, e.g. 16,32")
    # [low, high] searched log-uniformly; [x] or [x, x] pins it.
    learning_rate: list[float] = setting(factory=lambda: [3e-4, 5e-3],
                                         help="a rate (2e-5) or a log-uniform range (1e-4:3e-3)")
    target_modules: list[str] = setting(factory=lambda: ["qv", "attention", "all-linear"],
                                        help="named sets (qv, attention, all-linear) or modules joined by '+' (v+o)")
    algorithm: str = setting("optuna", "optuna: TPE sampling (num_samples trials); grid: every combination of the "
                             "listed values (--learning-rate values, not a range), num_samples times each",
                             flag="--search-algorithm", choices=("optuna", "grid"))
    early_stopping: str = setting("asha", "asha: stop weak trials at each evaluation rung; none: run every trial "
                                  "to the end", choices=("asha", "none"))
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    # ASHA keeps the top 1/reduction_factor at each rung. 3 (rungs at evaluations 1 and 3 of 4) against 2, eval
    # loss over 5 seeds: the same median gain, 16.9% vs 18.0% of the grid's trial-seconds (README "Measured").
    reduction_factor: int = 3
    max_concurrent_trials: int | None = setting(None, "trials at once (default: as many as the cluster holds or "
                                                "can scale to)")
    cpus_per_trial: int = setting(1, "CPUs per trial")
    # A number >= 0, "auto" or None; text on the command line, made a number (or "auto") by validate().
    gpus_per_trial: str | None = setting(None, "GPUs per trial (default: 1 when the cluster has or can add GPUs, "
                                         "else 0; 0.5 puts two trials on a GPU; auto: each trial the share of a "
                                         "GPU its predicted peak memory needs, so small trials pack several to a "
                                         "GPU)", metavar="N|auto")
    gpu_memory_gb: float | None = setting(None, "memory of one GPU of the workers, for --gpus-per-trial auto "
                                          "(default: measured on a GPU node, or known from Ray's accelerator type)",
                                          metavar="GB")
    max_failures: int = 1  # retries of a crashed trial; others keep running either way
    top_k: int = setting(5, "adapters published to the registry")
    seed: int = setting(0, "search seed")


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    output_dir: str = setting("./runs", "where Tune results, sweep records and the registry go")
    storage: str | None = setting(None, "where trial results and checkpoints go: a directory every node sees, or "
                                  "s3://, gs://, file:// (default <output-dir>/tune)", metavar="URI")
    mlflow: str | None = setting(None, "log every trial to MLflow: a tracking URI such as sqlite:///runs/mlflow.db "
                                 "or http://host:5000", metavar="URI")

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
    if not s.learning_rate or min(s.learning_rate) <= 0:
        raise ConfigError(f"learning_rate must be positive, got {s.learning_rate}")
    if s.algorithm == "grid":
        pass  # any number of values: each is a grid point
    elif len(s.learning_rate) not in (1, 2):
        raise ConfigError(f"learning_rate must be one value or a [low, high] range (a list of values is for "
                          f"--search-algorithm grid), got {s.learning_rate}")
    elif len(s.learning_rate) == 2 and s.learning_rate[0] > s.learning_rate[1]:
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
    s.gpus_per_trial = _gpus_per_trial(s.gpus_per_trial)
    if s.gpu_memory_gb is not None and not float(s.gpu_memory_gb) > 0:
        raise ConfigError(f"gpu_memory_gb must be positive, got {s.gpu_memory_gb}")
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
    if s.algorithm not in ("optuna", "grid"):
        raise ConfigError(f"search algorithm must be optuna or grid, got {s.algorithm!r}")
    if s.early_stopping not in ("asha", "none"):
        raise ConfigError(f"early_stopping must be asha or none, got {s.early_stopping!r}")
    if isinstance(t.compile, bool):  # YAML true/false
        t.compile = "blocks" if t.compile else "none"
    if t.compile not in COMPILE:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE)}, got {t.compile!r}")
    if t.eval_generation not in EVAL_GENERATION:
        raise ConfigError(f"eval_generation must be one of {', '.join(EVAL_GENERATION)}, got {t.eval_generation!r}")
    if t.eval_set not in EVAL_SETS:
        raise ConfigError(f"eval_set must be one of {', '.join(EVAL_SETS)}, got {t.eval_set!r}")
    if t.eval_generation == "engine" and t.num_beams != 1:
        raise ConfigError(f"eval_generation engine decodes greedily; num_beams is {t.num_beams} (use auto or generate)")
    if d.format not in DATA_FORMATS:
        raise ConfigError(f"data format must be one of {', '.join(DATA_FORMATS)}, got {d.format!r}")
    check_data_format(config)
    if config.model.task not in ("auto", "seq2seq", "causal"):
        raise ConfigError(f"model task must be auto, seq2seq or causal, got {config.model.task!r}")
    if config.model.compute_dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(
            f"compute_dtype must be auto, bfloat16, float16 or float32, got {config.model.compute_dtype!r}"
        )


def check_data_format(config: Config, task: str | None = None) -> None:
    """What the data format rules out: ROUGE needs completions to compare (format text has none), and a
    seq2seq model needs prompt-completion pairs. Called by validate and, once the data and the model have
    resolved format and task, by sweep.prepare."""
    d, metric = config.data, config.search.metric
    if d.format == TEXT and metric != "eval_loss":
        raise ConfigError(f"--data-format text has no completions to score with {metric}: use --metric eval_loss "
                          "--mode min (or prompt-completion or messages data)")
    task = task or config.model.task
    if task == "seq2seq" and d.format not in ("auto", PROMPT_COMPLETION):
        raise ConfigError(f"a seq2seq model trains on prompt-completion pairs (--text-column, --summary-column); "
                          f"--data-format {d.format} is for causal LMs")


def _gpus_per_trial(value: Any) -> float | str | None:
    """None (the default), "auto", or a number of GPUs >= 0 (an int when whole)."""
    if value is None or value == "auto":
        return value
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise ConfigError(f"gpus_per_trial must be a number of GPUs >= 0 (0.5 shares a GPU) or 'auto', got {value!r}")
    return int(number) if number.is_integer() else number


CHECKPOINTING = ("none", "feed-forward", "full")

# Metrics each evaluation reports, and which direction is better.
METRICS = {"rougeL": "max", "rouge1": "max", "rouge2": "max", "eval_loss": "min"}
