"""SDPA for models with an additive position bias (T5), built once per forward, not per layer.

transformers' SDPA path turns T5's position bias and the padding mask into one float mask
(batch x heads x query x key) inside every layer, although every layer gets the same two
inputs. At batch 4 x 1024 tokens x 32 heads that is 256 MB in bf16 per layer, kept by
each of the 24 encoder layers for backward: 6 GB and 24 memory-bound passes per step for
the same values. Worse, T5's bias is a permuted view, so (in transformers < 5.23) the mask
has a strided last dimension and SDPA silently falls back to its math kernel, in fp32.
This backend builds one contiguous mask in the first layer, hangs it on the position-bias
tensor the layers share, and reuses it, so SDPA runs its fused memory-efficient kernel.

Select it with `attn_implementation=SHARED_BIAS_SDPA` (registered on import). `PACKED_SDPA`
below does the same kind of job for causal LMs trained on packed rows.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

SHARED_BIAS_SDPA = "qlora_ray_sdpa"
_CACHE_ATTR = "_qlora_ray_sdpa_mask"


def shared_bias_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
):
    if position_bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    is_causal = kwargs.pop("is_causal", None)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    shape = (query.shape[2], key.shape[2], key.dtype)
    cached = getattr(position_bias, _CACHE_ATTR, None)
    if cached is not None and cached[0] is attention_mask and cached[1] == (is_causal, shape):
        mask, zero_bias = cached[2], cached[3]
    elif _is_zero_leaf(position_bias):
        # Attention without a relative bias (T5's cross-attention) gets a zero bias, which under gradient
        # checkpointing T5 also marks requires_grad: SDPA would add zeros and compute a bias gradient nobody
        # reads, in its slower kernel (H100, T5-3b, batch 32: 139 ms of a 1.46 s step). The padding mask
        # alone (None without padding: the flash kernel) gives the same attention.
        mask, zero_bias = attention_mask, True
    else:
        # contiguous: T5's bias is a permuted view, and SDPA's fused kernels need unit stride on the last dim
        # (a strided mask silently falls back to the math kernel, in fp32).
        mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key).contiguous()
        zero_bias = False
    setattr(position_bias, _CACHE_ATTR, (attention_mask, (is_causal, shape), mask, zero_bias))
    # A bias mask carries causality and padding: no is_causal flag for SDPA then.
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=is_causal and zero_bias, **kwargs)


def _is_zero_leaf(position_bias: torch.Tensor) -> bool:
    """A bias made from nothing (no autograd history) that is all zeros; checked once per tensor (a host sync),
    the answer cached with the mask. Not while compiling (a data-dependent branch)."""
    return (position_bias.grad_fn is None and not torch.compiler.is_compiling()
            and not bool(position_bias.detach().any()))


AttentionInterface.register(SHARED_BIAS_SDPA, shared_bias_sdpa_forward)
AttentionMaskInterface.register(SHARED_BIAS_SDPA, sdpa_mask)


# ----------------------------------------------------------------------------- packed rows (causal LMs)

PACKED_SDPA = "qlora_ray_packed_sdpa"
_BOUNDS_ATTR = "_qlora_ray_bounds"


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
):
    """SDPA for padding-free packed batches (TRL's packing): causal attention within each sequence.

    TRL packs a micro-batch into one row and passes the sequence boundaries (`cu_seq_lens_q`);
    with SDPA, transformers turns them into a block-diagonal mask over the whole row, and SDPA
    with a mask runs its memory-efficient kernel over every (query, key) pair of the row: for a
    micro-batch of 10 x 512 tokens, 10x the attention work of the rows alone, plus a mask per
    layer kept for backward. Here the sequences are attended separately, causally, without a
    mask (the flash kernel): equal-length sequences as one batch of rows, others one by one.
    Anything else (no boundaries, generation with a cache) is plain SDPA.
    """
    kwargs.pop("is_causal", None)
    kwargs.pop("cu_seq_lens_k", None)
    kwargs.pop("max_length_k", None)
    total = query.shape[2]
    if cu_seq_lens_q is None or query.shape[0] != 1 or key.shape[2] != total or total < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    n = cu_seq_lens_q.numel() - 1
    if max_length_q is not None and n * int(max_length_q) == total:  # n sequences of the same length: a batch
        length = total // n

        def rows(x: torch.Tensor) -> torch.Tensor:  # (1, heads, n * length, d) -> (n, heads, length, d)
            return x[0].unflatten(1, (n, length)).transpose(0, 1)

        out, _ = sdpa_attention_forward(module, rows(query), rows(key), rows(value), None, is_causal=True, **kwargs)
        return out.reshape(1, total, *out.shape[2:]), None  # (n, length, heads, d) -> (1, total, heads, d)
    bounds = getattr(cu_seq_lens_q, _BOUNDS_ATTR, None)
    if bounds is None:  # one host sync per forward: every layer gets this same tensor
        bounds = [int(b) for b in cu_seq_lens_q.tolist()]
        setattr(cu_seq_lens_q, _BOUNDS_ATTR, bounds)
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True,
                                   **kwargs)[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    return torch.cat(outs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
