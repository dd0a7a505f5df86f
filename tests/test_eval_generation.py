"""Evaluation's summaries through the serving engine's decode step (qlora_ray.eval_generation) are the very
tokens transformers' generate() picks, so ROUGE and every other metric are unchanged, on a real 4-bit T5
with a LoRA adapter that changes its output."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch

from qlora_ray import eval_generation, tasks, trial
from qlora_ray.config import ConfigError, load_config
from qlora_ray.data import load_raw
from qlora_ray.model import load_tokenizer, resolve_model_path

HPARAMS = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def setup(cache_dir):
    config = load_config(None, overrides={"data": {"eval_size": 12, "train_size": 16, "max_target_length": 24},
                                          "train": {"eval_batch_size": 5}})
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path, config.model)
    model = trial.build_model(path, config, HPARAMS)
    g = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():  # an adapter that moves the output (fresh LoRA B is zero)
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.5
    model.eval()
    task = tasks.resolve(config.model.task, model.config)
    data = task.tokenize(load_raw(config.data), tokenizer, config.data)
    return config, model, tokenizer, data


def test_the_engine_step_picks_generate_s_tokens(setup):
    config, model, tokenizer, data = setup
    assert eval_generation.supports(model, num_beams=1) and not eval_generation.supports(model, num_beams=4)
    rows = data.eval["input_ids"][:5]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    length = config.data.max_target_length
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_length=length, num_beams=1)
    generator = eval_generation.GreedyT5Generator(model, max_rows=8, max_source=width + 3, max_new=length - 1)
    got = generator.generate(ids, mask)
    assert got.shape == (5, length)
    expected = torch.nn.functional.pad(expected, (0, length - expected.shape[1]), value=tokenizer.pad_token_id)
    assert torch.equal(got, expected)
    texts = tokenizer.batch_decode(got, skip_special_tokens=True)
    assert len(set(texts)) > 1 and all(texts)  # real, different summaries: the comparison can fail
    # Fewer rows than the generator holds, and a second call on the same generator: the same tokens.
    assert torch.equal(generator.generate(ids[:2], mask[:2]), got[:2])


def test_trainer_metrics_are_the_same_either_way(setup):
    config, model, tokenizer, data = setup
    metrics = {}
    for mode in ("generate", "engine"):
        cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, eval_generation=mode))
        with tempfile.TemporaryDirectory() as work:
            trainer = trial.build_trainer(model, tokenizer, data, cfg, work, learning_rate=0.0)
            assert trainer.engine_generation == (mode == "engine")
            timing = ("runtime", "per_second", "_time")
            metrics[mode] = {k: v for k, v in trainer.evaluate().items() if not any(t in k for t in timing)}
        assert "generate" not in vars(model)  # put back after evaluating
    assert metrics["engine"] == metrics["generate"]
    assert metrics["engine"]["eval_rougeL"] > 0 and len(metrics["engine"]) >= 5


def test_engine_generation_refuses_what_it_cannot_reproduce(setup):
    config, model, tokenizer, data = setup
    with pytest.raises(ConfigError, match="num_beams"):
        load_config(None, overrides={"train": {"eval_generation": "engine", "num_beams": 4}})
    with pytest.raises(ConfigError, match="eval_generation must be one of"):
        load_config(None, overrides={"train": {"eval_generation": "fast"}})
    model.generation_config.no_repeat_ngram_size = 3
    try:
        assert not eval_generation.supports(model, num_beams=1)
        cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, eval_generation="engine"))
        with tempfile.TemporaryDirectory() as work, pytest.raises(ConfigError, match="greedily"):
            trial.build_trainer(model, tokenizer, data, cfg, work, learning_rate=0.0)
        with tempfile.TemporaryDirectory() as work:  # auto: falls back to generate()
            assert not trial.build_trainer(model, tokenizer, data, config, work, learning_rate=0.0).engine_generation
    finally:
        model.generation_config.no_repeat_ngram_size = None
