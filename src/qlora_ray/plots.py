"""Optuna's plots of a finished sweep: optimization history, parallel coordinates, parameter importances.

The sweep's trial rows (as in its summary) become an in-memory Optuna study, so the plots describe
exactly what the leaderboard does, resumed sweeps included. Each plot is written twice into
`<out_dir>/plots/`: interactive HTML (plotly; its JavaScript once per folder, so the pages work
offline and stay small) and PNG (matplotlib, Agg backend). A plot that cannot be drawn is skipped
with its reason in the returned markdown: plotting never fails a sweep.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from qlora_ray.config import SearchSettings

PLOT_DIR = "plots"
# File stem -> title, in report order.
PLOTS = {
    "optimization_history": "Optimization history",
    "parallel_coordinate": "Parallel coordinates",
    "param_importances": "Parameter importances",
}
SEARCHED = ("r", "lora_alpha", "learning_rate", "target_modules")


def write_search_plots(rows: list[dict], search: SearchSettings, out_dir: Path) -> list[str]:
    """Draw the plots into out_dir/plots/ and return markdown lines for out_dir's report.

    Links in the lines are relative to out_dir. Never raises: what cannot be drawn is explained.
    """
    lines = ["## Search plots", ""]
    try:
        lines += _write_plots(rows, search, Path(out_dir))
    except Exception as e:  # a plot is never worth a failed sweep
        lines += [f"Search plots not drawn: {_reason(e)}", ""]
    return lines


def finite_value(row: dict, metric: str) -> float | None:
    """The trial's best value of `metric`, or None when it has none (failed early, NaN stored as None)."""
    value = (row.get("best") or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def search_distributions(search: SearchSettings, rows: list[dict] | None = None) -> dict:
    """The searched parameters as Optuna distributions, as search.param_space defines them.

    Pinned parameters are left out (nothing to plot). The trials' own values widen the space where
    they fall outside it, so a row never makes its trial invalid.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    seen = {name: [r["hyperparameters"][name] for r in rows or [] if name in (r.get("hyperparameters") or {})]
            for name in SEARCHED}
    distributions = {}
    for name in ("r", "lora_alpha", "target_modules"):
        choices = list(dict.fromkeys(getattr(search, name)))
        if len(choices) > 1:
            distributions[name] = CategoricalDistribution(list(dict.fromkeys(choices + seen[name])))
    lr = search.learning_rate
    if lr[0] != lr[-1]:
        values = [float(v) for v in seen["learning_rate"]]
        distributions["learning_rate"] = FloatDistribution(min([lr[0], *values]), max([lr[-1], *values]), log=True)
    return distributions


def build_study(rows: list[dict], search: SearchSettings):
    """An in-memory study with one trial per row, in the rows' order.

    A trial with a finite best value of search.metric is COMPLETE, any other FAIL (plots skip it).
    """
    import optuna

    distributions = search_distributions(search, rows)
    study = optuna.create_study(direction="maximize" if search.mode == "max" else "minimize")
    trials = []
    for row in rows:
        hp = row.get("hyperparameters") or {}
        params = {k: hp[k] for k in distributions if k in hp}
        value = finite_value(row, search.metric)
        trials.append(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL,
            value=value,
            params=params,
            distributions={k: distributions[k] for k in params},
            user_attrs={"trial_id": str(row.get("trial_id")), "status": str(row.get("status"))},
        ))
    study.add_trials(trials)
    return study


def _write_plots(rows: list[dict], search: SearchSettings, out_dir: Path) -> list[str]:
    import optuna

    plot_dir = out_dir / PLOT_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    for stem in PLOTS:  # a rerun (--resume) must not leave an older sweep's plot behind
        for suffix in (".html", ".png"):
            (plot_dir / f"{stem}{suffix}").unlink(missing_ok=True)

    metric = search.metric
    finite = sum(finite_value(r, metric) is not None for r in rows)
    skipped = {}
    if finite < 2:
        reason = f"{finite} trial(s) with a finite {metric}, at least 2 needed"
        skipped = dict.fromkeys(PLOTS, reason)
    elif not search_distributions(search):
        reason = "every hyperparameter is pinned: nothing was searched"
        skipped = {"parallel_coordinate": reason, "param_importances": reason}

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" INFO lines
    try:
        study = build_study(rows, search)
        lines = []
        for stem, title in PLOTS.items():
            if stem in skipped:
                lines += [f"**{title}**: not drawn ({skipped[stem]}).", ""]
                continue
            html, html_error = _draw(_html, stem, study, metric, plot_dir)
            png, png_error = _draw(_png, stem, study, metric, plot_dir)
            lines += _markdown(title, html, html_error, png, png_error, out_dir)
        return lines
    finally:
        optuna.logging.set_verbosity(verbosity)


def _draw(writer, stem: str, study, metric: str, plot_dir: Path) -> tuple[Path | None, str | None]:
    """Run one writer: the file it wrote and any caveat worth reading, or None and why it failed.

    Warnings stay off the console. The importance evaluator's UserWarnings are kept as the caveat (e.g. too
    few trials to tell parameters apart); the other plots' are matplotlib's axis-limit chatter, dropped.
    """
    path = plot_dir / f"{stem}{'.html' if writer is _html else '.png'}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            writer(stem, study, metric, path)
        except Exception as e:
            path.unlink(missing_ok=True)
            return None, _reason(e)
    if stem != "param_importances":
        return path, None
    from optuna.exceptions import ExperimentalWarning

    notes = dict.fromkeys(str(w.message).splitlines()[0] for w in caught
                          if issubclass(w.category, UserWarning) and not issubclass(w.category, ExperimentalWarning))
    return path, "; ".join(notes) or None


def _html(stem: str, study, metric: str, path: Path) -> None:
    from optuna import visualization

    if not visualization.is_available():
        raise RuntimeError("plotly is not installed (pip install plotly)")
    figure = getattr(visualization, f"plot_{stem}")(study, target_name=metric)
    # The plotly.min.js bundle is copied once into the folder and referenced by a relative <script src>.
    figure.write_html(str(path), include_plotlyjs="directory", full_html=True)


def _png(stem: str, study, metric: str, path: Path) -> None:
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        # optuna.visualization.matplotlib has been "experimental" since v2.2; the warning says nothing new.
        warnings.simplefilter("ignore", ExperimentalWarning)
        from optuna.visualization import matplotlib as optuna_matplotlib

        if not optuna_matplotlib.is_available():
            raise RuntimeError("matplotlib is not installed (pip install matplotlib)")
        import matplotlib

        matplotlib.use("Agg")  # no display needed; the sweep may run headless
        import matplotlib.pyplot as plt

        before = set(plt.get_fignums())
        try:
            with plt.rc_context():  # Optuna switches to the ggplot style globally; keep that local
                axes = getattr(optuna_matplotlib, f"plot_{stem}")(study, target_name=metric)
                axes.figure.savefig(str(path), dpi=120, bbox_inches="tight")
        finally:
            for number in set(plt.get_fignums()) - before:
                plt.close(number)


def _markdown(title: str, html: Path | None, html_note: str | None, png: Path | None, png_note: str | None,
              out_dir: Path) -> list[str]:
    def link(path: Path) -> str:
        return path.relative_to(out_dir).as_posix()

    head = f"**{title}**"
    if html is not None:
        head += f" ([interactive]({link(html)}))"
    else:
        head += f": interactive HTML not drawn ({html_note})"
    if png is None:
        head += f"; PNG not drawn ({png_note})"
    lines = [head, ""]
    notes = list(dict.fromkeys(n for n, path in ((html_note, html), (png_note, png)) if n and path is not None))
    if notes:
        lines += [f"Note: {'; '.join(notes)}", ""]
    if png is not None:
        lines += [f"![{title}]({link(png)})", ""]
    return lines


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
