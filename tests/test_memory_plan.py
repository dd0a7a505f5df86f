"""The sweep plans each trial by the memory estimator: too big at the configured micro-batch ->
smaller micro-batches (same effective batch); too big even at 1 -> the trial is skipped with the
reason, the sweep goes on. On this CPU machine a --memory-limit-gb stands in for the GPU's memory."""

from __future__ import annotations

import json

from transformers import AutoConfig

from qlora_ray import memory
from qlora_ray.config import load_config
from qlora_ray.model import resolve_model_path
from tests.conftest import run_cli
from tests.test_resume import PINNED, _results

HPARAMS = {"r": 4, "target_modules": "qv"}


def _predicted(micro: int) -> float:
    config = load_config()
    model_config = AutoConfig.from_pretrained(resolve_model_path(config.model))
    return memory.estimate_trial(model_config, config, HPARAMS, micro_batch_size=micro,
                                 compute_dtype="float32").total_gb


def test_a_trial_over_the_memory_limit_trains_at_a_smaller_micro_batch(tmp_path):
    limit = (_predicted(2) + _predicted(4)) / 2  # micro-batch 8 and 4 do not fit, 2 does
    proc = run_cli("--output-dir", str(tmp_path), *PINNED, "--batch-size", "8", "--memory-limit-gb", f"{limit:.6f}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training at micro-batch 2 x 4 accumulation" in proc.stdout + proc.stderr
    (rows,) = _results(tmp_path).values()
    assert [r["step"] for r in rows] == [4, 8, 12] and all(r["micro_batch_size"] == 2 for r in rows)


def test_a_trial_that_cannot_fit_is_skipped_with_the_reason(tmp_path):
    limit = _predicted(1) * 0.9
    proc = run_cli("--output-dir", str(tmp_path), *PINNED, "--memory-limit-gb", f"{limit:.6f}")
    assert proc.returncode == 1  # nothing to publish, but no crash: the sweep ran to its summary
    summary = json.loads(next((tmp_path / "sweeps").glob("*/summary.json")).read_text())
    assert summary["errored"] == 1 and not summary["leaderboard"]
    assert "exceeds the" in summary["failed"][0]["error"] and "GB limit" in summary["failed"][0]["error"]
    assert "predicted peak" in proc.stdout
