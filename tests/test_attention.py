"""The shared-bias SDPA backend for T5 (qlora_ray.attention) computes what transformers' eager attention does:
the same loss and gradients, with and without padding, with gradient checkpointing (where T5 marks the
cross-attention's zero bias requires_grad) and without; the zero bias never reaches SDPA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from qlora_ray import attention
from qlora_ray.config import load_config
from qlora_ray.model import resolve_model_path


def _model(implementation: str, checkpointing: bool):
    path = resolve_model_path(load_config(None).model)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, attn_implementation=implementation, dropout_rate=0.0,
                                                  dtype=torch.float64)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # (T5 marks the zero bias requires_grad only in training with checkpointing)
    return model


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "plain"])
@pytest.mark.parametrize("padding", [False, True], ids=["full-rows", "padded"])
def test_same_loss_and_gradients_as_eager(checkpointing, padding, monkeypatch):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    if padding:
        mask[1, 14:] = 0
        mask[2, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(5, 1000, (3, 6), generator=g)}
    expected_loss, expected = _loss_and_grads(_model("eager", checkpointing), batch)

    masks = []
    real = attention.sdpa_attention_forward

    def spy(module, query, key, value, mask_, **kwargs):
        masks.append((query.shape[2], key.shape[2], None if mask_ is None else tuple(mask_.shape),
                      kwargs.get("is_causal")))
        return real(module, query, key, value, mask_, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    loss, grads = _loss_and_grads(_model(attention.SHARED_BIAS_SDPA, checkpointing), batch)
    # float64: reduction-order noise between SDPA and eager is ~1e-13 (in float32 it reaches ~1e-4 relative).
    assert torch.allclose(loss, expected_loss, rtol=1e-10, atol=1e-12)
    assert grads.keys() == expected.keys() and len(grads) > 50
    for name, grad in grads.items():
        assert (grad - expected[name]).norm() <= 1e-9 * expected[name].norm() + 1e-15, name
    # Cross-attention (6 queries over 20 keys): no bias tensor, only the padding mask (none without padding).
    cross = {m for m in masks if m[:2] == (6, 20)}
    assert cross == ({(6, 20, (3, 1, 6, 20), False)} if padding else {(6, 20, None, False)}), cross
    encoder = {m for m in masks if m[:2] == (20, 20)}
    assert encoder and all(m[2] is not None for m in encoder)  # the relative position bias is kept
