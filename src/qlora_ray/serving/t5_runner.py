"""T5 decoding for the batching engine: rows at different positions in one step.

transformers' T5 decodes a batch in lockstep (one position for all rows, one cache that
grows). Continuous batching needs rows that joined at different times to share a step, so
this runner keeps static per-row state and computes what differs per row itself:

- the encoder runs through transformers (one call per group of joining rows); its keys
  and values for every decoder layer's cross-attention go into a static cache row;
- a decode step embeds each row's last token, writes its self-attention key/value at the
  row's own position, and adds the relative position bias of that position (one table,
  gathered per row) plus the causal mask;
- the norms, feed-forward blocks and linear layers are the model's own modules, so LoRA
  wrappers (multi_lora) and 4-bit layers apply as in training.

Active rows are kept in cache rows [0, n) (`move_row` compacts), so a step runs on the
first n rows; on a GPU the step for a fixed row count is captured as a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SUPPORTED = {"t5", "mt5"}  # one relative-position table in the first layer; umt5 has one per layer


class T5Runner:
    def __init__(self, model: nn.Module, max_rows: int, max_source: int, max_new: int):
        config = model.config
        if config.model_type not in SUPPORTED:
            raise ValueError(f"the batching engine serves {sorted(SUPPORTED)} models, not {config.model_type!r}")
        self.model, self.config = model, config
        self.decoder = model.get_decoder()
        self.blocks = list(self.decoder.block)
        param = next(p for p in model.parameters() if p.is_floating_point())
        self.device = param.device
        self.dtype = self.decoder.final_layer_norm.weight.dtype
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.max_rows, self.max_source, self.max_new = max_rows, max_source, max_new
        self.min_value = torch.finfo(self.dtype).min
        layers, h, d = len(self.blocks), self.heads, self.head_dim
        kw = {"device": self.device, "dtype": self.dtype}
        self.self_k = torch.zeros(layers, max_rows, h, max_new, d, **kw)
        self.self_v = torch.zeros(layers, max_rows, h, max_new, d, **kw)
        self.cross_k = torch.zeros(layers, max_rows, h, max_source, d, **kw)
        self.cross_v = torch.zeros(layers, max_rows, h, max_source, d, **kw)
        self.cross_mask = torch.zeros(max_rows, max_source, **kw)  # 0 where a source token is, min elsewhere
        self.bias_table = self._self_attention_bias()  # [heads, query pos, key pos], causal mask included

    @staticmethod
    def final_norm_of(model: nn.Module) -> nn.Module:
        return model.get_decoder().final_layer_norm

    def begin(self, input_ids: list[int]) -> tuple[int, int, list[int]]:
        """A joining row's first step input: (token, position, tokens repetition_penalty counts).
        transformers penalizes the decoder's start token too, and never the encoder's input."""
        start = self.config.decoder_start_token_id
        return start, 0, [start]

    @torch.no_grad()
    def _self_attention_bias(self) -> torch.Tensor:
        attention = self.blocks[0].layer[0].SelfAttention
        bias = attention.compute_bias(self.max_new, self.max_new, device=self.device)[0].to(self.dtype)
        causal = torch.ones(self.max_new, self.max_new, dtype=torch.bool, device=self.device).triu(1)
        return bias.masked_fill(causal, self.min_value).contiguous()

    @torch.no_grad()
    def prefill(self, cache_rows: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Encode rows (LoRA slots already set on the context); the first len(cache_rows) go to those
        cache rows (the rest are padding for a fixed shape)."""
        encoded = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        n, length = input_ids.shape
        m = len(cache_rows)
        index = torch.tensor(cache_rows, device=self.device)
        for layer, block in enumerate(self.blocks):
            attention = block.layer[1].EncDecAttention
            k = attention.k(encoded).view(n, length, self.heads, self.head_dim).transpose(1, 2)
            v = attention.v(encoded).view(n, length, self.heads, self.head_dim).transpose(1, 2)
            self.cross_k[layer, index, :, :length] = k[:m].to(self.dtype)
            self.cross_v[layer, index, :, :length] = v[:m].to(self.dtype)
        mask = torch.full((m, self.max_source), self.min_value, device=self.device, dtype=self.dtype)
        mask[:, :length].masked_fill_(attention_mask[:m].bool(), 0.0)
        self.cross_mask[index] = mask

    def move_row(self, src: int, dst: int) -> None:
        """Copy a row's whole state to another cache row (compaction after a row ends)."""
        for cache in (self.self_k, self.self_v, self.cross_k, self.cross_v):
            cache[:, dst] = cache[:, src]
        self.cross_mask[dst] = self.cross_mask[src]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, key_len: int | None = None,
             source_len: int | None = None) -> torch.Tensor:
        """One decoding step for cache rows [0, n): each row's token at its position -> final hidden state.

        key_len / source_len bound the attended lengths (eager mode: less work for short
        rows); a CUDA graph passes None and attends the full static caches.
        """
        n = tokens.shape[0]
        key_len = key_len or self.max_new
        source_len = source_len or self.max_source
        rows = torch.arange(n, device=self.device)
        hidden = self.decoder.embed_tokens(tokens).unsqueeze(1)  # [n, 1, d]
        self_bias = self.bias_table[:, positions, :key_len].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, keys]
        cross_bias = self.cross_mask[:n, :source_len].view(n, 1, 1, source_len)
        for layer, block in enumerate(self.blocks):
            self_layer, cross_layer, ff_layer = block.layer
            attention = self_layer.SelfAttention
            normed = self_layer.layer_norm(hidden)
            q = attention.q(normed).view(n, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attention.k(normed).view(n, self.heads, self.head_dim)
            v = attention.v(normed).view(n, self.heads, self.head_dim)
            self.self_k[layer, rows, :, positions] = k.to(self.dtype)
            self.self_v[layer, rows, :, positions] = v.to(self.dtype)
            keys = self.self_k[layer, :n, :, :key_len]
            values = self.self_v[layer, :n, :, :key_len]
            out = F.scaled_dot_product_attention(q.to(self.dtype), keys, values, attn_mask=self_bias, scale=1.0)
            hidden = _clamp(hidden + attention.o(out.transpose(1, 2).reshape(n, 1, -1)))

            attention = cross_layer.EncDecAttention
            normed = cross_layer.layer_norm(hidden)
            q = attention.q(normed).view(n, 1, self.heads, self.head_dim).transpose(1, 2)
            keys = self.cross_k[layer, :n, :, :source_len]
            values = self.cross_v[layer, :n, :, :source_len]
            out = F.scaled_dot_product_attention(q.to(self.dtype), keys, values, attn_mask=cross_bias, scale=1.0)
            hidden = _clamp(hidden + attention.o(out.transpose(1, 2).reshape(n, 1, -1)))

            hidden = _clamp(ff_layer(hidden))
        hidden = self.decoder.final_layer_norm(hidden)[:, 0]
        if getattr(self.config, "scale_decoder_outputs", False):
            hidden = hidden * (self.config.d_model**-0.5)
        return hidden


def _clamp(hidden: torch.Tensor) -> torch.Tensor:
    # As transformers' T5Block: fp16 activations can overflow in T5's feed-forward blocks.
    if hidden.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        return hidden.clamp(-limit, limit)
    return hidden
