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
