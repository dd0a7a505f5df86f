"""Shared fixtures: one embedded model/corpus cache and one real sweep per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUNE = [sys.executable, str(ROOT / "experiments" / "tune_t5.py")]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """The embedded tiny T5 and corpus, built once per session (the real build, not a stub)."""
    path = Path(os.environ.get("QLORA_RAY_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["QLORA_RAY_CACHE"] = str(path)
    from qlora_ray import embedded

    embedded.build_tiny_t5(path)
    return path


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_DEDUP_LOGS="0", **(env or {}))
    return subprocess.run([*TUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def custom_jsonl(cache_dir, tmp_path_factory) -> Path:
    """A user's own JSONL file with its own column names, cut from the embedded corpus."""
    from qlora_ray import embedded

    corpus = embedded.build_corpus(cache_dir)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()][:600]
    path = tmp_path_factory.mktemp("data") / "functions.jsonl"
    path.write_text("".join(json.dumps({"source_code": r["text"], "doc": r["summary"], "id": i}) + "\n"
                            for i, r in enumerate(rows)))
    return path


@pytest.fixture(scope="session")
def sweep(custom_jsonl, tmp_path_factory) -> dict:
    """A real sweep: local Ray cluster, Optuna + ASHA, 4-bit tiny T5, the user's JSONL via flags."""
    out = tmp_path_factory.mktemp("runs")
    args = (
        "--dataset", str(custom_jsonl), "--text-column", "source_code", "--summary-column", "doc",
        "--output-dir", str(out), "--num-samples", "4", "--max-steps", "40", "--eval-every", "10",
        "--eval-size", "24", "--train-size", "400", "--r", "4,16", "--lora-alpha", "16,64",
        "--learning-rate", "1e-3:8e-3", "--target-modules", "qv,all-linear", "--top-k", "3",
        # Its own Ray even when another instance runs on the machine (plain ray.init() would join that one).
        "--address", "local", "--mlflow", f"sqlite:///{out}/mlflow.db",
        # Not the default: trials stopped at a rung then ranked on part of the eval set, a path the tests check.
        "--eval-set", "growing",
    )
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary_files = list((out / "sweeps").glob("*/summary.json"))
    assert len(summary_files) == 1
    return {"out": out, "args": args, "proc": proc, "summary": json.loads(summary_files[0].read_text()),
            "index": json.loads((out / "registry" / "index.json").read_text())}
