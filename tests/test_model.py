"""Target-module discovery on real architectures, and the 4-bit load of the embedded model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, T5Config

from qlora_ray.config import ConfigError, ModelSettings
from qlora_ray.model import discover_architecture, inspect_architecture, load_base_model, resolve_model_path


def test_t5_target_sets():
    config = T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=2, d_kv=32, vocab_size=128)
    with torch.device("meta"):
        arch = discover_architecture(AutoModelForSeq2SeqLM.from_config(config))
    assert arch.target_sets["qv"] == ("q", "v")
    assert arch.target_sets["attention"] == ("q", "k", "v", "o")
    assert set(arch.target_sets["all-linear"]) == {"q", "k", "v", "o", "wi", "wo"}
    assert arch.resolve_targets("v+o") == ["v", "o"]
    with pytest.raises(ConfigError, match="unknown target module"):
        arch.resolve_targets("q+lm_head")


def test_embedded_model_loads_4bit_nf4():
    import bitsandbytes as bnb

    settings = ModelSettings()
    path = resolve_model_path(settings)
    assert set(inspect_architecture(path, settings).target_sets) == {"qv", "attention", "all-linear"}
    model = load_base_model(path, settings)
    q = model.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested  # double quant


def test_compiled_t5_blocks_train_like_eager_ones():
    """train.compile blocks on T5: each feed-forward sublayer (norm, wi, ReLU, wo, residual) and each attention
    sublayer's norm compiled; the loss and the adapter's gradients are the eager ones."""
    from qlora_ray import trial
    from qlora_ray.config import load_config
    from qlora_ray.model import compile_blocks

    config = load_config(None)
    path = resolve_model_path(config.model)
    hparams = {"r": 4, "lora_alpha": 16, "target_modules": "qv", "learning_rate": 1e-3}
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(3, 4000, (2, 40), generator=g), torch.randint(3, 4000, (2, 12), generator=g)

    def loss_and_grads(compiled: bool):
        model = trial.build_model(path, config, hparams)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # a non-zero adapter, the same in both runs
                param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        count = compile_blocks(model) if compiled else 0
        model.train()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        return count, loss.item(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    _, eager_loss, eager_grads = loss_and_grads(False)
    count, loss, grads = loss_and_grads(True)
    t5 = AutoModelForSeq2SeqLM.from_pretrained(path).config
    assert count == 2 * t5.num_layers + 3 * t5.num_decoder_layers + 2  # + the stacks' final norms
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager_grads.keys() == grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], rtol=1e-3, atol=1e-4 * eager_grads[name].abs().max()), name
