"""`qlora-ray estimate`: a trial's predicted peak memory from the sweep's own flags, no GPU needed."""

from __future__ import annotations

import subprocess
import sys

QLORA_RAY = [sys.executable, "-c", "from qlora_ray.registry_cli import main; raise SystemExit(main())"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*QLORA_RAY, "estimate", *args], capture_output=True, text=True, timeout=120)


def test_estimate_the_t5_3b_preset_and_plan_for_a_smaller_gpu():
    proc = run("--preset", "t5-3b-billsum", "--model", "google-t5/t5-3b", "--gpu-gb", "24")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "predicted peak" in line]
    assert len(rows) == 4 and all("fits 24 GB" in row for row in rows)  # v+o, qv, attention, all-linear
    assert "activations" in proc.stdout and "optimizer_paged" in proc.stdout  # the breakdown
    small = run("--preset", "t5-3b-billsum", "--model", "google-t5/t5-3b", "--gpu-gb", "8",
                "--target-modules", "all-linear")
    assert "8 GB: micro-batch" in small.stdout and "accumulation" in small.stdout


def test_a_causal_architecture_and_a_bad_model_name():
    proc = run("--model", "meta-llama/Llama-2-7b-hf", "--r", "64", "--target-modules", "all-linear",
               "--batch-size", "4", "--gradient-checkpointing", "full")
    assert proc.returncode == 0, proc.stderr
    assert "predicted peak" in proc.stdout
    bad = run("--model", "/nonexistent/model")
    assert bad.returncode == 2 and bad.stderr.startswith("qlora-ray: error:") and len(bad.stderr.splitlines()) == 1
