"""Check a PEFT LoRA adapter directory against a base model before anything loads it.

`check_adapter` reads `adapter_config.json` and the safetensors header only (no tensor is
loaded, nothing is unpickled) and answers either a `CheckedAdapter` describing every LoRA
module and saved module, or `AdapterInvalid` with a one-line reason a person can act on.

What passes is a plain LoRA adapter (peft_type LORA, the base's task type or none) whose weights
are exactly those peft would save for its config on this base: `lora_A` [r, in] and
`lora_B` [out, r] for every linear module `target_modules` selects (peft's matching rules),
and full `[out, in]` weights for linear `modules_to_save`. Options that change the math
(DoRA, biases, layer selection, variants, base-modifying initializations, ...) are refused
by name, as is anything unknown with a non-default value.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# init_lora_weights values that leave the base weights as they are (the adapter is all there is).
PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal"}

# LoraConfig fields (peft 0.21) that do not change what a saved adapter computes at inference.
_NEUTRAL = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
    "modules_to_save", "init_lora_weights", "rank_pattern", "alpha_pattern", "use_rslora", "bias",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "runtime_config",
}
# Fields that change the math (or the base) when set to anything but their default: refused by name.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights) is not supported",
    "layers_to_transform": "layers_to_transform is not supported",
    "layers_pattern": "layers_pattern is not supported",
    "target_parameters": "target_parameters (LoRA on parameters) is not supported",
    "trainable_token_indices": "trainable_token_indices (trainable tokens) is not supported",
    "megatron_config": "megatron_config is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "layer_replication": "layer_replication changes the base's layers; not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "ensure_weight_tying": "ensure_weight_tying (saved modules tied to the input embeddings) is not supported",
}


class AdapterInvalid(ValueError):
    """An adapter that must not be loaded; str(e) is a one-line reason a human can act on."""


@dataclass(frozen=True)
class BaseSpec:
    """What an adapter is checked against: the base's linear modules and their shapes."""

    name: str  # the registry's base_model (local path or hub id)
    model_type: str  # config.model_type
    linear: dict[str, tuple[int, int]]  # module path -> (in_features, out_features), incl. "lm_head"
    task_type: str = "SEQ_2_SEQ_LM"  # the PEFT task type its adapters have: SEQ_2_SEQ_LM or CAUSAL_LM

    @classmethod
    def from_model(cls, model, name: str) -> BaseSpec:
        """From a loaded model (4-bit bitsandbytes layers keep their logical in/out features).

        A PeftModel is looked through: its LoRA layers count as their base layers and its
        saved-module wrappers as their original modules.
        """
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        linear: dict[str, tuple[int, int]] = {}
        _collect_linear(model, "", linear)
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None) or type(model).__name__
        task_type = "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"
        return cls(name=name, model_type=model_type, linear=linear, task_type=task_type)

    @classmethod
    def from_config(cls, path: str, *, trust_remote_code: bool = False) -> BaseSpec:
        """From the base's config alone: the model is built on the meta device, no weights are read.

        Raises ValueError (one line) when the config cannot be read.
        """
        import torch
        from transformers import AutoConfig

        from qlora_ray import tasks

        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                model = tasks.model_class(config).from_config(config, trust_remote_code=trust_remote_code)
        except Exception as e:  # a missing or unreadable config, an unknown architecture
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot build base model {path!r} from its config: {reason}") from None
        return cls.from_model(model, path)


def _collect_linear(module, prefix: str, out: dict[str, tuple[int, int]]) -> None:
    from torch import nn

    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if hasattr(child, "base_layer") and hasattr(child, "lora_A"):  # a peft LoRA layer
            child = child.base_layer
        elif hasattr(child, "original_module") and hasattr(child, "modules_to_save"):  # ModulesToSaveWrapper
            child = child.original_module
        in_f, out_f = getattr(child, "in_features", None), getattr(child, "out_features", None)
        leaf = next(iter(child.children()), None) is None
        if isinstance(in_f, int) and isinstance(out_f, int) and (isinstance(child, nn.Linear) or leaf):
            out[path] = (in_f, out_f)
        else:
            _collect_linear(child, f"{path}.", out)


@dataclass(frozen=True)
class LoraModule:
    path: str  # module path in the base, e.g. "decoder.block.0.layer.0.SelfAttention.q"
    r: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    a_key: str  # tensor name of lora_A, shape [r, in]
    b_key: str  # tensor name of lora_B, shape [out, r]


@dataclass(frozen=True)
class CheckedAdapter:
    directory: Path
    config: dict  # adapter_config.json
    modules: dict[str, LoraModule]  # by module path
    saved_modules: dict[str, str]  # full replacement weights (modules_to_save): module path -> tensor name
    base_model_name: str | None  # adapter_config's base_model_name_or_path
    file_bytes: int


def check_adapter(directory, base: BaseSpec, *, max_bytes: int = 2 * 1024**3) -> CheckedAdapter:
    """Validate `directory` against `base`; raises AdapterInvalid with the first problem found."""
    directory = Path(directory)
    if not directory.exists():
        raise AdapterInvalid(f"no adapter directory at {directory}")
    if not directory.is_dir():
        raise AdapterInvalid(f"{directory} is not a directory")
    weights_path = directory / WEIGHTS_FILE
    if not os.path.lexists(weights_path):
        pickles = [n for n in PICKLE_FILES if (directory / n).exists()]
        if pickles:
            raise AdapterInvalid(f"{pickles[0]}: pickle weights are not loaded; convert to safetensors "
                                 f"(save_pretrained(..., safe_serialization=True))")
        raise AdapterInvalid(f"no {WEIGHTS_FILE} in {directory}")
    config_path = directory / CONFIG_FILE
    if not os.path.lexists(config_path):
        raise AdapterInvalid(f"no {CONFIG_FILE} in {directory}")
    weights_stat = _regular_file(weights_path)
    config_stat = _regular_file(config_path)
    if weights_stat.st_size > max_bytes:
        raise AdapterInvalid(f"{WEIGHTS_FILE} is {_size(weights_stat.st_size)}, over the limit of {_size(max_bytes)}")
    if config_stat.st_size > MAX_CONFIG_BYTES:
        raise AdapterInvalid(f"{CONFIG_FILE} is {_size(config_stat.st_size)}, over the limit of "
                             f"{_size(MAX_CONFIG_BYTES)}")

    config = _read_config(config_path)
    settings = _lora_settings(config, base)
    header, file_bytes = read_safetensors_header(weights_path)
    modules, saved = _match_weights(header, config, settings, base)
    base_name = config.get("base_model_name_or_path")
    return CheckedAdapter(
        directory=directory,
        config=config,
        modules=modules,
        saved_modules=saved,
        base_model_name=base_name if isinstance(base_name, str) and base_name else None,
        file_bytes=file_bytes,
    )


def _regular_file(path: Path) -> os.stat_result:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise AdapterInvalid(f"{path.name} is a symlink; adapters must hold the real files")
    if not stat.S_ISREG(st.st_mode):
        raise AdapterInvalid(f"{path.name} is not a regular file")
    return st


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _read_config(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterInvalid(f"{CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{CONFIG_FILE} must hold a JSON object, not {type(config).__name__}")
    return config


@dataclass(frozen=True)
class _Settings:
    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict
    targets: list[str] | str
    exclude: list[str] | str | None
    modules_to_save: list[str]


def _is_default(value) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _lora_settings(config: dict, base: BaseSpec) -> _Settings:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterInvalid(f"peft_type is {peft_type!r}; only LoRA adapters (peft_type LORA) are supported")
    task_type = config.get("task_type")
    if task_type not in (None, base.task_type):
        kind = "seq2seq" if base.task_type == "SEQ_2_SEQ_LM" else "causal LM"
        raise AdapterInvalid(f"task_type {task_type!r} does not fit a {kind} base; expected {base.task_type}")
    for name, reason in _UNSUPPORTED.items():
        if not _is_default(config.get(name)):
            raise AdapterInvalid(f"{reason} ({name}={_short(config[name])})")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterInvalid(f"bias={bias!r} trains the base's biases; only bias='none' is supported")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        if isinstance(init, str) and init.lower() == "mica":
            raise AdapterInvalid("init_lora_weights='mica' is a LoRA variant (MiCA); not supported")
        raise AdapterInvalid(
            f"init_lora_weights={init!r} changes the base weights; save the adapter with "
            "path_initial_model_for_weight_conversion to get a plain LoRA adapter"
        )
    unknown = sorted(k for k in config if k not in _NEUTRAL and k not in _UNSUPPORTED and not _is_default(config[k]))
    if unknown:
        raise AdapterInvalid(f"unknown LoRA option {unknown[0]}={_short(config[unknown[0]])}; not supported")

    r = config.get("r")
    if not _positive_int(r):
        raise AdapterInvalid(f"r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not _number(alpha):
        raise AdapterInvalid(f"lora_alpha must be a number, got {alpha!r}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterInvalid(f"use_rslora must be true or false, got {use_rslora!r}")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(_positive_int(v) for v in rank_pattern.values()):
        raise AdapterInvalid(f"rank_pattern must map module patterns to positive integers, got {rank_pattern!r}")
    if not isinstance(alpha_pattern, dict) or not all(_number(v) for v in alpha_pattern.values()):
        raise AdapterInvalid(f"alpha_pattern must map module patterns to numbers, got {alpha_pattern!r}")
    for pattern in [*rank_pattern, *alpha_pattern]:
        _regex(pattern, "rank_pattern/alpha_pattern key")

    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            _regex(targets, "target_modules")
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise AdapterInvalid(f"target_modules must be a list of module names or a regex, got {targets!r}")
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        _regex(exclude, "exclude_modules")
    elif exclude is not None and not (isinstance(exclude, list) and all(isinstance(t, str) for t in exclude)):
        raise AdapterInvalid(f"exclude_modules must be a list of module names or a regex, got {exclude!r}")
    to_save = config.get("modules_to_save") or []
    if not (isinstance(to_save, list) and all(isinstance(m, str) and m for m in to_save)):
        raise AdapterInvalid(f"modules_to_save must be a list of module names, got {to_save!r}")
    for name in to_save:
        _regex(name, "modules_to_save name")  # peft matches them as regular expressions too
    return _Settings(r=r, alpha=alpha, use_rslora=use_rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                     targets=targets, exclude=exclude or None, modules_to_save=to_save)


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _regex(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise AdapterInvalid(f"{what} {pattern!r} is not a valid regular expression ({e})") from None


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensors of a safetensors file ({name: {"dtype", "shape", "data_offsets"}}) and its size.

    Reads the 8-byte length and the JSON header only; checks that the data section is exactly
    as long as the header says (a truncated or padded file fails) and that every tensor's
    bytes fit its dtype and shape, without gaps or overlaps.
    """
    name = path.name
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        if size < 8:
            raise AdapterInvalid(f"{name} is truncated ({size} bytes, not even a safetensors header)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise AdapterInvalid(f"{name} is not a safetensors file (header length {n} is implausible)")
        if 8 + n > size:
            raise AdapterInvalid(f"{name} is truncated: its header needs {n} bytes, the file has {size - 8}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterInvalid(f"{name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterInvalid(f"{name} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in info["data_offsets"])
                and info["data_offsets"][0] <= info["data_offsets"][1]):
            raise AdapterInvalid(f"{name}: malformed header entry for tensor {key!r}")
        spans.append((info["data_offsets"][0], info["data_offsets"][1], key))
    end = max((s[1] for s in spans), default=0)
    if end > data_len:
        raise AdapterInvalid(f"{name} is truncated: its tensors need {end} bytes of data, the file has {data_len}")
    if end < data_len:
        raise AdapterInvalid(f"{name} has {data_len - end} bytes after its last tensor (not a valid safetensors file)")
    for key, info in sorted(header.items()):
        if info["dtype"] not in FLOAT_DTYPES:
            raise AdapterInvalid(f"tensor {key!r} has dtype {info['dtype']}; adapter weights must be floating point "
                                 f"({', '.join(FLOAT_DTYPES)})")
        begin, stop = info["data_offsets"]
        if stop - begin != math.prod(info["shape"]) * FLOAT_DTYPES[info["dtype"]]:
            raise AdapterInvalid(f"{name}: tensor {key!r} has {stop - begin} bytes, not what its shape "
                                 f"{info['shape']} and dtype {info['dtype']} need")
    position = 0
    for begin, stop, key in sorted(spans):
        if begin != position:
            raise AdapterInvalid(f"{name}: tensor {key!r} overlaps another or leaves a gap in the data")
        position = stop
    return header, size


def _selected_targets(settings: _Settings, base: BaseSpec) -> set[str]:
    """The base's linear modules peft puts LoRA on for this config (peft 0.21's check_target_module_exists)."""
    targets, exclude = settings.targets, settings.exclude
    chosen = set()
    for path in base.linear:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, path):
                continue
        elif exclude and (path in exclude or any(path.endswith(f".{e}") for e in exclude)):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in settings.modules_to_save):
            continue  # peft never puts LoRA on a saved module
        if targets == "all-linear":
            found = path != "lm_head" and not path.endswith(".lm_head")  # peft leaves the output layer out
        elif isinstance(targets, str):
            found = re.fullmatch(targets, path) is not None
        else:
            found = path in targets or any(path.endswith(f".{t}") for t in targets)
        if found:
            chosen.add(path)
    return chosen


def _pattern_value(patterns: dict, path: str, default):
    """peft's get_pattern_key: the first pattern whose regex matches the path's end at a module boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _match_weights(header: dict, config: dict, settings: _Settings, base: BaseSpec):
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    saved: dict[str, str] = {}
    for key in sorted(header):
        if not key.startswith(KEY_PREFIX):
            raise AdapterInvalid(f"unknown weight {key!r}: adapter weights are named '{KEY_PREFIX}<module>...'")
        rest = key[len(KEY_PREFIX):]
        for suffix, found in ((".lora_A.weight", a_keys), (".lora_B.weight", b_keys)):
            if rest.endswith(suffix):
                path = rest[: -len(suffix)]
                if path not in base.linear:
                    raise AdapterInvalid(f"weight {key!r} is for {path!r}, which is not a linear module of "
                                         f"the base {base.name!r} ({base.model_type})")
                found[path] = key
                break
        else:
            if not rest.endswith(".weight"):
                raise AdapterInvalid(f"unknown weight {key!r} (only lora_A/lora_B weights and linear modules_to_save "
                                     "weights are supported)")
            path = rest[: -len(".weight")]
            if path not in base.linear:
                raise AdapterInvalid(f"unknown weight {key!r}: {path!r} is not a linear module of the base "
                                     f"{base.name!r} ({base.model_type})")
            if not any(path.endswith(m) for m in settings.modules_to_save):
                raise AdapterInvalid(f"weight {key!r} replaces {path!r}, but modules_to_save does not list it")
            saved[path] = key

    for path in sorted(a_keys.keys() ^ b_keys.keys()):
        missing = "lora_B" if path in a_keys else "lora_A"
        raise AdapterInvalid(f"{path!r} has no {missing} weight ({KEY_PREFIX}{path}.{missing}.weight)")
    selected = _selected_targets(settings, base)
    if not selected:
        raise AdapterInvalid(f"target_modules {settings.targets!r} selects no linear module of the base "
                             f"{base.name!r} ({base.model_type})")
    extra = sorted(a_keys.keys() - selected)
    if extra:
        raise AdapterInvalid(f"LoRA weights for {extra[0]!r}, which target_modules {settings.targets!r} "
                             "does not select")
    missing = sorted(selected - a_keys.keys())
    if missing:
        raise AdapterInvalid(f"target_modules {settings.targets!r} selects {missing[0]!r}, but the weights have no "
                             f"LoRA for it ({len(missing)} module(s) missing)")
    for name in settings.modules_to_save:
        matching = [p for p in base.linear if p.endswith(name)]
        if not matching:
            raise AdapterInvalid(f"modules_to_save {name!r} is not a linear module of the base {base.name!r} "
                                 f"(only linear modules_to_save are supported)")
        for path in matching:
            if path not in saved:
                raise AdapterInvalid(f"modules_to_save lists {name!r}, but the weights have no "
                                     f"{KEY_PREFIX}{path}.weight")

    modules: dict[str, LoraModule] = {}
    for path in sorted(a_keys):
        in_f, out_f = base.linear[path]
        r = _pattern_value(settings.rank_pattern, path, settings.r)
        alpha = _pattern_value(settings.alpha_pattern, path, settings.alpha)
        a_shape, b_shape = header[a_keys[path]]["shape"], header[b_keys[path]]["shape"]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterInvalid(f"{path!r}: lora_A/lora_B must be 2-D, got {a_shape} and {b_shape}")
        if a_shape[0] != r or b_shape[1] != r:
            raise AdapterInvalid(f"{path!r}: rank {a_shape[0]} in the weights, but adapter_config.json says "
                                 f"r={r}" + (" (rank_pattern)" if r != settings.r else ""))
        if a_shape != [r, in_f]:
            raise AdapterInvalid(f"{path!r}: lora_A has shape {a_shape}, the base module needs [{r}, {in_f}]")
        if b_shape != [out_f, r]:
            raise AdapterInvalid(f"{path!r}: lora_B has shape {b_shape}, the base module needs [{out_f}, {r}]")
        scaling = alpha / math.sqrt(r) if settings.use_rslora else alpha / r
        modules[path] = LoraModule(path=path, r=r, scaling=float(scaling), a_key=a_keys[path], b_key=b_keys[path])
    for path, key in saved.items():
        in_f, out_f = base.linear[path]
        if header[key]["shape"] != [out_f, in_f]:
            raise AdapterInvalid(f"saved module {path!r} has shape {header[key]['shape']}, the base's is "
                                 f"[{out_f}, {in_f}]")
    return modules, saved
