"""A growing eval set (qlora_ray.eval_set): evaluation k of K scores the first k/K of the held-out examples,
the last all of them, on a real 4-bit T5 and a real 4-bit causal LM; partial scores never outrank full ones."""

from __future__ import annotations

import math
import tempfile

import pytest
from transformers import TrainerCallback

from qlora_ray import eval_set, tasks, trial
from qlora_ray.config import ConfigError, load_config, validate
from qlora_ray.data import load_raw
from qlora_ray.model import load_tokenizer, resolve_model_path
from qlora_ray.registry import rank_key

HPARAMS = {"r": 4, "lora_alpha": 16, "target_modules": "qv", "learning_rate": 1e-3}


def schedule(eval_set_kind: str, max_steps: int, eval_every: int):
    return load_config(None, overrides={"train": {"eval_set": eval_set_kind, "max_steps": max_steps,
                                                  "eval_every": eval_every}})


def test_schedule_grows_with_the_trial_and_ends_full():
    config = schedule("growing", 120, 30)  # K = 4
    assert [eval_set.examples_at(step, config, 128) for step in (30, 60, 90, 120)] == [32, 64, 96, 128]
    assert eval_set.examples_at(0, config, 128) == 128  # outside training (the base model's evaluation)
    assert [eval_set.examples_at(step, config, 40) for step in (30, 60, 90, 120)] == [16, 20, 30, 40]
    assert [eval_set.examples_at(step, config, 10) for step in (30, 60, 90, 120)] == [10] * 4  # floor above total
    odd = schedule("growing", 100, 30)  # K = 3: evaluations at 30, 60, 90; the last is full
    assert [eval_set.examples_at(step, odd, 90) for step in (30, 60, 90)] == [30, 60, 90]
    full = schedule("full", 120, 30)
    assert {eval_set.examples_at(step, full, 128) for step in (30, 60, 90, 120)} == {128}
    bad = schedule("growing", 120, 30)
    bad.train.eval_set = "sometimes"
    with pytest.raises(ConfigError, match="eval_set"):
        validate(bad)


def test_partial_scores_rank_after_full_ones():
    full_low = {"rougeL": 0.1, "eval_examples": 64, "eval_examples_total": 64}
    partial_high = {"rougeL": 0.9, "eval_examples": 16, "eval_examples_total": 64}
    full_high = {"rougeL": 0.3, "eval_examples": 64, "eval_examples_total": 64}
    ranked = sorted([partial_high, full_low, full_high], key=lambda m: rank_key(m, "rougeL", "max"))
    assert ranked == [full_high, full_low, partial_high]
    assert eval_set.score(full_low, "rougeL", "max", 64, 64) == 0.1
    partial_score = eval_set.score(partial_high, "rougeL", "max", 16, 64)
    assert math.isfinite(partial_score) and partial_score < eval_set.score(full_low, "rougeL", "max", 64, 64)
    loss = {"eval_loss": 9.0}
    assert 1e6 < eval_set.score(loss, "eval_loss", "min", 16, 64) < math.inf
    assert eval_set.score(loss, "eval_loss", "min", 64, 64) == 9.0
    legacy = {"rougeL": 0.5}  # metrics from before the schedule existed: full
    assert rank_key(legacy, "rougeL", "max") < rank_key(partial_high, "rougeL", "max")


class _Seen(TrainerCallback):
    def __init__(self):
        self.evaluations: list[tuple[int, int, int]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append((state.global_step, metrics["eval_examples"], metrics["eval_examples_total"]))


def _trainer(preset: str | None, eval_size: int, work_dir: str):
    config = load_config(preset, overrides={
        "data": {"eval_size": eval_size, "train_size": 16, "max_target_length": 12},
        "train": {"max_steps": 4, "eval_every": 1, "batch_size": 4, "eval_batch_size": 16, "eval_set": "growing"}})
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path, config.model)
    model = trial.build_model(path, config, HPARAMS)
    data = tasks.resolve(config.model.task, model.config).tokenize(load_raw(config.data), tokenizer, config.data)
    return trial.build_trainer(model, tokenizer, data, config, work_dir, HPARAMS["learning_rate"])


@pytest.mark.parametrize("preset", [None, "tiny-llama-stdlib"], ids=["t5", "causal"])
def test_trainer_scores_the_first_examples_of_the_schedule(preset, cache_dir):
    if preset:
        from qlora_ray import embedded_causal

        embedded_causal.build_tiny_causal(cache_dir)
    with tempfile.TemporaryDirectory() as work_dir:
        trainer = _trainer(preset, 40, work_dir)
        seen = _Seen()
        trainer.add_callback(seen)
        trainer.train()
        # K = 4 evaluations of 40 held-out examples: 10, 20, 30 are under the floor of 16.
        assert seen.evaluations == [(1, 16, 40), (2, 20, 40), (3, 30, 40), (4, 40, 40)]
        # A scheduled evaluation scores exactly the first examples: the same metrics as evaluating them explicitly.
        trainer.state.global_step = 2
        scheduled = trainer.evaluate()
        explicit = trainer.evaluate(eval_dataset=trainer.eval_dataset.select(range(20)))
        assert scheduled["eval_examples"] == 20 and explicit["eval_examples"] == explicit["eval_examples_total"] == 20
        for key in ("eval_loss", "eval_rougeL", "eval_rouge1"):
            assert scheduled[key] == pytest.approx(explicit[key], rel=1e-6), key
        whole = trainer.evaluate(eval_dataset=trainer.eval_dataset)
        assert whole["eval_examples"] == 40 and whole["eval_loss"] != pytest.approx(scheduled["eval_loss"], rel=1e-6)
