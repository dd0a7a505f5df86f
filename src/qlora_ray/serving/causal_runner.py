"""Decoder-only LMs for the batching engine: rows at different positions in one step.

The same contract as t5_runner.T5Runner, for Llama-family models (llama, mistral, qwen2)
and Phi: a static key/value cache row per active row, each row at its own position.

- prefill writes a prompt's keys and values for every layer, except the prompt's last
  token: that token is the row's first decode input (`begin`), so the first new token comes
  out of an ordinary step and the engine needs no separate prefill logits;
- a decode step embeds each row's last token, applies rotary embeddings at the row's own
  position (the model's rotary module, so its scaling variants apply), writes its key and
  value there and attends to keys 0..position (and no further back than a sliding window);
- norms, MLPs and linear layers are the model's own modules, so LoRA wrappers (multi_lora)
  and 4-bit layers apply as in training.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

LLAMA_LIKE = {"llama", "mistral", "qwen2"}  # pre-norm blocks: attention, then MLP
PARALLEL = {"phi"}  # one norm; attention and MLP side by side
SUPPORTED = LLAMA_LIKE | PARALLEL


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CausalRunner:
    def __init__(self, model: nn.Module, max_rows: int, max_source: int, max_new: int):
        config = model.config
        if config.model_type not in SUPPORTED:
            raise ValueError(f"the batching engine serves decoder-only models of types {sorted(SUPPORTED)}, "
                             f"not {config.model_type!r}")
        self.model, self.config = model, config
        self.parallel = config.model_type in PARALLEL
        inner = model.model
        self.embed, self.layers, self.rotary = inner.embed_tokens, list(inner.layers), inner.rotary_emb
        self.final_norm = self.final_norm_of(model)
        attention = self.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attention.head_dim
        self.rotary_dims = getattr(attention, "rotary_ndims", self.head_dim)
        self.scale = attention.scaling
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.window = int(window) if window else None
        param = next(p for p in model.parameters() if p.is_floating_point())
        self.device = param.device
        self.dtype = self.final_norm.weight.dtype
        self.max_rows, self.max_source, self.max_new = max_rows, max_source, max_new
        self.length = max_source + max_new  # a row's prompt and completion share its cache row
        limit = getattr(config, "max_position_embeddings", None)
        if limit and self.length > limit:
            raise ValueError(f"prompt ({max_source}) + new tokens ({max_new}) exceed the model's "
                             f"{limit} positions")
        kw = {"device": self.device, "dtype": self.dtype}
        shape = (len(self.layers), max_rows, self.kv_heads, self.length, self.head_dim)
        self.keys, self.values = torch.zeros(shape, **kw), torch.zeros(shape, **kw)
        self.min_value = torch.finfo(self.dtype).min
        self.key_index = torch.arange(self.length, device=self.device)

    @staticmethod
    def final_norm_of(model: nn.Module) -> nn.Module:
        """The last norm: its dtype is the model's compute dtype (4-bit layers keep their own)."""
        return model.model.final_layernorm if model.config.model_type in PARALLEL else model.model.norm

    # ---- the row lifecycle, as the engine sees it ----

    def begin(self, input_ids: list[int]) -> tuple[int, int, list[int]]:
        """A joining row's first step input: (token, position, tokens repetition_penalty counts)."""
        return input_ids[-1], len(input_ids) - 1, input_ids

    @torch.no_grad()
    def prefill(self, cache_rows: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Keys and values of each row's prompt but its last token (LoRA slots already set on the
        context); the first len(cache_rows) rows go to those cache rows, the rest are padding."""
        ids = input_ids[:, :-1]  # right-padded: a row's last real token may sit anywhere before
        n, length = ids.shape
        if length == 0:
            return
        m = len(cache_rows)
        index = torch.tensor(cache_rows, device=self.device)
        positions = torch.arange(length, device=self.device).expand(n, length)
        hidden = self.embed(ids)
        cos, sin = self._rotary(hidden, positions)
        mask = self._mask(positions, length)
        for i, layer in enumerate(self.layers):
            normed = layer.input_layernorm(hidden)
            q, k, v = self._qkv(layer.self_attn, normed, cos, sin)  # [n, heads, length, d]
            self.keys[i, index, :, :length] = k[:m].to(self.dtype)
            self.values[i, index, :, :length] = v[:m].to(self.dtype)
            if i == len(self.layers) - 1:
                break  # the last layer's output is not needed: only its keys and values
            hidden = self._block(layer, hidden, normed, q, k, v, mask)

    def move_row(self, src: int, dst: int) -> None:
        self.keys[:, dst] = self.keys[:, src]
        self.values[:, dst] = self.values[:, src]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, key_len: int | None = None,
             source_len: int | None = None) -> torch.Tensor:
        """One decoding step for cache rows [0, n): each row's token at its position -> final hidden state.

        key_len bounds the attended positions (eager mode); a CUDA graph passes None."""
        del source_len  # one cache holds prompt and completion
        n = tokens.shape[0]
        key_len = key_len or self.length
        rows = torch.arange(n, device=self.device)
        hidden = self.embed(tokens).unsqueeze(1)  # [n, 1, d]
        pos = positions.unsqueeze(1)
        cos, sin = self._rotary(hidden, pos)
        mask = self._mask(pos, key_len)
        for i, layer in enumerate(self.layers):
            normed = layer.input_layernorm(hidden)
            q, k, v = self._qkv(layer.self_attn, normed, cos, sin)
            self.keys[i, rows, :, positions] = k[:, :, 0].to(self.dtype)
            self.values[i, rows, :, positions] = v[:, :, 0].to(self.dtype)
            hidden = self._block(layer, hidden, normed, q, self.keys[i, :n, :, :key_len],
                                 self.values[i, :n, :, :key_len], mask)
        return self.final_norm(hidden)[:, 0]

    # ---- the model's pieces ----

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(hidden, positions)  # [n, length, rotary_dims]
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _mask(self, positions: torch.Tensor, key_len: int) -> torch.Tensor:
        """Additive mask [n, 1, queries, keys]: a query attends keys at or before its position."""
        keys = self.key_index[:key_len]
        allowed = keys <= positions.unsqueeze(-1)
        if self.window is not None:
            allowed &= keys > positions.unsqueeze(-1) - self.window
        zero = torch.zeros((), device=self.device, dtype=self.dtype)
        return torch.where(allowed, zero, self.min_value).unsqueeze(1)

    def _qkv(self, attention: nn.Module, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        n, length, _ = normed.shape
        q = attention.q_proj(normed).view(n, length, self.heads, self.head_dim).transpose(1, 2)
        k = attention.k_proj(normed).view(n, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attention.v_proj(normed).view(n, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if getattr(attention, "qk_layernorm", False):
            q, k = attention.q_layernorm(q), attention.k_layernorm(k)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        d = self.rotary_dims
        rotated, kept = x[..., :d], x[..., d:]
        rotated = rotated * cos + _rotate_half(rotated) * sin
        return torch.cat((rotated, kept), dim=-1) if kept.shape[-1] else rotated

    def _block(self, layer: nn.Module, hidden, normed, q, keys, values, mask) -> torch.Tensor:
        attention = layer.self_attn
        n, length = hidden.shape[:2]
        out = F.scaled_dot_product_attention(q.to(self.dtype), keys.to(self.dtype), values.to(self.dtype),
                                             attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.kv_heads != self.heads)
        out = out.transpose(1, 2).reshape(n, length, -1)
        if self.parallel:  # Phi: attention and MLP both read the normed input
            return hidden + attention.dense(out) + layer.mlp(normed)
        hidden = hidden + attention.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
