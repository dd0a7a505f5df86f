"""Base model loading (4-bit NF4 via bitsandbytes), LoRA target discovery and LoRA configs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, BitsAndBytesConfig

from qlora_ray.config import EMBEDDED_MODEL, ConfigError, LoraSettings, ModelSettings

# Leaf names of the query/value projections across common architectures.
_QUERY_VALUE = {"q", "v", "q_proj", "v_proj", "query", "value"}
_NEVER_TARGET = {"lm_head"}


def resolve_model_path(settings: ModelSettings, *, progress: bool = True) -> str:
    """The hub id or local directory to load; builds the embedded model on first use."""
    if settings.name == EMBEDDED_MODEL:
        from qlora_ray import embedded

        return str(embedded.build_tiny_t5(embedded.default_cache_dir(), progress=progress))
    if settings.name.startswith("embedded:"):
        raise ConfigError(f"unknown embedded model {settings.name!r}; the one built in is {EMBEDDED_MODEL!r}")
    return settings.name


def compute_dtype(settings: ModelSettings) -> torch.dtype:
    if settings.compute_dtype != "auto":
        return getattr(torch, settings.compute_dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(settings: ModelSettings) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(settings),
    )


def load_tokenizer(path: str, settings: ModelSettings):
    return AutoTokenizer.from_pretrained(path, trust_remote_code=settings.trust_remote_code)


def load_base_model(path: str, settings: ModelSettings) -> nn.Module:
    """The frozen base, quantized to 4-bit on load, on the GPU Ray assigned or the CPU."""
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    return AutoModelForSeq2SeqLM.from_pretrained(
        path,
        quantization_config=quantization_config(settings),
        device_map=device_map,
        trust_remote_code=settings.trust_remote_code,
    )


@dataclass(frozen=True)
class Architecture:
    """What the sweep needs to know about a model before any trial loads it."""

    model_type: str
    linear_modules: tuple[str, ...]  # leaf names of targetable nn.Linear layers
    target_sets: dict[str, tuple[str, ...]]  # named choices for the search

    def resolve_targets(self, choice: str) -> list[str]:
        """A named set ("qv") or explicit leaf names joined with '+' ("v+o")."""
        if choice in self.target_sets:
            return list(self.target_sets[choice])
        names = [n for n in choice.split("+") if n]
        unknown = [n for n in names if n not in self.linear_modules]
        if not names or unknown:
            raise ConfigError(
                f"unknown target module(s) {unknown or [choice]} for {self.model_type}; "
                f"named sets: {', '.join(self.target_sets)}; "
                f"modules (join with '+'): {', '.join(self.linear_modules)}"
            )
        return names


def discover_architecture(model: nn.Module) -> Architecture:
    linear: list[str] = []
    attention: list[str] = []
    for _, parent in model.named_modules():
        for leaf, child in parent.named_children():
            if not isinstance(child, nn.Linear) or leaf in _NEVER_TARGET:
                continue
            if leaf not in linear:
                linear.append(leaf)
            if "attention" in type(parent).__name__.lower() and leaf not in attention:
                attention.append(leaf)
    sets: dict[str, tuple[str, ...]] = {}
    query_value = [n for n in attention if n in _QUERY_VALUE]
    if query_value:
        sets["qv"] = tuple(query_value)
    if attention:
        sets["attention"] = tuple(attention)
    sets["all-linear"] = tuple(linear)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return Architecture(model_type=model_type, linear_modules=tuple(linear), target_sets=sets)


def inspect_architecture(path: str, settings: ModelSettings) -> Architecture:
    """Discover target modules from the config alone: the model is built on the meta device."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    except OSError as e:
        raise ConfigError(f"cannot load model config for {path!r}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=settings.trust_remote_code)
    return discover_architecture(model)


def lora_config(r: int, lora_alpha: int, target_modules: list[str], settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=settings.dropout,
        bias=settings.bias,
        task_type="SEQ_2_SEQ_LM",
        target_modules=target_modules,
        modules_to_save=list(settings.modules_to_save) or None,
    )
