"""Optuna's search plots from a sweep's trial rows: real optuna, plotly and matplotlib."""

from __future__ import annotations

import warnings

import optuna
import pytest

from qlora_ray.config import SearchSettings
from qlora_ray.plots import PLOT_DIR, PLOTS, build_study, write_search_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(trial_id, r, alpha, lr, targets, best, status="completed"):
    return {"trial_id": trial_id, "status": status, "best": best,
            "hyperparameters": {"r": r, "lora_alpha": alpha, "learning_rate": lr, "target_modules": targets}}


def metrics(rouge_l, loss, step=60):
    return {"rougeL": rouge_l, "rouge1": rouge_l and rouge_l + 0.05, "rouge2": rouge_l and rouge_l / 2,
            "eval_loss": loss, "step": step}


@pytest.fixture
def rows():
    return [
        row("a_00000", 4, 8, 3.1e-4, "qv", metrics(0.21, 3.2)),
        row("a_00001", 16, 32, 1.2e-3, "all-linear", metrics(0.34, 2.1, 240)),
        row("a_00002", 8, 64, 4.4e-3, "attention", metrics(0.29, 2.4, 120), status="stopped early"),
        row("a_00003", 32, 16, 7.0e-4, "qv", metrics(None, 2.9)),  # NaN rougeL, stored as None
        row("a_00004", 16, 64, 2.5e-3, "attention", None, status="error"),  # failed before its first eval
        row("a_00005", 4, 32, 9.0e-4, "all-linear", metrics(0.25, 2.7, 60), status="stopped early"),
        row("a_00006", 32, 8, 1.9e-3, "attention", metrics(0.31, 2.2, 240)),
    ]


def files(out_dir):
    return {f"{stem}{suffix}": out_dir / PLOT_DIR / f"{stem}{suffix}" for stem in PLOTS for suffix in (".html", ".png")}


def assert_all_drawn(out_dir, lines):
    for name, path in files(out_dir).items():
        assert path.is_file(), name
        if name.endswith(".png"):
            data = path.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
            assert f"![{PLOTS[path.stem]}]({PLOT_DIR}/{name})" in lines
        else:
            html = path.read_text()
            assert '<script charset="utf-8" src="plotly.min.js">' in html
            assert len(html) < 200_000  # the plotly bundle is not inlined
            assert any(f"({PLOT_DIR}/{name})" in line for line in lines)
    bundle = out_dir / PLOT_DIR / "plotly.min.js"
    assert bundle.is_file() and bundle.stat().st_size > 1_000_000


def test_all_plots_drawn_for_a_normal_sweep(rows, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of Optuna's leaks out (ExperimentalWarning included)
        lines = write_search_plots(rows, SearchSettings(), tmp_path)
    assert lines[0] == "## Search plots"
    assert not any("not drawn" in line for line in lines), lines
    assert_all_drawn(tmp_path, lines)
    out = capsys.readouterr()
    assert "A new study created" not in out.out + out.err
    assert optuna.logging.get_verbosity() == optuna.logging.INFO  # restored


def test_study_marks_trials_without_a_finite_value_failed(rows):
    study = build_study(rows, SearchSettings())
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 5
    assert states[3] == states[4] == optuna.trial.TrialState.FAIL
    assert study.best_trial.user_attrs["trial_id"] == "a_00001" and study.best_value == 0.34
    assert set(study.trials[0].distributions) == {"r", "lora_alpha", "learning_rate", "target_modules"}
    assert study.trials[0].distributions["learning_rate"].log


def test_minimizing_eval_loss(rows, tmp_path):
    search = SearchSettings(metric="eval_loss", mode="min")
    lines = write_search_plots(rows, search, tmp_path)
    assert_all_drawn(tmp_path, lines)
    study = build_study(rows, search)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.best_trial.user_attrs["trial_id"] == "a_00001"
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 6  # trial 3 has a loss


def test_a_single_finite_trial_is_skipped_with_reasons(rows, tmp_path):
    lines = write_search_plots(rows[3:5] + rows[:1], SearchSettings(), tmp_path)
    skipped = [line for line in lines if "not drawn" in line]
    assert len(skipped) == 3
    assert all("1 trial(s) with a finite rougeL, at least 2 needed" in line for line in skipped)
    assert not any(path.exists() for path in files(tmp_path).values())


def test_no_rows_at_all(tmp_path):
    lines = write_search_plots([], SearchSettings(), tmp_path)
    assert sum("0 trial(s) with a finite rougeL" in line for line in lines) == 3


def test_all_parameters_pinned(tmp_path):
    search = SearchSettings(r=[8], lora_alpha=[16, 16], learning_rate=[1e-3, 1e-3], target_modules=["qv"])
    rows = [row(f"p_{i:05d}", 8, 16, 1e-3, "qv", metrics(0.2 + i / 100, 2.0)) for i in range(3)]
    lines = write_search_plots(rows, search, tmp_path)
    for stem in ("parallel_coordinate", "param_importances"):
        line = next(line for line in lines if line.startswith(f"**{PLOTS[stem]}**"))
        assert "not drawn (every hyperparameter is pinned: nothing was searched)" in line
        assert not (tmp_path / PLOT_DIR / f"{stem}.png").exists()
    assert (tmp_path / PLOT_DIR / "optimization_history.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / PLOT_DIR / "optimization_history.html").is_file()


def test_one_searched_parameter_and_stale_plots_replaced(rows, tmp_path):
    write_search_plots(rows, SearchSettings(), tmp_path)
    search = SearchSettings(r=[4, 8, 16, 32], lora_alpha=[16], learning_rate=[1e-3], target_modules=["qv"])
    lines = write_search_plots(rows, search, tmp_path)
    assert_all_drawn(tmp_path, lines)
    lines = write_search_plots(rows[:1], search, tmp_path)  # a rerun that can draw nothing
    assert not any(path.exists() for path in files(tmp_path).values())


def test_never_raises(rows, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    lines = write_search_plots(rows, SearchSettings(), blocker)
    assert len(lines) == 4 and lines[2].startswith("Search plots not drawn: ")


def test_importance_caveats_are_noted_and_matplotlib_chatter_is_not(tmp_path):
    rows = [row(f"s_{i:05d}", 8, 16, 1e-3, "qv", metrics(0.3, 2.0)) for i in range(3)]  # nothing to tell apart
    lines = write_search_plots(rows, SearchSettings(), tmp_path)
    assert_all_drawn(tmp_path, lines)
    notes = [line for line in lines if line.startswith("Note: ")]
    assert len(notes) == 1 and "importances will be equal" in notes[0]
    assert lines.index(notes[0]) > next(i for i, line in enumerate(lines) if line.startswith("**Parameter"))
