"""Bad CLI input fails before Ray starts: one line on stderr, exit 2, no traceback."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


def _assert_clean_failure(proc, expected: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Ray instance" not in proc.stdout + proc.stderr  # Ray never started


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--r", "0"], "LoRA r must be positive"),
        (["--r", "8,-4"], "LoRA r must be positive"),
        (["--learning-rate", "-1"], "learning_rate"),
        (["--metric", "bleu"], "unknown metric 'bleu'"),
        (["--dataset", "/nonexistent/data.jsonl"], "data file not found"),
        (["--config", "/nonexistent/sweep.yaml"], "config file not found"),
        (["--random-init"], "--random-init takes a hub id or a config"),
        (["--random-init", "--model", "/nonexistent/model"], "needs an architecture config"),
    ],
)
def test_cheap_errors(args, expected):
    _assert_clean_failure(run_cli(*args), expected)


def test_column_not_in_data(custom_jsonl):
    proc = run_cli("--dataset", str(custom_jsonl), "--text-column", "source_code", "--summary-column", "summary")
    _assert_clean_failure(proc, "column 'summary' (--summary-column) not in")
    assert "source_code" in proc.stderr  # the message lists the columns there are


def test_unknown_target_module(custom_jsonl):
    proc = run_cli("--dataset", str(custom_jsonl), "--text-column", "source_code", "--summary-column", "doc",
                   "--target-modules", "qv,q+nope")
    _assert_clean_failure(proc, "unknown target module(s) ['nope']")


def test_config_file_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search:\n  num_sample: 3\n")
    _assert_clean_failure(run_cli("--config", str(bad)), "unknown key(s) ['num_sample']")
