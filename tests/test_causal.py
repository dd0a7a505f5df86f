"""Causal LMs through the same sweep: a tiny random-weight Llama (built here from a config, with the
embedded tokenizer), TRL's SFTTrainer in real Tune trials, completion-only loss, ROUGE on greedy
completions, adapters published with the causal task type."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def tiny_llama(cache_dir, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_ray import embedded

    tokenizer = AutoTokenizer.from_pretrained(embedded.build_tiny_t5(cache_dir, progress=False))
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_causal_sweep_trains_evaluates_and_publishes(tiny_llama, tmp_path):
    config = tmp_path / "causal.yaml"
    config.write_text("lora:\n  modules_to_save: []\n")
    out = tmp_path / "runs"
    proc = run_cli("--config", str(config), "--model", str(tiny_llama), "--num-samples", "2", "--max-steps", "6",
                   "--eval-every", "3", "--train-size", "32", "--eval-size", "8", "--max-source-length", "64",
                   "--max-target-length", "16", "--target-modules", "qv,all-linear", "--address", "local",
                   "--output-dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(next((out / "sweeps").glob("*/summary.json")).read_text())
    assert summary["completed"] + summary["stopped_early"] == 2 and summary["errored"] == 0
    for row in summary["leaderboard"]:
        assert {"rougeL", "rouge1", "rouge2", "eval_loss"} <= row["best"].keys() and row["best"]["eval_loss"] > 0
    assert set(summary["base_metrics"]) >= {"rougeL", "eval_loss"}
    # training lowered the completion loss below the base's
    assert min(r["best"]["eval_loss"] for r in summary["leaderboard"]) < summary["base_metrics"]["eval_loss"]
    index = json.loads((out / "registry" / "index.json").read_text())
    assert len(index["adapters"]) == 2
    adapter_config = json.loads((out / "registry" / index["default"] / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert "serve run serve.app" in proc.stdout
