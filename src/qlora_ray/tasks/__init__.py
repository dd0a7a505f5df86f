"""Tasks: what differs between fine-tuning a seq2seq model and a causal LM lives in one module each.

A task module provides:

- MODEL_CLASS: the transformers auto class that loads its models;
- PEFT_TASK_TYPE: the task_type of its LoRA config;
- tokenize(raw, tokenizer, data_settings) -> TokenizedData: examples as model inputs and labels;
- build_trainer(model, tokenizer, data, config, training_args) -> transformers Trainer: its
  trainer, collator, generation settings and metrics, given the arguments every task shares
  (batch plan, optimizer, checkpoints, logging; see trial.build_trainer).

The sweep, the search, the registry and serving stay task-agnostic and ask `for_config` or `get`.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from qlora_ray.config import ConfigError

SEQ2SEQ, CAUSAL = "seq2seq", "causal"
IMPLEMENTED = (SEQ2SEQ, CAUSAL)


def name_for(model_config) -> str:
    """The task a model's config implies: encoder-decoder models are seq2seq, the rest causal LMs."""
    return SEQ2SEQ if getattr(model_config, "is_encoder_decoder", False) else CAUSAL


def get(name: str) -> ModuleType:
    if name not in IMPLEMENTED:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(IMPLEMENTED)}")
    return import_module(f"qlora_ray.tasks.{name}")


def for_config(model_config) -> ModuleType:
    return get(name_for(model_config))


def resolve(name: str, model_config) -> ModuleType:
    """ModelSettings.task: "auto" follows the model's config."""
    return for_config(model_config) if name == "auto" else get(name)


def model_class(model_config):
    """The auto class that builds this config's model (for meta-device and random-weight builds too)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if name_for(model_config) == SEQ2SEQ else AutoModelForCausalLM
