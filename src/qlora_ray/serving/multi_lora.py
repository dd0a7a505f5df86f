"""Many LoRA adapters in one batch: every row of a forward pass picks its own adapter.

Each targeted linear layer of the base is wrapped once. The wrapper keeps the A and B
matrices of every resident adapter stacked in slots (`[slots, rank, in]`, `[slots, out,
rank]`, zero-padded to the largest rank) and, for a batch whose row i uses slot s_i,
computes `base(x) + scale[s] * (x @ A[s]^T) @ B[s]^T` with two gathers and two batched
matmuls, whatever mix of adapters the batch holds. PEFT instead loops over the batch's
adapters in every layer; this is the S-LoRA/Punica idea (their segmented kernels) in plain
torch. Slot 0 is all zeros: the bare base. An adapter that does not target a layer has
zeros there too.

The row -> slot map is one tensor shared by all wrappers (`SlotContext.rows`), set before
each forward; CUDA graphs capture it by address.
"""

from __future__ import annotations

import torch
from torch import nn

# Ranks are padded up to a multiple of this, so most new adapters fit without a reallocation.
RANK_STEP = 16


class SlotContext:
    """State shared by the wrappers of one model."""

    def __init__(self, capacity: int, device: torch.device, dtype: torch.dtype):
        self.capacity, self.device, self.dtype = capacity, device, dtype
        self.rows: torch.Tensor | None = None  # [batch] slot per row; None: no LoRA at all
        # Bumped whenever a wrapper's tensors are replaced: captured CUDA graphs are stale then.
        self.version = 0


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, ctx: SlotContext):
        super().__init__()
        self.base, self.ctx = base, ctx
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = 0
        self.lora_a: torch.Tensor | None = None  # [slots, rank, in]
        self.lora_b: torch.Tensor | None = None  # [slots, out, rank]
        self.scale = torch.zeros(ctx.capacity, device=ctx.device, dtype=ctx.dtype)
        self.used = torch.zeros(ctx.capacity, dtype=torch.bool)  # host-side: which slots are non-zero

    @property
    def weight(self) -> torch.Tensor:  # transformers' T5 reads `wo.weight.dtype`
        return self.base.weight

    def reserve_rank(self, rank: int) -> None:
        """Make room for adapters of this rank (a reallocation: callers drop CUDA graphs)."""
        rank = -(-rank // RANK_STEP) * RANK_STEP
        if rank <= self.rank:
            return
        c, dev, dt = self.ctx.capacity, self.ctx.device, self.ctx.dtype
        a = torch.zeros(c, rank, self.in_features, device=dev, dtype=dt)
        b = torch.zeros(c, self.out_features, rank, device=dev, dtype=dt)
        if self.lora_a is not None:
            a[:, : self.rank] = self.lora_a
            b[:, :, : self.rank] = self.lora_b
        self.lora_a, self.lora_b, self.rank = a, b, rank
        self.ctx.version += 1

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        r = a.shape[0]
        self.reserve_rank(r)
        if r < self.rank:  # the rest of the slot must be zeros
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        self.lora_a[slot, :r].copy_(a, non_blocking=True)
        self.lora_b[slot, :, :r].copy_(b, non_blocking=True)
        self.scale[slot] = scale
        self.used[slot] = True

    def clear_slot(self, slot: int) -> None:
        if self.used[slot]:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            self.scale[slot] = 0
            self.used[slot] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.ctx.rows
        if rows is None or self.lora_a is None:
            return y
        batch = rows.shape[0]
        xs = x.reshape(batch, -1, self.in_features).to(self.lora_a.dtype)
        a = self.lora_a.index_select(0, rows)  # [batch, rank, in]
        b = self.lora_b.index_select(0, rows)  # [batch, out, rank]
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
        delta = delta * self.scale.index_select(0, rows).view(batch, 1, 1)
        return y + delta.view(y.shape).to(y.dtype)


def wrap(model: nn.Module, paths: list[str], ctx: SlotContext) -> dict[str, MultiLoraLinear]:
    """Wrap the named linear layers (those not wrapped yet); returns every wrapper in the model."""
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        child = getattr(parent, leaf)
        if not isinstance(child, MultiLoraLinear):
            setattr(parent, leaf, MultiLoraLinear(child, ctx))
            ctx.version += 1
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoraLinear)}
