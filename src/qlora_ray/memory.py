"""Predict a QLoRA trial's peak GPU memory from the model's config alone (issue 10).

`estimate(model_config, ...)` reads a transformers config (a dict or a PretrainedConfig; no
weights, no GPU, no torch) and adds up, in bytes, what one training step of this project's
trial keeps on the GPU at its peak:

- **base_4bit**: every quantized `nn.Linear` packed two 4-bit (NF4/FP4) weights to a byte.
- **quant_constants**: bitsandbytes' per-block scales (one per 64 weights): fp32, or with double
  quantization one byte each plus an fp32 scale per 256 of them. `get_memory_footprint()` does
  not count these (they live in the quant state, not in parameters), the GPU does.
- **base_unquantized**: what bitsandbytes leaves alone: embeddings, norms, the output head
  (`lm_head`) and biases, and T5's feed-forward output `wo` (transformers'
  `_keep_in_fp32_modules`; never quantized). They load in the compute dtype (bf16); with fp16
  compute the trial runs peft's `prepare_model_for_kbit_training`, which makes them fp32.
- **adapter**: LoRA A and B of every targeted layer (r x (in + out)) and full copies of the
  `modules_to_save` (the sweep saves `lm_head`), trained in fp32 (`model.trainable_to_fp32`).
- **gradients**: one fp32 gradient per trainable weight (grads are kept between steps until the
  optimizer zeroes them, so they overlap with the next backward).
- **optimizer**: Adam's two states per trainable weight. 8-bit (bitsandbytes): 1 byte each plus an
  fp32 scale per 256; weights under 4,096 elements stay 32-bit. 32-bit: 4 bytes each. Paged
  optimizers put the states of weights of >= 100,000 elements in CUDA managed memory
  (**optimizer_paged**): resident on the GPU, but invisible to `torch.cuda.max_memory_allocated`.
- **activations**: the tensors autograd saves for backward, from the architecture's dims (layers,
  hidden, feed-forward width, heads, vocabulary) and the micro-batch's tokens, per model family
  below; gradient checkpointing keeps only a layer's (or feed-forward block's) input instead.
  Includes bf16 copies that autocast makes of the fp32 trainable weights.
- **transient**: what is alive on top of the saved tensors at the peak: the loss over the
  vocabulary (fp32 log-probabilities and their gradient), the layer being recomputed under
  checkpointing, the gradients in flight through one layer's backward, one dequantized weight.
  (At the optimizer step instead, `adamw_torch`'s foreach temporaries, if that is larger.)
- **workspace**: cuBLAS and small buffers in torch's allocator (a constant).
- **cuda_context**: the CUDA context and kernels, outside torch's allocator (a constant).
- **allocator_slack**: memory torch's caching allocator reserves but has not handed out
  (fragmentation), a fraction of the per-step part.

`Estimate.allocated_bytes` is what `torch.cuda.max_memory_allocated()` should read (everything
but the context, the managed memory and the slack); `total_bytes` is what the GPU needs
(nvidia-smi's view). GB here are 10**9 bytes, as in the README's measurements.

Activation model: bf16 autocast on CUDA (the trial's GPU path), SDPA with a fused kernel (flash,
memory-efficient or cuDNN: they save q, k, v, the output and a log-sum-exp per head, never the
attention matrix), 4-bit layers that save nothing for backward (bitsandbytes keeps no input when
the weight needs no gradient), frozen unquantized linears that save nothing either, LoRA layers
that save their dropout output and mask, dropout masks as 1-byte bools. With fp16 or fp32
compute (no autocast) the residual stream is fp32 and every "p" term below is 4 bytes.
`bench/memory_calibrate.py` measures the same configurations on a GPU and reports the error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GB = 10**9

# Constants of the runtime, not of the model (see bench/memory_calibrate.py for measured values).
CUDA_CONTEXT_BYTES = 600 * 10**6  # CUDA context + loaded kernels (torch, cuBLAS, bitsandbytes) on an H100
WORKSPACE_BYTES = 64 * 2**20  # cuBLAS / cuBLASLt workspaces and small buffers inside torch's allocator
ALLOCATOR_SLACK = 0.05  # reserved-but-free memory of the caching allocator, as a fraction of the per-step part

# bitsandbytes' layouts.
QUANT_BLOCK = 64  # 4-bit weights per absmax scale (Params4bit's default blocksize)
NESTED_BLOCK = 256  # scales per fp32 second-level scale with double quantization
OPTIM_8BIT_BLOCK = 256  # elements per fp32 absmax of an 8-bit optimizer state
OPTIM_MIN_8BIT = 4096  # weights smaller than this keep 32-bit states in 8-bit optimizers
PAGED_MIN_NUMEL = 100_000  # paged optimizers page states of weights at least this large

OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_bnb_8bit", "adamw_torch",
              "adamw_torch_fused")
CHECKPOINTING = ("none", "feed-forward", "full")
SUPPORTED = ("t5", "llama", "phi")


@dataclass(frozen=True)
class Estimate:
    """A trial's predicted peak GPU memory: `breakdown` in bytes, by term (see the module doc)."""

    breakdown: dict[str, int]
    trainable_params: int
    inputs: dict[str, Any] = field(default_factory=dict)

    # Terms that torch's caching allocator hands out (what max_memory_allocated counts).
    _OUTSIDE_ALLOCATOR = ("cuda_context", "optimizer_paged", "allocator_slack")

    @property
    def total_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    @property
    def allocated_bytes(self) -> int:
        """What `torch.cuda.max_memory_allocated()` should report for the trial's steps."""
        return sum(v for k, v in self.breakdown.items() if k not in self._OUTSIDE_ALLOCATOR)

    @property
    def allocated_gb(self) -> float:
        return self.allocated_bytes / GB

    def fits(self, gpu_gb: float, headroom_gb: float = 0.0) -> bool:
        """Whether the whole trial (context included) fits a GPU of `gpu_gb` GB (10**9 bytes;
        `torch.cuda.get_device_properties(0).total_memory / 1e9`), keeping `headroom_gb` free."""
        return self.total_bytes <= (gpu_gb - headroom_gb) * GB

    def table(self) -> str:
        rows = [f"{k:>18}  {v / GB:8.3f} GB" for k, v in self.breakdown.items()]
        rows.append(f"{'total':>18}  {self.total_gb:8.3f} GB  (allocated {self.allocated_gb:.3f} GB)")
        return "\n".join(rows)


@dataclass(frozen=True)
class Plan:
    """A micro-batch and accumulation with the requested effective batch, and its estimate."""

    micro_batch_size: int
    accumulation: int
    estimate: Estimate


# ----------------------------------------------------------------------------- the architecture


@dataclass(frozen=True)
class _Linear:
    """One kind of nn.Linear in the model: its LoRA leaf name, shape and how often it occurs."""

    name: str
    n_in: int
    n_out: int
    count: int  # instances in the whole model
    stack: str  # "enc" or "dec" (decoder-only models: "dec")
    block: str  # "attn" or "ff": which sublayer (feed-forward checkpointing drops "ff")
    tokens: str  # whose tokens its input runs over: "enc" (T5's cross-attention k, v) or "self"
    quantized: bool = True
    bias: bool = False


@dataclass(frozen=True)
class _Arch:
    model_type: str
    linears: tuple[_Linear, ...]
    unquantized_params: int  # embeddings, norms, lm_head, biases, T5's wo (all in the base dtype)
    buffers_fp32: int  # fp32 buffers (rotary inv_freq)
    save_modules: dict[str, int]  # modules_to_save candidates -> their parameter counts
    hidden: int
    vocab: int
    attention_sets: dict[str, tuple[str, ...]]  # the project's named target sets ("qv", "attention")


def _cfg(model_config: Any) -> dict:
    if hasattr(model_config, "to_dict"):
        return model_config.to_dict()
    if isinstance(model_config, dict):
        return dict(model_config)
    raise TypeError(f"model_config must be a dict or a transformers PretrainedConfig, got {type(model_config)}")


def _model_type(cfg: dict) -> str:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"memory estimate for model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED)}")
    return model_type


def _t5_dims(cfg: dict) -> dict:
    d, heads = cfg.get("d_model", 512), cfg.get("num_heads", 8)
    enc = cfg.get("num_layers", 6)
    proj = cfg.get("feed_forward_proj", "relu")
    return {"d": d, "f": cfg.get("d_ff", 2048), "heads": heads, "inner": heads * cfg.get("d_kv", 64),
            "enc": enc, "dec": cfg.get("num_decoder_layers") or enc, "vocab": cfg.get("vocab_size", 32128),
            "gated": proj.startswith("gated-"), "act": proj.split("-")[-1],
            "dropout": cfg.get("dropout_rate", 0.1), "buckets": cfg.get("relative_attention_num_buckets", 32),
            "tie": cfg.get("tie_word_embeddings", True)}


def _decoder_dims(cfg: dict) -> dict:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    return {"h": h, "f": cfg["intermediate_size"], "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "q": heads * head_dim, "kv": kv_heads * head_dim, "layers": cfg["num_hidden_layers"],
            "vocab": cfg["vocab_size"], "tie": cfg.get("tie_word_embeddings", False)}


def _architecture(cfg: dict) -> _Arch:
    model_type = _model_type(cfg)
    if model_type == "t5":
        m = _t5_dims(cfg)
        d, f, inner, ne, nd = m["d"], m["f"], m["inner"], m["enc"], m["dec"]
        ff_in = [("wi_0", d, f), ("wi_1", d, f)] if m["gated"] else [("wi", d, f)]
        linears = []
        for stack, n in (("enc", ne), ("dec", nd)):
            for leaf, n_in, n_out in (("q", d, inner), ("k", d, inner), ("v", d, inner), ("o", inner, d)):
                linears.append(_Linear(leaf, n_in, n_out, n, stack, "attn", "self"))
            if stack == "dec":  # cross-attention: k and v run over the encoder's tokens
                for leaf, n_in, n_out in (("q", d, inner), ("k", d, inner), ("v", d, inner), ("o", inner, d)):
                    linears.append(_Linear(leaf, n_in, n_out, n, stack, "attn", "enc" if leaf in "kv" else "self"))
            for leaf, n_in, n_out in ff_in:
                linears.append(_Linear(leaf, n_in, n_out, n, stack, "ff", "self"))
            # wo is in T5's _keep_in_fp32_modules, which transformers never quantizes.
            linears.append(_Linear("wo", f, d, n, stack, "ff", "self", quantized=False))
        norms = d * (2 * ne + 1 + 3 * nd + 1)
        embeddings = m["vocab"] * d * (1 if m["tie"] else 2)
        bias_tables = 2 * m["buckets"] * m["heads"]  # relative attention bias of each stack's first layer
        return _Arch("t5", tuple(linears), norms + embeddings + bias_tables, 0,
                     {"lm_head": m["vocab"] * d, "shared": m["vocab"] * d}, d, m["vocab"],
                     {"qv": ("q", "v"), "attention": ("q", "k", "v", "o")})
    m = _decoder_dims(cfg)
    h, f, q, kv, n = m["h"], m["f"], m["q"], m["kv"], m["layers"]
    if model_type == "llama":
        attn_bias, mlp_bias = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
        shapes = [("q_proj", h, q, "attn", attn_bias), ("k_proj", h, kv, "attn", attn_bias),
                  ("v_proj", h, kv, "attn", attn_bias), ("o_proj", q, h, "attn", attn_bias),
                  ("gate_proj", h, f, "ff", mlp_bias), ("up_proj", h, f, "ff", mlp_bias),
                  ("down_proj", f, h, "ff", mlp_bias)]
        linears = tuple(_Linear(leaf, i, o, n, "dec", blk, "self", bias=b) for leaf, i, o, blk, b in shapes)
        norms = h * (2 * n + 1)
        lm_head = m["vocab"] * h
        rotary = m["head_dim"] // 2
        names = {"qv": ("q_proj", "v_proj"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj")}
    else:  # phi: LayerNorm (weight + bias), biased linears, a biased lm_head, partial rotary embeddings
        shapes = [("q_proj", h, q, "attn"), ("k_proj", h, kv, "attn"), ("v_proj", h, kv, "attn"),
                  ("dense", q, h, "attn"), ("fc1", h, f, "ff"), ("fc2", f, h, "ff")]
        linears = tuple(_Linear(leaf, i, o, n, "dec", blk, "self", bias=True) for leaf, i, o, blk in shapes)
        norms = 2 * h * (n + 1)
        lm_head = m["vocab"] * h + m["vocab"]
        factor = cfg.get("partial_rotary_factor") or (cfg.get("rope_parameters") or {}).get("partial_rotary_factor")
        rotary = int(m["head_dim"] * (factor or 0.5)) // 2
        names = {"qv": ("q_proj", "v_proj"), "attention": ("q_proj", "k_proj", "v_proj", "dense")}
    biases = sum(lin.n_out * lin.count for lin in linears if lin.bias)
    embed = m["vocab"] * h
    unquantized = embed + norms + biases + (0 if m["tie"] else lm_head)
    # The rotary embedding's inv_freq and original_inv_freq buffers (fp32).
    return _Arch(model_type, linears, unquantized, 2 * rotary, {"lm_head": lm_head, "embed_tokens": embed}, h,
                 m["vocab"], names)


def resolve_targets(model_config: Any, choice: str | list[str] | tuple[str, ...]) -> list[str]:
    """LoRA leaf names for a target choice, as the sweep names them (model.Architecture):
    "qv", "attention", "all-linear", names joined by '+' ("v+o"), or a list of names."""
    arch = _architecture(_cfg(model_config))
    leaves = list(dict.fromkeys(lin.name for lin in arch.linears))
    if isinstance(choice, str):
        if choice == "all-linear":
            return leaves
        if choice in arch.attention_sets:
            return list(arch.attention_sets[choice])
        choice = [c for c in choice.split("+") if c]
    names = list(choice)
    unknown = [n for n in names if n not in leaves]
    if unknown or not names:
        raise ValueError(f"unknown target module(s) {unknown or names} for {arch.model_type}; modules: "
                         f"{', '.join(leaves)}")
    return names


# ----------------------------------------------------------------------------- static memory


def _quantized_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, quant-state bytes) of one 4-bit weight of `numel` elements."""
    blocks = math.ceil(numel / QUANT_BLOCK)
    code = 16 * 4  # the 4-bit code book (fp32)
    if double_quant:
        nested = math.ceil(blocks / NESTED_BLOCK)
        constants = blocks + nested * 4 + NESTED_BLOCK * 4 + 4 + code  # uint8 scales, fp32 scales, code, offset
    else:
        constants = blocks * 4 + code
    return math.ceil(numel / 2), constants


def _trainable_tensors(arch: _Arch, r: int, targets: list[str], modules_to_save: list[str]) -> list[tuple[int, int]]:
    """(numel, how many) of every trainable tensor: LoRA A (r x in) and B (out x r), saved modules."""
    tensors = []
    for lin in arch.linears:
        if lin.name in targets:
            tensors += [(r * lin.n_in, lin.count), (lin.n_out * r, lin.count)]
    for name in modules_to_save:
        if name not in arch.save_modules:
            raise ValueError(f"modules_to_save {name!r} is not modelled for {arch.model_type}; known: "
                             f"{', '.join(arch.save_modules)}")
        if arch.model_type == "phi" and name == "lm_head":  # weight and bias are separate tensors
            tensors += [(arch.save_modules[name] - arch.vocab, 1), (arch.vocab, 1)]
        else:
            tensors.append((arch.save_modules[name], 1))
    return tensors


def optimizer_bytes(tensors: list[tuple[int, int]], optimizer: str) -> tuple[int, int]:
    """(bytes in torch's allocator, bytes in CUDA managed memory) of Adam's two states.

    bitsandbytes (bnb.optim.Optimizer2State): 8-bit states are one uint8 per element plus an
    fp32 absmax per 256 for each of the two states; tensors under 4,096 elements keep fp32
    states. Paged variants allocate the states of tensors with >= 100,000 elements with
    cudaMallocManaged (the absmax stays in torch's allocator). torch's AdamW: two fp32 states.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is not modelled; known: {', '.join(OPTIMIZERS)}")
    allocated = paged = 0
    for numel, count in tensors:
        if optimizer.startswith("adamw_torch"):
            allocated += 8 * numel * count
            continue
        eight_bit = "8bit" in optimizer and numel >= OPTIM_MIN_8BIT
        states = 2 * numel if eight_bit else 8 * numel
        scales = 2 * 4 * math.ceil(numel / OPTIM_8BIT_BLOCK) if eight_bit else 0
        if optimizer.startswith("paged") and numel >= PAGED_MIN_NUMEL:
            paged += states * count
        else:
            allocated += states * count
        allocated += scales * count
    return allocated, paged


# ----------------------------------------------------------------------------- activations


@dataclass
class _Stack:
    """Bytes one layer of a stack saves for backward, for the whole micro-batch."""

    layers: int
    attn: int  # attention sublayer(s), LoRA included
    ff: int  # feed-forward sublayer, LoRA included
    ff_keep: int  # kept per layer instead of `ff` when the feed-forward block is checkpointed (its input)
    layer_keep: int  # kept per layer instead of `attn + ff` under full checkpointing (the layer's input)
    bwd: int  # gradients in flight while one layer runs backward
    extra: int = 0  # saved once per stack, outside the layers (embedding dropout, final norm)


def _lora_saved(arch: _Arch, targets: list[str], r: int, dropout: float, p: int, tokens: dict[str, int],
                stack: str, block: str) -> int:
    """Per layer: a LoRA layer saves the input of lora_A (its dropout output, or autocast's bf16 copy of
    it) and dropout's bool mask, and lora_A's output for lora_B."""
    mask = 1 if dropout > 0 else 0
    total = 0
    for lin in arch.linears:
        if lin.name in targets and lin.stack == stack and lin.block == block:
            n = tokens["enc" if lin.tokens == "enc" else stack]
            total += n * (lin.n_in * (p + mask) + r * p)
    return total


def _t5_stacks(cfg: dict, arch: _Arch, *, b: int, src: int, tgt: int, p: int, targets: list[str], r: int,
               dropout: float, padded: bool) -> tuple[list[_Stack], int]:
    """T5 encoder and decoder, and the position-bias masks they share (bytes, not per layer)."""
    m = _t5_dims(cfg)
    d, f, inner, heads = m["d"], m["f"], m["inner"], m["heads"]
    drop = 1 if m["dropout"] > 0 else 0  # T5's dropouts each save a bool mask
    tokens = {"enc": b * src, "dec": b * tgt}
    # T5LayerNorm: pow saves the fp32 copy of its input, the rescale saves the input itself (bf16).
    norm = (4 + p) * d if p == 2 else 4 * d
    # Fused SDPA saves q, k, v, the output and a fp32 log-sum-exp per head; the sublayer's
    # output dropout saves a mask.
    self_attn = norm + 4 * p * inner + 4 * heads + drop * d
    if m["gated"]:  # gelu_new in Python (fp32 under autocast) times the linear branch, then dropout
        ff = norm + 20 * f + drop * (f + d)
        ff_bwd = 4 * 4 * f
    else:  # ReLU saves its output; dropout its mask; wo (frozen) saves nothing
        ff = norm + p * f + drop * (f + d)
        # ReLU's backward: its output and two gradients (the mask behind it is freed by then)
        ff_bwd = 2 * p * f - drop * f
    stacks = []
    for stack, n in (("enc", m["enc"]), ("dec", m["dec"])):
        t = tokens[stack]
        attn = t * self_attn
        if stack == "dec":  # cross-attention: q, output, lse over the decoder's tokens; k, v over the encoder's
            attn += t * (norm + 2 * p * inner + 4 * heads + drop * d) + tokens["enc"] * 2 * p * inner
        attn += _lora_saved(arch, targets, r, dropout, p, tokens, stack, "attn")
        ff_bytes = t * ff + _lora_saved(arch, targets, r, dropout, p, tokens, stack, "ff")
        # Backward of one layer: SDPA's grad q, k, v plus the incoming grad; or the FFN's grads.
        bwd = max(t * ff_bwd, t * 4 * p * inner) + t * 2 * 4 * d
        # Outside the layers: embedding dropout mask, final norm and its dropout mask; the encoder's
        # output is kept for the decoder (its checkpoints and its LoRA k/v need it).
        extra = t * (drop * d + norm + drop * d + (p * d if stack == "enc" else 0))
        stacks.append(_Stack(n, attn, ff_bytes, t * p * d, t * p * d, bwd, extra))
    # Position-bias masks, built once per forward and shared by every layer (qlora_ray.attention),
    # kept for backward by SDPA: encoder, decoder (causal) and cross-attention (zeros). Full-length
    # rows need no padding mask, so one mask serves the batch; with padding each row has its own.
    batch = b if padded else 1
    masks = p * heads * (src * src * batch + tgt * tgt + tgt * src * batch)
    return stacks, masks


def _decoder_stacks(cfg: dict, arch: _Arch, *, b: int, seq: int, p: int, targets: list[str], r: int,
                    dropout: float, padded: bool, packed: bool = False) -> tuple[list[_Stack], int]:
    """Decoder-only models (Llama, Phi): one stack."""
    m = _decoder_dims(cfg)
    h, f, q, kv, heads = m["h"], m["f"], m["q"], m["kv"], m["heads"]
    t = b * seq
    tokens = {"dec": t, "enc": 0}
    # With a padding mask SDPA gets a bool mask: it makes a float copy per layer and keeps it for
    # backward, and transformers repeats k, v for grouped-query attention (no enable_gqa with a mask).
    kv_saved = q if (padded and kv != q) else kv
    mask_per_layer = b * seq * seq * p if padded else 0
    sdpa = 2 * p * q + 2 * p * kv_saved + 4 * heads
    if arch.model_type == "llama":
        # LlamaRMSNorm saves the fp32 copy of its input (x2 norms per layer); SiLU saves its input,
        # the product saves silu(gate) and up.
        attn = t * (4 * h + sdpa) + mask_per_layer
        ff = t * (4 * h + 3 * p * f)
        ff_keep = t * (4 * h + p * h)  # the norm stays outside the checkpointed MLP, its output is kept
        layer_keep = t * p * h
        ff_bwd = 3 * p * f
        extra = t * 4 * h  # final norm
    else:
        # Phi as the trial prepares it (model.layer_norms_return_compute_dtype, model.fuse_tanh_gelu): under
        # autocast LayerNorm runs in fp32 and saves its fp32 input copy, but returns bf16, so q, k, v, fc1 and
        # the residual stream stay bf16 (without that hook they turn fp32: bitsandbytes' 4-bit layers return
        # their input's dtype). The GELU is torch's fused tanh GELU: it saves its input only. Two residual
        # dropouts save masks.
        drop = 1 if cfg.get("resid_pdrop", 0.0) > 0 else 0
        attn = t * (4 * h + sdpa + drop * h) + mask_per_layer
        ff = t * (p * f + drop * h)
        ff_keep = t * (p * h + drop * h)  # the MLP's input (the LayerNorm's output); its dropout is outside
        layer_keep = t * p * h
        ff_bwd = 3 * p * f
        extra = t * 4 * h  # final LayerNorm
    attn += _lora_saved(arch, targets, r, dropout, p, tokens, "dec", "attn")
    ff += _lora_saved(arch, targets, r, dropout, p, tokens, "dec", "ff")
    bwd = max(t * ff_bwd, t * p * (2 * q + 2 * kv)) + t * 2 * 4 * h
    mask_once = b * seq * seq if padded else 0  # the bool mask transformers builds once
    if packed:  # one row of b * seq tokens: its block-diagonal bool mask, built once (PACKED_SDPA ignores it)
        mask_once = (b * seq) ** 2
    return [_Stack(m["layers"], attn, ff, ff_keep, layer_keep, bwd, extra)], mask_once


def _activation_peak(stacks: list[_Stack], checkpointing: str) -> tuple[int, int]:
    """(saved bytes, largest per-layer working set on top of them) for a checkpointing mode."""
    if checkpointing == "none":
        saved = sum(s.layers * (s.attn + s.ff) + s.extra for s in stacks)
        working = max(s.bwd for s in stacks)
    elif checkpointing == "feed-forward":
        saved = sum(s.layers * (s.attn + s.ff_keep) + s.extra for s in stacks)
        working = max(s.ff - s.ff_keep + s.bwd for s in stacks)  # one block recomputed, then its backward
    else:
        saved = sum(s.layers * s.layer_keep + s.extra for s in stacks)
        working = max(s.attn + s.ff - s.layer_keep + s.bwd for s in stacks)  # one layer recomputed
    return saved, working


# ----------------------------------------------------------------------------- the estimate


def estimate(
    model_config: Any,
    *,
    micro_batch_size: int,
    source_len: int | None = None,
    target_len: int | None = None,
    seq_len: int | None = None,
    r: int = 16,
    target_modules: str | list[str] | tuple[str, ...] = "qv",
    modules_to_save: list[str] | tuple[str, ...] = (),
    lora_dropout: float = 0.05,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    optimizer: str = "paged_adamw_8bit",
    gradient_checkpointing: str = "none",
    padded: bool = False,
    packed: bool = False,
    lm_head: str = "logits",
    loss_tokens: int | None = None,
    trainable_dtype: str = "float32",
) -> Estimate:
    """Peak GPU memory of one QLoRA training step (the second or later: optimizer states exist).

    T5 (seq2seq) takes `source_len` and `target_len`; Llama and Phi (causal) take `seq_len`.
    Lengths are the padded lengths of a micro-batch (the worst case: full-length rows).
    `target_modules`: LoRA leaf names, or the sweep's set names ("qv", "attention", "all-linear",
    "v+o"). `padded`: the batch has padding, so attention needs an explicit mask (T5: a position
    bias per row instead of one shared; causal: a float mask per layer). `gradient_checkpointing`:
    "full" recomputes every layer; "feed-forward" T5's T5LayerFF blocks (model.checkpoint_feed_forward)
    or, for Llama and Phi, the MLP blocks (as bench/memory_calibrate.py wraps them: the trial path
    checkpoints them the same way).

    Causal models only: `packed`: TRL's padding-free packing, the micro-batch as one row of
    micro_batch_size x seq_len tokens attended per sequence (attention.PACKED_SDPA). `lm_head`:
    "logits", the model's own loss over full fp32 logits, or "fused", TRL's chunked log-prob head
    (SFTTrainer), which projects only the `loss_tokens` labelled positions per row (default all) in
    tiles and never holds the logits. `trainable_dtype`: the adapter's dtype ("bfloat16" when TRL
    casts a quantized model's adapter to bf16, as SFTTrainer does).
    """
    cfg = _cfg(model_config)
    arch = _architecture(cfg)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be nf4 or fp4, got {quant_type!r}")
    if gradient_checkpointing not in CHECKPOINTING:
        raise ValueError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)}")
    if compute_dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {compute_dtype!r}")
    if lm_head not in ("logits", "fused"):
        raise ValueError(f"lm_head must be logits or fused, got {lm_head!r}")
    if micro_batch_size < 1 or r < 1:
        raise ValueError("micro_batch_size and r must be positive")
    targets = resolve_targets(cfg, target_modules)
    save = list(modules_to_save)
    autocast = compute_dtype == "bfloat16"
    p = 2 if autocast else 4  # activation bytes (fp16 compute: no autocast, fp32 stream)
    base_dtype = 2 if autocast else 4  # unquantized weights (fp16: upcast to fp32 by prepare_model_for_kbit)

    # Static: the base, the adapter, its gradients and optimizer states.
    packed = constants = unquantized = 0
    for lin in arch.linears:
        numel = lin.n_in * lin.n_out
        if lin.quantized:
            w, c = _quantized_bytes(numel, double_quant)
            packed += w * lin.count
            constants += c * lin.count
        else:
            unquantized += numel * lin.count * base_dtype
    unquantized += arch.unquantized_params * base_dtype + arch.buffers_fp32 * 4
    tensors = _trainable_tensors(arch, r, targets, save)
    trainable = sum(n * c for n, c in tensors)
    opt_allocated, opt_paged = optimizer_bytes(tensors, optimizer)

    # Per step: activations at the peak of forward/backward.
    if arch.model_type == "t5":
        if not source_len or not target_len:
            raise ValueError("T5 needs source_len and target_len")
        stacks, shared = _t5_stacks(cfg, arch, b=micro_batch_size, src=source_len, tgt=target_len, p=p,
                                    targets=targets, r=r, dropout=lora_dropout, padded=padded)
        out_tokens = micro_batch_size * target_len
        # cross_entropy on bf16 logits: log_softmax in fp32 (saved), its gradient, the logits' gradient
        loss = out_tokens * arch.vocab * (8 + p)
    else:
        if not seq_len:
            raise ValueError(f"{arch.model_type} needs seq_len")
        stacks, shared = _decoder_stacks(cfg, arch, b=micro_batch_size, seq=seq_len, p=p, targets=targets,
                                         r=r, dropout=lora_dropout, padded=padded, packed=packed)
        out_tokens = micro_batch_size * seq_len
        if lm_head == "fused":
            # TRL's chunked head: the labelled positions' hidden states (gathered, saved), their fp32 gradient,
            # and one (<= 4096 tokens x <= 32768 vocab) tile of logits in the compute dtype at a time.
            n = micro_batch_size * min(loss_tokens or seq_len, seq_len)
            loss = n * arch.hidden * (p + 4) + min(n, 4096) * min(arch.vocab, 32768) * p
        else:
            # ForCausalLMLoss upcasts the logits to fp32: log-probs saved, their gradient, the logits' gradient
            loss = out_tokens * arch.vocab * 12
    saved, working = _activation_peak(stacks, gradient_checkpointing)
    saved += shared
    if "lm_head" in save:  # a trainable head saves its input; its weight gradient is made in bf16 first
        saved += out_tokens * arch.hidden * p
        loss += arch.save_modules["lm_head"] * p if autocast else 0
    weight_bytes = 2 if trainable_dtype in ("bfloat16", "float16") else 4
    if autocast and weight_bytes == 4:  # autocast's bf16 copies of the fp32 trainable weights, kept for backward
        saved += 2 * trainable
    largest = max(lin.n_in * lin.n_out for lin in arch.linears if lin.quantized)
    dequantized = largest * 2  # bitsandbytes dequantizes one weight at a time to bf16/fp16
    transient = max(loss, working) + dequantized
    # The optimizer step: activations are gone; adamw_torch (foreach) makes a fp32 temporary per state.
    step = 4 * trainable if optimizer.startswith("adamw_torch") and optimizer != "adamw_torch_fused" else 0
    if step > saved + transient:
        saved, transient = 0, step

    breakdown = {
        "base_4bit": packed,
        "quant_constants": constants,
        "base_unquantized": unquantized,
        "adapter": weight_bytes * trainable,
        "gradients": weight_bytes * trainable,
        "optimizer": opt_allocated,
        "optimizer_paged": opt_paged,
        "activations": saved,
        "transient": transient,
        "workspace": WORKSPACE_BYTES,
        "cuda_context": CUDA_CONTEXT_BYTES,
        "allocator_slack": int(ALLOCATOR_SLACK * (saved + transient)),
    }
    inputs = {"model_type": arch.model_type, "micro_batch_size": micro_batch_size, "source_len": source_len,
              "target_len": target_len, "seq_len": seq_len, "r": r, "target_modules": targets,
              "modules_to_save": save, "lora_dropout": lora_dropout, "quant_type": quant_type,
              "double_quant": double_quant, "compute_dtype": compute_dtype, "optimizer": optimizer,
              "gradient_checkpointing": gradient_checkpointing, "padded": padded, "packed": packed,
              "lm_head": lm_head, "loss_tokens": loss_tokens, "trainable_dtype": trainable_dtype}
    return Estimate(breakdown, trainable, inputs)


def largest_micro_batch(gpu_gb: float, model_config: Any, *, max_micro_batch: int = 1024, headroom_gb: float = 0.0,
                        **kwargs) -> int | None:
    """The largest micro-batch (<= max_micro_batch) whose estimate fits `gpu_gb`; None if not even 1."""
    if not estimate(model_config, micro_batch_size=1, **kwargs).fits(gpu_gb, headroom_gb):
        return None
    lo, hi = 1, max_micro_batch  # memory grows with the batch: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(model_config, micro_batch_size=mid, **kwargs).fits(gpu_gb, headroom_gb):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_for(gpu_gb: float, model_config: Any, *, micro_batch_size: int, accumulation: int = 1,
             headroom_gb: float = 0.0, **kwargs) -> Plan | None:
    """The largest micro-batch that fits `gpu_gb` with the same effective batch
    (micro_batch_size x accumulation): divisors of the effective batch, largest first, no larger
    than the requested micro-batch. None if not even a micro-batch of 1 fits."""
    effective = micro_batch_size * accumulation
    for micro in range(min(micro_batch_size, effective), 0, -1):
        if effective % micro:
            continue
        est = estimate(model_config, micro_batch_size=micro, **kwargs)
        if est.fits(gpu_gb, headroom_gb):
            return Plan(micro, effective // micro, est)
    return None


def estimate_trial(model_config: Any, config: Any, hparams: dict, *, micro_batch_size: int | None = None,
                   compute_dtype: str = "bfloat16") -> Estimate:
    """The estimate for one sweep trial: the project's Config (qlora_ray.config) and a trial's
    hyperparameters (r, target_modules). compute_dtype "auto" is taken as bf16 (a GPU that has it);
    optim "auto" as paged_adamw_8bit (the trial's choice on a GPU). Causal models train on
    max_source_length + max_target_length tokens per row unless the data settings name a
    `max_length`, through TRL's SFTTrainer: its fused LM head over the loss's tokens (every token
    with data format text, else the completion's, max_target_length per row), a bf16 adapter (TRL
    casts a quantized model's trainables to bf16) and, with `train.packing`, padding-free packed rows."""
    model, data, train, lora = config.model, config.data, config.train, config.lora
    dtype = compute_dtype if model.compute_dtype == "auto" else model.compute_dtype
    optim = "paged_adamw_8bit" if train.optim == "auto" else train.optim
    lengths: dict[str, Any] = {}
    if _model_type(_cfg(model_config)) == "t5":
        lengths = {"source_len": data.max_source_length, "target_len": data.max_target_length}
    else:
        lengths = {"seq_len": getattr(data, "max_length", None) or data.max_source_length + data.max_target_length,
                   "lm_head": "fused", "trainable_dtype": "bfloat16",
                   # format text: the loss counts every token; else the completion's (<= max_target_length)
                   "loss_tokens": None if getattr(data, "format", None) == "text" else data.max_target_length,
                   "packed": bool(getattr(train, "packing", False))}
    return estimate(model_config, micro_batch_size=micro_batch_size or train.batch_size, r=int(hparams["r"]),
                    target_modules=hparams["target_modules"], modules_to_save=list(lora.modules_to_save),
                    lora_dropout=lora.dropout, quant_type=model.quant_type, double_quant=model.double_quant,
                    compute_dtype=dtype, optimizer=optim, gradient_checkpointing=train.gradient_checkpointing,
                    **lengths)
