"""Base model loading (4-bit NF4 via bitsandbytes), LoRA target discovery and LoRA configs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig

from qlora_ray import tasks
from qlora_ray.config import EMBEDDED_CAUSAL_MODEL, EMBEDDED_MODEL, ConfigError, LoraSettings, ModelSettings

# Leaf names of the query/value projections across common architectures.
_QUERY_VALUE = {"q", "v", "q_proj", "v_proj", "query", "value"}
_NEVER_TARGET = {"lm_head"}


def resolve_model_path(settings: ModelSettings, *, progress: bool = True) -> str:
    """The hub id or local directory to load; builds the embedded or random-weight model on first use."""
    if settings.random_init:
        from qlora_ray import embedded, random_init

        if settings.name.startswith("embedded:"):
            raise ConfigError("--random-init takes a hub id or a config, not the embedded model")
        return str(random_init.build_random_model(settings.name, embedded.default_cache_dir(), progress=progress))
    if settings.name == EMBEDDED_MODEL:
        from qlora_ray import embedded

        return str(embedded.build_tiny_t5(embedded.default_cache_dir(), progress=progress))
    if settings.name == EMBEDDED_CAUSAL_MODEL:
        from qlora_ray import embedded, embedded_causal

        return str(embedded_causal.build_tiny_causal(embedded.default_cache_dir(), progress=progress))
    if settings.name.startswith("embedded:"):
        raise ConfigError(f"unknown embedded model {settings.name!r}; the built-in ones are {EMBEDDED_MODEL!r} "
                          f"(seq2seq) and {EMBEDDED_CAUSAL_MODEL!r} (causal)")
    return settings.name


def compute_dtype(settings: ModelSettings) -> torch.dtype:
    if settings.compute_dtype != "auto":
        return getattr(torch, settings.compute_dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(settings: ModelSettings) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(settings),
    )


def load_tokenizer(path: str, settings: ModelSettings):
    return AutoTokenizer.from_pretrained(path, trust_remote_code=settings.trust_remote_code)


def load_base_model(path: str, settings: ModelSettings) -> nn.Module:
    """The frozen base, quantized to 4-bit on load, on the GPU Ray assigned or the CPU.

    The layers bitsandbytes leaves unquantized (norms, embeddings, T5's `wo`) load in the
    compute dtype: in bf16 rather than the checkpoint's fp32 they take half the memory and
    their matmuls run on tensor cores. (fp16 keeps transformers' fp32 `wo`: T5 overflows
    fp16 there.)
    """
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    config = AutoConfig.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    extra = {}
    if config.model_type in POSITION_BIAS_MODELS:
        from qlora_ray.attention import SHARED_BIAS_SDPA

        extra["attn_implementation"] = SHARED_BIAS_SDPA
    return tasks.model_class(config).from_pretrained(
        path,
        quantization_config=quantization_config(settings),
        device_map=device_map,
        dtype=compute_dtype(settings),
        trust_remote_code=settings.trust_remote_code,
        **extra,
    )


# Model types whose attention adds a relative position bias: they get qlora_ray.attention's SDPA.
POSITION_BIAS_MODELS = {"t5", "mt5", "umt5"}


def prepare_for_training(model: nn.Module, settings: ModelSettings, gradient_checkpointing: str) -> nn.Module:
    """Freeze the 4-bit base and set up checkpointing, before the LoRA adapter is added.

    Unlike peft's prepare_model_for_kbit_training this leaves bf16 layers in bf16: casting
    every unquantized weight to fp32 (what it does) doubles their memory and, without
    autocast, runs attention and T5's `wo` in fp32. bf16 has fp32's range, so the norms
    are safe; the trainable weights are made fp32 separately (see `trainable_to_fp32`).
    fp16 keeps peft's recipe, which it was made for.
    """
    if compute_dtype(settings) == torch.float16:
        # Checkpointing itself is switched on by the Trainer (non-reentrant: no input grads needed).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
    fuse_tanh_gelu(model)
    if compute_dtype(settings) == torch.bfloat16:
        layer_norms_return_compute_dtype(model)
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and not getattr(config, "is_encoder_decoder", False):
        from qlora_ray.attention import PACKED_SDPA

        model.set_attn_implementation(PACKED_SDPA)  # packed rows: each sequence attended alone, no mask
    if gradient_checkpointing == "feed-forward":
        checkpoint_feed_forward(model)
    # "full" is switched on by the Trainer (gradient_checkpointing=True in its arguments).
    keep_cpu_weights_fixed(model)
    return model


# Decoder-block parts torch.compile fuses well: the elementwise work around the 4-bit matmuls (norms in fp32,
# rotary, LoRA's dropout/scale/add, SiLU x up), ~25% of a Llama-2-7B step eagerly, and their Python and
# launch overhead. Whole decoder layers compiled under gradient checkpointing hit an inductor partitioner
# error ("Node ... was invalid, but is output", torch 2.11), so the parts are compiled one by one.
_COMPILED_PARTS = ("RMSNorm", "MLP", "Attention")
# T5: the whole feed-forward sublayer (norm, wi, ReLU, dropouts, wo, residual) and the attention sublayers'
# norms. Not T5Attention: qlora_ray.attention caches the shared mask on the position-bias tensor, which
# dynamo cannot trace.
_COMPILED_T5_PARTS = ("T5LayerFF", "T5LayerNorm")


def should_compile(setting: str, *, causal: bool, gradient_checkpointing: str) -> bool:
    if setting == "auto":
        return causal and torch.cuda.is_available() and gradient_checkpointing != "feed-forward"
    return setting == "blocks"


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each block's parts in place (they share one compiled graph per kind: modules are graph
    inputs), the outermost only where parts nest. Returns how many modules were compiled."""
    import torch._dynamo

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    config = getattr(model, "config", None)
    t5 = getattr(config, "model_type", None) in POSITION_BIAS_MODELS
    parts, inside = [], set()
    for m in model.modules():  # parents come before their children
        name = type(m).__name__
        chosen = name in _COMPILED_T5_PARTS if t5 else name.endswith(_COMPILED_PARTS)
        if chosen and id(m) not in inside:
            parts.append(m)
            inside.update(id(child) for child in m.modules())
    for m in parts:
        m.compile()
    return len(parts)


def fuse_tanh_gelu(model: nn.Module) -> int:
    """Swap transformers' `gelu_new` (Phi, GPT-2 and kin) for torch's `gelu(approximate="tanh")`.

    They are the same function, but `gelu_new` is written out in Python: eight elementwise
    kernels whose intermediates autograd keeps (16 bytes per FFN unit in Phi-2; under autocast
    in fp32, since `torch.pow` autocasts to fp32). The fused kernel keeps only its input, in
    the input's dtype. Returns how many activations were swapped.
    """
    from transformers.activations import ACT2FN, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, ACT2FN["gelu_pytorch_tanh"])
                swapped += 1
    return swapped


def layer_norms_return_compute_dtype(model: nn.Module) -> int:
    """Under bf16 autocast, make `nn.LayerNorm` return bf16 (its weights' dtype) instead of fp32.

    Autocast runs layer_norm in fp32 and returns fp32, and bitsandbytes' 4-bit layers return
    their input's dtype: in Phi (parallel attention and MLP after one LayerNorm) q, k, v, fc1,
    the activation, fc2 and so the whole residual stream then run, and are kept for backward,
    in fp32: twice the activation memory and fp32 elementwise work, for matmuls that autocast
    does in bf16 anyway. The norm still computes in fp32; only its output is rounded to bf16,
    as in a bf16 model without autocast. (Llama's RMSNorm and T5's norm return their input's
    dtype already.) Returns how many norms were hooked.
    """
    hooked = 0
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.register_forward_hook(_output_to_weight_dtype)
            hooked += 1
    return hooked


def _output_to_weight_dtype(module: nn.Module, args: tuple, output):
    if (torch.is_tensor(output) and output.dtype != module.weight.dtype
            and torch.is_autocast_enabled(output.device.type)):
        return output.to(module.weight.dtype)
    return None


def keep_cpu_weights_fixed(model: nn.Module) -> None:
    """Off: bitsandbytes' CPU fast path for eval (AVX512-BF16 machines). It repacks a 4-bit
    weight on its first eval forward and unpacks it on every state_dict(), lossily, so each
    evaluation + checkpoint nudged the frozen base and a resumed trial no longer matched."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def trainable_to_fp32(model: nn.Module) -> None:
    """Adapter weights and saved modules (lm_head) train in fp32: optimizer updates of a few
    1e-5 vanish in bf16's 8-bit mantissa. Autocast still runs their matmuls in bf16.

    Outside autocast (the Trainer generates for ROUGE without it) a converted module would
    get bf16 inputs for fp32 weights, so it casts its inputs to its own dtype. (peft does
    this itself for the LoRA layers, which it creates in fp32.)
    """
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype != torch.float32]
        if not params:
            continue
        for param in params:
            param.data = param.data.float()
        module.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


@dataclass(frozen=True)
class Architecture:
    """What the sweep needs to know about a model before any trial loads it."""

    model_type: str
    linear_modules: tuple[str, ...]  # leaf names of targetable nn.Linear layers
    target_sets: dict[str, tuple[str, ...]]  # named choices for the search
    task: str = tasks.SEQ2SEQ  # what its config implies (qlora_ray.tasks)

    def resolve_targets(self, choice: str) -> list[str]:
        """A named set ("qv") or explicit leaf names joined with '+' ("v+o")."""
        if choice in self.target_sets:
            return list(self.target_sets[choice])
        names = [n for n in choice.split("+") if n]
        unknown = [n for n in names if n not in self.linear_modules]
        if not names or unknown:
            raise ConfigError(
                f"unknown target module(s) {unknown or [choice]} for {self.model_type}; "
                f"named sets: {', '.join(self.target_sets)}; "
                f"modules (join with '+'): {', '.join(self.linear_modules)}"
            )
        return names


def discover_architecture(model: nn.Module) -> Architecture:
    linear: list[str] = []
    attention: list[str] = []
    for _, parent in model.named_modules():
        for leaf, child in parent.named_children():
            if not isinstance(child, nn.Linear) or leaf in _NEVER_TARGET:
                continue
            if leaf not in linear:
                linear.append(leaf)
            if "attention" in type(parent).__name__.lower() and leaf not in attention:
                attention.append(leaf)
    sets: dict[str, tuple[str, ...]] = {}
    query_value = [n for n in attention if n in _QUERY_VALUE]
    if query_value:
        sets["qv"] = tuple(query_value)
    if attention:
        sets["attention"] = tuple(attention)
    sets["all-linear"] = tuple(linear)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return Architecture(model_type=model_type, linear_modules=tuple(linear), target_sets=sets)


def inspect_architecture(path: str, settings: ModelSettings) -> Architecture:
    """Discover target modules from the config alone: the model is built on the meta device."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    except OSError as e:
        raise ConfigError(f"cannot load model config for {path!r}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = tasks.model_class(config).from_config(config, trust_remote_code=settings.trust_remote_code)
    return replace(discover_architecture(model), task=tasks.name_for(config))


def lora_config(r: int, lora_alpha: int, target_modules: list[str], settings: LoraSettings,
                task_type: str = "SEQ_2_SEQ_LM") -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=settings.dropout,
        bias=settings.bias,
        task_type=task_type,
        target_modules=target_modules,
        modules_to_save=list(settings.modules_to_save) or None,
    )


def checkpoint_feed_forward(model: nn.Module) -> int:
    """Recompute each feed-forward block in backward instead of keeping its activations.

    In T5-3b the FFN inner activations (16384 wide, after wi, relu and dropout) are most of
    a layer's saved activations, while the FFN's recompute is cheap next to full-layer
    gradient checkpointing (no attention, no LoRA). Returns how many blocks were wrapped.
    """
    from torch.utils.checkpoint import checkpoint

    wrapped = 0
    for module in model.modules():
        if type(module).__name__ not in _FEED_FORWARD_BLOCKS:
            continue
        forward = module.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        module.forward = checkpointed
        wrapped += 1
    return wrapped


# Feed-forward blocks whose activations checkpoint_feed_forward drops: T5's sublayer (norm + MLP +
# residual), the MLPs of Llama and Phi (their norm's output is kept; qlora_ray.memory models both).
_FEED_FORWARD_BLOCKS = {"T5LayerFF", "LlamaMLP", "PhiMLP"}
