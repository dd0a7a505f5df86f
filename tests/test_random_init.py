"""--random-init: a real architecture from its config, random weights, loadable like any checkpoint."""

import json

import pytest

from qlora_ray.config import ConfigError, ModelSettings
from qlora_ray.model import inspect_architecture, load_base_model, load_tokenizer, resolve_model_path
from qlora_ray.random_init import architecture_config

TINY = {"model_type": "t5", "d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 2, "num_layers": 1,
        "num_decoder_layers": 1, "feed_forward_proj": "relu", "vocab_size": 4160}


def test_t5_3b_config_ships_with_the_package():
    config = architecture_config("google-t5/t5-3b")
    assert (config["d_model"], config["d_ff"], config["num_layers"], config["num_heads"], config["vocab_size"]) == (
        1024, 16384, 24, 32, 32128)


def test_builds_once_and_loads_4bit(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    settings = ModelSettings(name=str(tmp_path), random_init=True)
    path = resolve_model_path(settings, progress=False)
    assert resolve_model_path(settings, progress=False) == path  # cached
    assert inspect_architecture(path, settings).target_sets["qv"] == ("q", "v")
    tokenizer = load_tokenizer(path, settings)
    model = load_base_model(path, settings)
    assert model.config.d_model == 64 and len(tokenizer) <= model.config.vocab_size
    assert "Params4bit" in {type(p).__name__ for p in model.parameters()}


def test_unknown_architecture_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="architecture config"):
        architecture_config(str(tmp_path / "nowhere"))

