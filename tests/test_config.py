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


def test_the_grid_walks_every_listed_value():
    from qlora_ray import search

    config = load_config(overrides={"search": {"algorithm": "grid", "r": [4, 16], "lora_alpha": [16],
                                                "learning_rate": [1e-3, 2e-3, 4e-3], "num_samples": 2,
                                                "target_modules": ["qv", "attention"]}})
    space = param_space(config.search)
    assert space["r"] == {"grid_search": [4, 16]} and space["lora_alpha"] == 16
    assert space["learning_rate"] == {"grid_search": [1e-3, 2e-3, 4e-3]}  # values, not a range
    assert search.total_trials(config.search) == 2 * 2 * 3 * 2
    assert search.searcher(config) is None  # Tune's variant generator walks the grid, not Optuna
    none = load_config(overrides={"search": {"early_stopping": "none"}})
    assert search.scheduler(none, "unused") is None  # FIFO: every trial to the end


@pytest.mark.parametrize("bad", [{"search": {"mode": "up"}}, {"train": {"eval_every": 0}},
                                 {"search": {"learning_rate": [1e-3, 1e-4]}}, {"nonsense": {}},
                                 {"search": {"learning_rate": [1e-4, 1e-3, 1e-2]}},  # three values: grid only
                                 {"search": {"algorithm": "random"}}, {"search": {"early_stopping": "median"}},
                                 {"train": {"compile": "everything"}}])
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


def test_compiled_blocks_by_default_only_for_causal_models_on_a_gpu():
    import torch

    from qlora_ray.model import should_compile

    gpu = torch.cuda.is_available()
    assert should_compile("auto", causal=True, gradient_checkpointing="full") is gpu
    assert not should_compile("auto", causal=False, gradient_checkpointing="none")  # T5 stays eager
    assert not should_compile("auto", causal=True, gradient_checkpointing="feed-forward")  # inductor fails there
    assert should_compile("blocks", causal=False, gradient_checkpointing="none")
    assert not should_compile("none", causal=True, gradient_checkpointing="full")
