"""The causal trial's speed changes compute the same thing: packed attention, fused GELU, bf16 norms."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig

from qlora_ray import memory
from qlora_ray.attention import PACKED_SDPA
from qlora_ray.model import fuse_tanh_gelu, layer_norms_return_compute_dtype

TINY = {
    "llama": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300),
    "phi": PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=300, partial_rotary_factor=0.5, resid_pdrop=0.0),
}


@pytest.mark.parametrize("arch", ["llama", "phi"])
@pytest.mark.parametrize("lengths", [[16, 16, 16], [5, 20, 9]])
def test_packed_sdpa_matches_the_block_diagonal_mask(arch, lengths):
    """TRL's padding-free rows: each sequence attended alone gives transformers' masked SDPA result."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY[arch], attn_implementation="sdpa")
    ids = torch.randint(0, 300, (1, sum(lengths)))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None], "cu_seq_lens_q": cu,
              "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths), "use_cache": False}
    reference = model(ids, **inputs).logits
    model.set_attn_implementation(PACKED_SDPA)
    packed = model(ids, **inputs).logits
    assert torch.allclose(packed, reference, atol=1e-5)
    plain = model(ids[:, :8], use_cache=False).logits  # no boundaries: plain causal SDPA
    model.set_attn_implementation("sdpa")
    assert torch.allclose(plain, model(ids[:, :8], use_cache=False).logits, atol=1e-6)


def test_fused_gelu_and_bf16_norms_keep_phi_s_loss():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY["phi"]).to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(ids, labels=ids).loss
    assert fuse_tanh_gelu(model) == 2
    assert layer_norms_return_compute_dtype(model) == 3  # two layers' norms and the final one
    norm = model.model.layers[0].input_layernorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(ids, labels=ids).loss
        assert norm(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert norm(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16  # outside autocast: untouched
    assert abs(float(after) - float(before)) < 0.01


def test_causal_trial_estimate_models_trl_s_head_and_bf16_adapter():
    """The trial's estimate (TRL's fused head over the completion, bf16 adapter) is below the plain
    Trainer's (full fp32 logits, fp32 adapter) by what those terms hold."""
    cfg = json.loads((resources.files("qlora_ray") / "architectures" / "llama-2-7b.json").read_text())
    kw = {"micro_batch_size": 4, "seq_len": 512, "r": 64, "target_modules": "all-linear",
          "optimizer": "paged_adamw_32bit", "gradient_checkpointing": "full"}
    plain = memory.estimate(cfg, **kw)
    trial = memory.estimate(cfg, lm_head="fused", loss_tokens=64, trainable_dtype="bfloat16", packed=True, **kw)
    assert trial.breakdown["adapter"] * 2 == plain.breakdown["adapter"]
    assert trial.allocated_gb < plain.allocated_gb - 0.5
    with pytest.raises(ValueError, match="lm_head"):
        memory.estimate(cfg, lm_head="chunked", **kw)
