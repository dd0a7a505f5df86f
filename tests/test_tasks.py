"""The task layer: which task a model's config implies, and the seq2seq task's pieces."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, T5Config

from qlora_ray import tasks
from qlora_ray.config import ConfigError


def test_the_config_decides_the_task_and_the_model_class():
    assert tasks.name_for(T5Config()) == tasks.SEQ2SEQ
    assert tasks.model_class(T5Config()) is AutoModelForSeq2SeqLM
    assert tasks.name_for(LlamaConfig()) == tasks.CAUSAL
    assert tasks.model_class(LlamaConfig()) is AutoModelForCausalLM
    assert tasks.resolve("auto", T5Config()) is tasks.get("seq2seq")
    assert tasks.get("seq2seq").PEFT_TASK_TYPE == "SEQ_2_SEQ_LM"


def test_an_unknown_task_is_a_clear_config_error():
    assert tasks.get("causal").PEFT_TASK_TYPE == "CAUSAL_LM"
    with pytest.raises(ConfigError, match="unknown task"):
        tasks.get("vision")
