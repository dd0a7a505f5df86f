"""The trial's model and Trainer on the embedded model: dtypes, attention backend, bf16 round trip."""

import tempfile

import pytest
import torch

from qlora_ray import trial
from qlora_ray.attention import SHARED_BIAS_SDPA
from qlora_ray.config import load_config
from qlora_ray.data import load_raw
from qlora_ray.model import load_tokenizer, resolve_model_path
from qlora_ray.tasks import seq2seq

HPARAMS = {"r": 4, "lora_alpha": 8, "target_modules": "qv", "learning_rate": 1e-3}


def _setup(**train):
    config = load_config(overrides={"model": {"compute_dtype": "bfloat16"},
                                    "data": {"train_size": 32, "eval_size": 8},
                                    "train": {"max_steps": 4, "eval_every": 4, "batch_size": 4, **train}})
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path, config.model)
    data = seq2seq.tokenize(load_raw(config.data), tokenizer, config.data)
    return config, path, tokenizer, data


@pytest.mark.parametrize("checkpointing", ["none", "feed-forward", "full"])
def test_bf16_trial_trains_and_generates(checkpointing):
    """bf16 base, fp32 trainable weights, autocast in training and none in ROUGE generation."""
    config, path, tokenizer, data = _setup(gradient_checkpointing=checkpointing)
    model = trial.build_model(path, config, HPARAMS)
    base = model.get_base_model()
    assert base.config._attn_implementation == SHARED_BIAS_SDPA
    assert base.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trainable == {torch.float32}
    with tempfile.TemporaryDirectory() as work:
        trainer = trial.build_trainer(model, tokenizer, data, config, work, HPARAMS["learning_rate"], max_steps=4)
        result = trainer.train()
        metrics = trainer.evaluate()  # generates outside autocast: lm_head's fp32 copy must cope
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert 0.0 <= metrics["eval_rougeL"] <= 1.0 and metrics["eval_loss"] > 0


def test_shared_bias_attention_matches_sdpa():
    """Same loss and gradients as transformers' own SDPA path, with padding in the batch."""
    from transformers import AutoModelForSeq2SeqLM

    config, path, tokenizer, _ = _setup()
    batch = tokenizer(["def f(x):\n    return x", "class A:\n    pass\n" * 5], padding=True, return_tensors="pt")
    labels = tokenizer(["Return x.", "A class that does nothing at all."], padding=True, return_tensors="pt").input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    results = {}
    for impl in ["sdpa", SHARED_BIAS_SDPA]:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32)
        model.train()
        for module in model.modules():  # dropout off: the two runs must see the same computation
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "dropout", None), float):
                module.dropout = 0.0
        loss = model(**batch, labels=labels).loss
        loss.backward()
        grad = model.encoder.block[0].layer[0].SelfAttention.q.weight.grad.clone()
        model.eval()
        generated = model.generate(**batch, max_new_tokens=12, do_sample=False)
        results[impl] = (loss.item(), grad, generated)
    (loss_a, grad_a, gen_a), (loss_b, grad_b, gen_b) = results.values()
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert torch.allclose(grad_a, grad_b, atol=1e-6)
    assert torch.equal(gen_a, gen_b)
