from __future__ import annotations

import pytest

from qlora_ray.config import ConfigError, available_presets, load_config
from qlora_ray.search import param_space


def test_presets_load_and_precedence(tmp_path):
    assert {"tiny-t5-stdlib", "t5-3b-billsum"} <= set(available_presets())
    recipe = load_config("t5-3b-billsum")
    assert recipe.model.name == "google-t5/t5-3b"
    assert (recipe.data.max_source_length, recipe.data.max_target_length) == (1024, 128)
    assert recipe.train.optim == "paged_adamw_8bit" and recipe.train.batch_size == 32
    assert recipe.train.gradient_checkpointing == "full"
    assert recipe.lora.modules_to_save == ["lm_head"]
    override = tmp_path / "c.yaml"
    override.write_text("train:\n  batch_size: 2\nsearch:\n  r: 8\n")
    config = load_config("t5-3b-billsum", str(override), {"train": {"max_steps": 700}})
    assert (config.train.batch_size, config.train.max_steps, config.search.r) == (2, 700, [8])
    assert config.data.dataset == "billsum"  # untouched keys keep the preset's value


def test_param_space_pins_single_values():
    config = load_config(overrides={"search": {"r": [32], "lora_alpha": 16, "learning_rate": [2e-5],
                                                "target_modules": ["v+o"]}})
    assert param_space(config.search) == {"r": 32, "lora_alpha": 16, "learning_rate": 2e-5,
                                          "target_modules": "v+o"}
    searched = param_space(load_config().search)
    assert all(hasattr(v, "sample") for v in searched.values())


@pytest.mark.parametrize("bad", [{"search": {"mode": "up"}}, {"train": {"eval_every": 0}},
                                 {"search": {"learning_rate": [1e-3, 1e-4]}}, {"nonsense": {}}])
def test_invalid_values(bad):
    with pytest.raises(ConfigError):
        load_config(overrides=bad)


def test_flags_are_derived_from_the_settings_and_land_in_the_config():
    """A setting is written once (config.setting with help); its flag, type and default text follow."""
    from qlora_ray import cli

    names = [cli._flag_name(f) for _, f in cli.settings_flags()]
    assert len(names) == len(set(names)) and {"--model", "--r", "--storage", "--mlflow", "--task"} <= set(names)
    args = cli.parser().parse_args(["--model", "some/model", "--r", "4,8", "--learning-rate", "1e-4:1e-3",
                                    "--trust-remote-code", "--gpus-per-trial", "0.5", "--storage", "file:///tmp/s",
                                    "--gradient-checkpointing", "full", "--train-size", "100"])
    config = load_config(overrides=cli.overrides_from(args))
    assert config.model.name == "some/model" and config.model.trust_remote_code is True
    assert config.search.r == [4, 8] and config.search.learning_rate == [1e-4, 1e-3]
    assert config.search.gpus_per_trial == 0.5 and config.storage == "file:///tmp/s"
    assert config.train.gradient_checkpointing == "full" and config.data.train_size == 100
    assert config.search.lora_alpha == load_config().search.lora_alpha  # not given: the preset's value stays
    assert "(default 4,8,16,32)" in cli.parser().format_help().replace("\n", " ").replace("  ", " ")
