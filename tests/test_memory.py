"""The memory estimator (qlora_ray.memory) against its own arithmetic, PEFT's parameter counts, 4-bit
models built on the CPU, the committed GPU measurements, and the calibration script's smoke run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from qlora_ray import memory
from qlora_ray.random_init import architecture_config

ROOT = Path(__file__).resolve().parents[1]
T5_3B = architecture_config("t5-3b")
LLAMA = architecture_config("meta-llama/Llama-2-7b-hf")
PHI = architecture_config("microsoft/phi-2")

TINY_T5 = {"model_type": "t5", "d_model": 64, "d_ff": 160, "d_kv": 16, "num_heads": 4, "num_layers": 2,
           "num_decoder_layers": 3, "vocab_size": 300, "decoder_start_token_id": 0, "pad_token_id": 0}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}
TINY_PHI = {"model_type": "phi", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 300}


def _seq2seq(cfg, **kw):
    return memory.estimate(cfg, **({"micro_batch_size": 8, "source_len": 512, "target_len": 64} | kw))


def _causal(cfg, **kw):
    return memory.estimate(cfg, **({"micro_batch_size": 4, "seq_len": 1024} | kw))


def _dynamic(e: memory.Estimate) -> int:
    return e.breakdown["activations"] + e.breakdown["transient"]


# ----------------------------------------------------------------------------- shape of the model


@pytest.mark.parametrize("ckpt", memory.CHECKPOINTING)
def test_monotonic_in_batch_and_length(ckpt):
    for est, key, values in [(_seq2seq, "micro_batch_size", [1, 2, 8, 32]), (_seq2seq, "source_len", [128, 512, 1024]),
                             (_seq2seq, "target_len", [16, 64, 256])]:
        totals = [est(T5_3B, gradient_checkpointing=ckpt, **{key: v}).allocated_bytes for v in values]
        assert totals == sorted(totals) and len(set(totals)) == len(totals), (key, totals)
    for cfg in (LLAMA, PHI):
        for key, values in [("micro_batch_size", [1, 2, 4, 8]), ("seq_len", [256, 512, 2048])]:
            totals = [_causal(cfg, gradient_checkpointing=ckpt, **{key: v}).allocated_bytes for v in values]
            assert totals == sorted(totals) and len(set(totals)) == len(totals), (cfg["model_type"], key, totals)


def test_activations_scale_linearly_without_checkpointing():
    one, eight = (_causal(LLAMA, micro_batch_size=b) for b in (1, 8))
    assert _dynamic(eight) == pytest.approx(8 * _dynamic(one), rel=0.02)


@pytest.mark.parametrize("cfg,est", [(T5_3B, _seq2seq), (LLAMA, _causal), (PHI, _causal)])
def test_checkpointing_reduces_activations(cfg, est):
    none, ff, full = (est(cfg, gradient_checkpointing=c, target_modules="all-linear") for c in memory.CHECKPOINTING)
    assert _dynamic(full) < _dynamic(ff) < _dynamic(none)
    assert full.breakdown["activations"] < 0.25 * none.breakdown["activations"]
    static = ("base_4bit", "quant_constants", "base_unquantized", "adapter", "gradients", "optimizer")
    assert all(none.breakdown[k] == ff.breakdown[k] == full.breakdown[k] for k in static)


def test_more_targets_and_rank_cost_more():
    qv, every = (_causal(LLAMA, target_modules=t) for t in ("qv", "all-linear"))
    assert every.trainable_params > qv.trainable_params and _dynamic(every) > _dynamic(qv)
    r8, r64 = (_causal(LLAMA, r=r) for r in (8, 64))
    assert r64.trainable_params == 8 * r8.trainable_params
    assert _dynamic(_causal(LLAMA, padded=True)) > _dynamic(_causal(LLAMA))
    assert _dynamic(_seq2seq(T5_3B, padded=True)) > _dynamic(_seq2seq(T5_3B))


def test_known_parameter_counts():
    # Published by peft's print_trainable_parameters for these recipes.
    assert _seq2seq(T5_3B, r=32, target_modules="v+o", modules_to_save=["lm_head"]).trainable_params == 56_492_032
    assert _causal(LLAMA, r=16, target_modules="all-linear").trainable_params == 39_976_960
    # The base: 0.5 byte per quantized weight; Llama-2-7B has 6,476,005,376 of them (all but embed and lm_head).
    assert _causal(LLAMA).breakdown["base_4bit"] == 6_476_005_376 // 2


# ----------------------------------------------------------------------------- optimizer arithmetic


def test_optimizer_bytes_exact():
    # Llama-2-7B, LoRA r=16 on q and v: 64 A (16 x 4096) and 64 B (4096 x 16) tensors of 65,536 elements.
    tensors = 128 * 65_536
    eight = _causal(LLAMA, r=16, target_modules="qv", optimizer="paged_adamw_8bit").breakdown
    # 8-bit: two uint8 states plus one fp32 absmax per 256 elements for each; < 100,000 elements: not paged.
    assert eight["optimizer"] == 2 * tensors + 2 * 4 * tensors // 256
    assert eight["optimizer_paged"] == 0
    thirty_two = _causal(LLAMA, r=16, target_modules="qv", optimizer="paged_adamw_32bit").breakdown
    assert thirty_two["optimizer"] == 8 * tensors and thirty_two["optimizer_paged"] == 0
    torch_adam = _causal(LLAMA, r=16, target_modules="qv", optimizer="adamw_torch").breakdown
    assert torch_adam["optimizer"] == 8 * tensors and torch_adam["optimizer_paged"] == 0
    # r=64: 262,144 elements per tensor: paged optimizers move the states to managed memory, not the absmax.
    big = 128 * 262_144
    paged8 = _causal(LLAMA, r=64, target_modules="qv", optimizer="paged_adamw_8bit").breakdown
    assert paged8["optimizer_paged"] == 2 * big and paged8["optimizer"] == 2 * 4 * big // 256
    paged32 = _causal(LLAMA, r=64, target_modules="qv", optimizer="paged_adamw_32bit").breakdown
    assert paged32["optimizer_paged"] == 8 * big == 4 * paged8["optimizer_paged"] and paged32["optimizer"] == 0
    plain8 = _causal(LLAMA, r=64, target_modules="qv", optimizer="adamw_8bit").breakdown
    assert plain8["optimizer"] == 2 * big + 2 * 4 * big // 256 and plain8["optimizer_paged"] == 0
    # Tensors under 4,096 elements keep 32-bit states even in an 8-bit optimizer: r=4, 64 wide -> 256.
    tiny = memory.estimate(TINY_LLAMA, micro_batch_size=1, seq_len=8, r=4, target_modules="q_proj",
                           optimizer="adamw_8bit").breakdown
    assert tiny["optimizer"] == 8 * 2 * (4 * 64 + 64 * 4)
    # Gradients and adapter weights are fp32.
    assert eight["gradients"] == eight["adapter"] == 4 * tensors


# ----------------------------------------------------------------------------- against PEFT and bitsandbytes


def _auto_config(d: dict):
    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


@pytest.mark.parametrize("cfg", [TINY_T5, TINY_LLAMA, TINY_PHI], ids=["t5", "llama", "phi"])
@pytest.mark.parametrize("choice,save", [("qv", []), ("attention", ["lm_head"]), ("all-linear", []),
                                         ("all-linear", ["lm_head"])])
def test_trainable_params_match_peft(cfg, choice, save):
    from peft import LoraConfig, get_peft_model

    from qlora_ray.model import discover_architecture

    seq2seq = cfg["model_type"] == "t5"
    torch.manual_seed(0)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(_auto_config(cfg))
    targets = discover_architecture(model).resolve_targets(choice)
    assert targets == memory.resolve_targets(cfg, choice)  # the sweep's named sets, read from the config alone
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=save or None,
                      task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    trainable, _ = get_peft_model(model, lora).get_nb_trainable_parameters()
    kw = {"source_len": 16, "target_len": 8} if seq2seq else {"seq_len": 16}
    assert memory.estimate(cfg, micro_batch_size=1, r=8, target_modules=choice, modules_to_save=save,
                           **kw).trainable_params == trainable


def _quant_state_bytes(model) -> int:
    import bitsandbytes as bnb

    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            parts = [qs.absmax, qs.code, qs.offset]
            if qs.nested:
                parts += [qs.state2.absmax, qs.state2.code]
            total += sum(t.numel() * t.element_size() for t in parts if torch.is_tensor(t))
    return total


def _load_4bit(cfg: dict, tmp_path, dtype: torch.dtype, double_quant: bool = True):
    from transformers import BitsAndBytesConfig

    seq2seq = cfg["model_type"] == "t5"
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    torch.manual_seed(0)
    cls.from_config(_auto_config(cfg)).save_pretrained(tmp_path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=dtype)
    return cls.from_pretrained(tmp_path, quantization_config=bnb, dtype=dtype, device_map={"": "cpu"})


@pytest.mark.parametrize("cfg", [TINY_T5, TINY_LLAMA, TINY_PHI], ids=["t5", "llama", "phi"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_base_bytes_match_a_4bit_model(cfg, dtype, double_quant, tmp_path):
    model = _load_4bit(cfg, tmp_path, getattr(torch, dtype), double_quant)
    kw = {"source_len": 16, "target_len": 8} if cfg["model_type"] == "t5" else {"seq_len": 16}
    b = memory.estimate(cfg, micro_batch_size=1, compute_dtype=dtype, double_quant=double_quant, **kw).breakdown
    # get_memory_footprint counts parameters and buffers: packed 4-bit weights and what stays unquantized
    # (to the byte, but for the rotary buffers, whose count varies with the transformers version).
    assert b["base_4bit"] + b["base_unquantized"] == pytest.approx(model.get_memory_footprint(), abs=256)
    assert b["quant_constants"] == _quant_state_bytes(model)


def test_base_bytes_of_the_project_load_path(tmp_path):
    """The trial's own loading (model.load_base_model, prepare_for_training) of the embedded T5."""
    from qlora_ray.config import ModelSettings
    from qlora_ray.model import load_base_model, prepare_for_training, resolve_model_path

    path = resolve_model_path(ModelSettings())
    cfg = json.loads((Path(path) / "config.json").read_text())
    for dtype in ("bfloat16", "float32", "float16"):
        settings = ModelSettings(compute_dtype=dtype)
        model = prepare_for_training(load_base_model(path, settings), settings, "none")
        b = memory.estimate(cfg, micro_batch_size=1, source_len=16, target_len=8, compute_dtype=dtype).breakdown
        assert b["base_4bit"] + b["base_unquantized"] == model.get_memory_footprint(), dtype


def test_t5_wo_stays_unquantized():
    b = _seq2seq(T5_3B).breakdown
    wo = 48 * 16384 * 1024
    shared = 32128 * 1024
    norms = 1024 * (2 * 24 + 1 + 3 * 24 + 1)
    assert b["base_unquantized"] == 2 * (wo + shared + norms + 2 * 32 * 32)
    # double quant: one byte per 64 weights (+ second-level scales and code books), ~1/32 of the packed weights
    assert b["quant_constants"] == pytest.approx(b["base_4bit"] / 32, rel=0.05)


# ----------------------------------------------------------------------------- against the GPU


def test_matches_committed_gpu_measurements():
    """bench/results/trial_throughput.json: the sweep's T5-3b preset on an H200, 11.05 GB peak allocated
    (batch 32, full checkpointing); NOTES-trial-speed.md: feed-forward checkpointing at batch 8, 21.1 GB."""
    measured = json.loads((ROOT / "bench" / "results" / "trial_throughput.json").read_text())["project"]["peak_gb"]
    preset = _seq2seq(T5_3B, micro_batch_size=32, source_len=1024, target_len=128, r=32, target_modules="v+o",
                      modules_to_save=["lm_head"], gradient_checkpointing="full")
    assert preset.allocated_gb == pytest.approx(measured, rel=0.10)
    ff = _seq2seq(T5_3B, micro_batch_size=8, source_len=1024, target_len=128, r=32, target_modules="v+o",
                  modules_to_save=["lm_head"], gradient_checkpointing="feed-forward")
    assert ff.allocated_gb == pytest.approx(21.1, rel=0.10)


# ----------------------------------------------------------------------------- placement helpers


def test_fits_and_plans_keep_the_effective_batch():
    kw = {"source_len": 1024, "target_len": 128, "r": 32, "target_modules": "v+o", "modules_to_save": ["lm_head"],
          "gradient_checkpointing": "full"}
    big = memory.estimate(T5_3B, micro_batch_size=32, **kw)
    assert big.fits(80) and not big.fits(8)
    assert big.total_bytes > big.allocated_bytes  # the context, managed memory and slack are on the GPU too
    plan = memory.plan_for(10, T5_3B, micro_batch_size=32, accumulation=2, **kw)
    assert plan.micro_batch_size * plan.accumulation == 64 and plan.micro_batch_size < 32
    assert plan.estimate.fits(10)
    assert not memory.estimate(T5_3B, micro_batch_size=2 * plan.micro_batch_size, **kw).fits(10)
    assert memory.plan_for(80, T5_3B, micro_batch_size=4, **kw).micro_batch_size == 4  # fits as asked
    assert memory.plan_for(2, T5_3B, micro_batch_size=8, **kw) is None  # not even the base fits
    largest = memory.largest_micro_batch(24, T5_3B, **kw)
    assert memory.estimate(T5_3B, micro_batch_size=largest, **kw).fits(24)
    assert not memory.estimate(T5_3B, micro_batch_size=largest + 1, **kw).fits(24)
    odd = memory.plan_for(6, T5_3B, micro_batch_size=12, accumulation=1, **kw)
    assert 12 % odd.micro_batch_size == 0 and odd.micro_batch_size * odd.accumulation == 12


def test_estimate_trial_reads_the_sweep_config():
    from qlora_ray.config import load_config

    config = load_config("t5-3b-billsum")
    hparams = {"r": 32, "lora_alpha": 16, "target_modules": "v+o", "learning_rate": 2e-5}
    direct = _seq2seq(T5_3B, micro_batch_size=32, source_len=1024, target_len=128, r=32, target_modules="v+o",
                      modules_to_save=["lm_head"], gradient_checkpointing="full")
    assert memory.estimate_trial(T5_3B, config, hparams).breakdown == direct.breakdown


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="not supported"):
        memory.estimate({"model_type": "gpt2"}, micro_batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="source_len"):
        memory.estimate(T5_3B, micro_batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="unknown target"):
        _causal(LLAMA, target_modules="q+v")
    with pytest.raises(ValueError, match="optimizer"):
        _causal(LLAMA, optimizer="sgd")
    with pytest.raises(ValueError, match="modules_to_save"):
        _causal(LLAMA, modules_to_save=["norm"])


def test_accepts_a_pretrained_config():
    assert _causal(_auto_config(LLAMA)).breakdown == _causal(LLAMA).breakdown
    assert math.isclose(_seq2seq(_auto_config(T5_3B)).total_gb, _seq2seq(T5_3B).total_gb)


# ----------------------------------------------------------------------------- the calibration script


def test_calibration_smoke(tmp_path):
    out = tmp_path / "memory_estimate.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_calibrate.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["date"] and doc["device"] == "cpu"
    assert len(doc["rows"]) == 3 and doc["summary"]["failed"] == []
    for row in doc["rows"]:
        assert row["predicted_gb"] > 0 and row["measured_gb"] is None and row["error_pct"] is None
        assert [s["step"] for s in row["steps"]] == [1, 2, 3]  # the optimizer really stepped
        assert row["trainable_params"] == row["predicted_trainable_params"]
