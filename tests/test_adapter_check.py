"""check_adapter against real PEFT adapters of the tiny T5, and broken copies of them."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qlora_ray.adapter_check import AdapterInvalid, BaseSpec, check_adapter

LORA = dict(r=4, lora_alpha=8, target_modules=["q", "v"], modules_to_save=["lm_head"])


def make_adapter(base_path, out: Path, **lora):
    """A real adapter: peft's get_peft_model on the 4-bit tiny T5, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    from qlora_ray.config import ModelSettings
    from qlora_ray.model import load_base_model

    model = get_peft_model(load_base_model(str(base_path), ModelSettings()),
                           LoraConfig(task_type="SEQ_2_SEQ_LM", **lora))
    model.save_pretrained(str(out))
    return model


@pytest.fixture(scope="module")
def base_path(cache_dir) -> Path:
    from qlora_ray import embedded

    return embedded.build_tiny_t5(cache_dir)


@pytest.fixture(scope="module")
def spec(base_path) -> BaseSpec:
    return BaseSpec.from_config(str(base_path))


@pytest.fixture(scope="module")
def good(base_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "good"
    return out, make_adapter(base_path, out, **LORA)


def _variant(tmp_path, good_dir: Path, *, config=None, tensors=None) -> Path:
    """A copy of the good adapter with its config and/or tensors edited."""
    out = tmp_path / "variant"
    shutil.copytree(good_dir, out)
    if config:
        data = json.loads((out / "adapter_config.json").read_text())
        config(data)
        (out / "adapter_config.json").write_text(json.dumps(data))
    if tensors:
        weights = load_file(str(out / "adapter_model.safetensors"))
        tensors(weights)
        save_file(weights, str(out / "adapter_model.safetensors"))
    return out


def test_good_adapter_passes(good, spec, base_path):
    directory, peft_model = good
    checked = check_adapter(directory, spec)
    peft_layers = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
                   if hasattr(m, "lora_A") and hasattr(m, "scaling")}
    assert set(checked.modules) == set(peft_layers) and len(checked.modules) == 24  # q, v of 4+4 self + 4 cross
    q = checked.modules["decoder.block.0.layer.1.EncDecAttention.q"]
    assert q.r == 4 and q.scaling == 2.0
    assert q.a_key == "base_model.model.decoder.block.0.layer.1.EncDecAttention.q.lora_A.weight"
    assert q.b_key == "base_model.model.decoder.block.0.layer.1.EncDecAttention.q.lora_B.weight"
    for path, module in checked.modules.items():
        assert module.scaling == peft_layers[path].scaling["default"]
    assert checked.saved_modules == {"lm_head": "base_model.model.lm_head.weight"}
    assert checked.base_model_name == str(base_path)
    assert checked.file_bytes == (directory / "adapter_model.safetensors").stat().st_size
    assert checked.config["r"] == 4


def test_base_spec_from_loaded_model_matches_config(good, spec):
    _, peft_model = good  # 4-bit Linear4bit layers wrapped by peft: still the base's logical shapes
    loaded = BaseSpec.from_model(peft_model, spec.name)
    assert loaded == spec
    assert spec.model_type == "t5" and spec.linear["lm_head"] == (128, 4096)
    assert spec.linear["encoder.block.0.layer.1.DenseReluDense.wi"] == (128, 512)


def test_patterns_rslora_regex_targets_and_exclude(base_path, spec, tmp_path):
    lora = dict(r=4, lora_alpha=8, use_rslora=True, target_modules=r".*SelfAttention\.(q|v)",
                rank_pattern={"v": 2}, alpha_pattern={"q": 16},
                exclude_modules=["encoder.block.0.layer.0.SelfAttention.q"])
    peft_model = make_adapter(base_path, tmp_path / "patterns", **lora)
    checked = check_adapter(tmp_path / "patterns", spec)
    peft_layers = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
                   if hasattr(m, "lora_A") and hasattr(m, "scaling")}
    assert set(checked.modules) == set(peft_layers) and len(checked.modules) == 15
    assert "encoder.block.0.layer.0.SelfAttention.q" not in checked.modules
    v = checked.modules["encoder.block.1.layer.0.SelfAttention.v"]
    q = checked.modules["decoder.block.3.layer.0.SelfAttention.q"]
    assert (v.r, v.scaling) == (2, 8 / math.sqrt(2)) and (q.r, q.scaling) == (4, 16 / 2)
    for path, module in checked.modules.items():
        assert module.r == peft_layers[path].r["default"]
        assert module.scaling == pytest.approx(peft_layers[path].scaling["default"])
    assert checked.saved_modules == {}


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _drop(key):
    return lambda t: t.pop(key)


Q0 = "base_model.model.decoder.block.0.layer.0.SelfAttention.q"


def _rename_q(t):
    for key in [k for k in t if ".SelfAttention.q." in k]:
        t[key.replace(".SelfAttention.q.", ".SelfAttention.q_proj.")] = t.pop(key)


@pytest.mark.parametrize("config, tensors, reason", [
    (_set("r", 8), None, "rank 4 in the weights, but adapter_config.json says r=8"),
    (_set("target_modules", ["q_proj", "v"]), _rename_q, "not a linear module of the base"),
    (None, lambda t: t.__setitem__(f"{Q0}.lora_magnitude_vector", t[f"{Q0}.lora_A.weight"][0].clone()),
     "unknown weight 'base_model.model.decoder.block.0.layer.0.SelfAttention.q.lora_magnitude_vector'"),
    (None, lambda t: t.__setitem__("encoder.extra", t["base_model.model.lm_head.weight"][:1].clone()),
     "unknown weight 'encoder.extra'"),
    (None, _drop(f"{Q0}.lora_B.weight"), "SelfAttention.q' has no lora_B weight"),
    (None, lambda t: [t.pop(f"{Q0}.lora_{x}.weight") for x in "AB"],
     "selects 'decoder.block.0.layer.0.SelfAttention.q', but the weights have no LoRA for it"),
    (_set("target_modules", ["q"]), None, "which target_modules ['q'] does not select"),
    (None, _drop("base_model.model.lm_head.weight"), "modules_to_save lists 'lm_head'"),
    (_set("modules_to_save", None), None, "replaces 'lm_head', but modules_to_save does not list it"),
    (None, lambda t: t.__setitem__(f"{Q0}.lora_A.weight", t[f"{Q0}.lora_A.weight"][:, :64].contiguous()),
     "lora_A has shape [4, 64], the base module needs [4, 128]"),
    (None, lambda t: t.__setitem__(f"{Q0}.lora_A.weight", t[f"{Q0}.lora_A.weight"].int()),
     "has dtype I32; adapter weights must be floating point"),
    (_set("use_dora", True), None, "DoRA (use_dora) is not supported"),
    (_set("bias", "all"), None, "bias='all'"),
    (_set("lora_bias", True), None, "lora_bias"),
    (_set("fan_in_fan_out", True), None, "fan_in_fan_out"),
    (_set("layers_to_transform", [0]), None, "layers_to_transform is not supported"),
    (_set("trainable_token_indices", [1, 2]), None, "trainable_token_indices"),
    (_set("init_lora_weights", "pissa"), None, "init_lora_weights='pissa' changes the base weights"),
    (_set("some_future_option", 3), None, "unknown LoRA option some_future_option=3"),
    (_set("task_type", "CAUSAL_LM"), None, "task_type 'CAUSAL_LM' does not fit a seq2seq base"),
    (_set("peft_type", "IA3"), None, "only LoRA adapters"),
])
def test_broken_adapters_rejected_with_reason(good, spec, tmp_path, config, tensors, reason):
    directory = _variant(tmp_path, good[0], config=config, tensors=tensors)
    with pytest.raises(AdapterInvalid) as e:
        check_adapter(directory, spec)
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_truncated_weights(good, spec, tmp_path):
    directory = _variant(tmp_path, good[0])
    weights = directory / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    with pytest.raises(AdapterInvalid, match="adapter_model.safetensors is truncated: its tensors need"):
        check_adapter(directory, spec)
    with open(weights, "r+b") as f:
        f.truncate(20)  # inside the header
    with pytest.raises(AdapterInvalid, match="is truncated: its header needs"):
        check_adapter(directory, spec)
    with open(weights, "ab") as f:
        f.write(b"x" * 10_000_000)  # the header fits again; now there is data past the last tensor or a gap
    with pytest.raises(AdapterInvalid, match="adapter_model.safetensors"):
        check_adapter(directory, spec)


def test_trailing_bytes(good, spec, tmp_path):
    directory = _variant(tmp_path, good[0])
    with open(directory / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(AdapterInvalid, match="16 bytes after its last tensor"):
        check_adapter(directory, spec)


def test_pickle_only(good, spec, tmp_path):
    directory = _variant(tmp_path, good[0])
    os.rename(directory / "adapter_model.safetensors", directory / "adapter_model.bin")
    with pytest.raises(AdapterInvalid, match="adapter_model.bin: pickle weights are not loaded; convert to safet"):
        check_adapter(directory, spec)


def test_oversize(good, spec):
    with pytest.raises(AdapterInvalid, match=r"adapter_model.safetensors is 2.1 MiB, over the limit of 1000 bytes"):
        check_adapter(good[0], spec, max_bytes=1000)


def test_config_not_json(good, spec, tmp_path):
    directory = _variant(tmp_path, good[0])
    (directory / "adapter_config.json").write_text("{'r': 4,")
    with pytest.raises(AdapterInvalid, match="adapter_config.json is not valid JSON"):
        check_adapter(directory, spec)
    (directory / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterInvalid, match="must hold a JSON object"):
        check_adapter(directory, spec)


def test_missing_pieces_and_symlinks(good, spec, tmp_path):
    with pytest.raises(AdapterInvalid, match="no adapter directory at"):
        check_adapter(tmp_path / "nowhere", spec)
    directory = _variant(tmp_path, good[0])
    (directory / "adapter_config.json").unlink()
    with pytest.raises(AdapterInvalid, match="no adapter_config.json in"):
        check_adapter(directory, spec)
    shutil.copy(good[0] / "adapter_config.json", tmp_path / "elsewhere.json")
    (directory / "adapter_config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(AdapterInvalid, match="adapter_config.json is a symlink"):
        check_adapter(directory, spec)
    (directory / "adapter_config.json").unlink()
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterInvalid, match="no adapter_model.safetensors in"):
        check_adapter(directory, spec)


def test_other_base_shapes_rejected(good, spec):
    """The same module names with other sizes (a wider model of the same family) fail on shape."""
    wider = BaseSpec(name="wider", model_type="t5",
                     linear={p: (i * 2, o * 2) for p, (i, o) in spec.linear.items()})
    with pytest.raises(AdapterInvalid, match=r"lora_A has shape \[4, 128\], the base module needs \[4, 256\]"):
        check_adapter(good[0], wider)


def test_base_spec_from_missing_config(tmp_path):
    with pytest.raises(ValueError, match="cannot build base model") as e:
        BaseSpec.from_config(str(tmp_path / "no-model"))
    assert "\n" not in str(e.value)
