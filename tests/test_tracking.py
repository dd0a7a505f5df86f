"""MLflow tracking of a sweep through Ray Tune's MLflowLoggerCallback: a real local Ray, a real sqlite store."""

from __future__ import annotations

import math
import socket
import sys

import pytest

from qlora_ray.config import ConfigError
from qlora_ray.tracking import check_mlflow_uri, tune_callbacks

EVALS = 3


def trainable(config):
    from ray import tune

    for i in range(1, EVALS + 1):
        rouge = config["learning_rate"] * 100 * i
        loss = float("nan") if config["r"] == 16 and i == EVALS else 3.0 / i  # a diverged last evaluation
        tune.report({"rougeL": rouge, "rouge1": rouge + 0.05, "eval_loss": loss, "step": 10 * i})


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_tuner_logs_every_trial_to_mlflow(local_ray, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray import tune

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    check_mlflow_uri(uri)  # creates the folder and the database
    callbacks = tune_callbacks(uri, "sweep-test", tags={"sweep": "sweep-test"})
    assert len(callbacks) == 1
    tuner = tune.Tuner(
        trainable,
        param_space={"r": tune.grid_search([4, 16]), "learning_rate": 1e-3, "target_modules": "qv"},
        tune_config=tune.TuneConfig(metric="rougeL", mode="max"),
        run_config=tune.RunConfig(name="sweep-test", storage_path=str(tmp_path / "tune"), callbacks=callbacks,
                                  verbose=0),
    )
    results = tuner.fit()
    assert not results.errors

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    by_r = {run.data.params["r"]: run for run in runs}
    assert set(by_r) == {"4", "16"}
    for r, run in by_r.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["learning_rate"] == "0.001" and run.data.params["target_modules"] == "qv"
        assert run.data.tags["sweep"] == "sweep-test" and run.data.tags["trial_name"] == run.info.run_name
        history = client.get_metric_history(run.info.run_id, "rougeL")
        assert [(m.step, round(m.value, 6)) for m in sorted(history, key=lambda m: m.step)] == [
            (i, round(0.1 * i, 6)) for i in range(1, EVALS + 1)]
        steps = sorted(client.get_metric_history(run.info.run_id, "step"), key=lambda m: m.step)
        assert [m.value for m in steps] == [10.0, 20.0, 30.0]
        losses = sorted(client.get_metric_history(run.info.run_id, "eval_loss"), key=lambda m: m.step)
        assert len(losses) == EVALS
        assert math.isnan(losses[-1].value) == (r == "16")  # NaN is stored, not dropped and not a crash


def test_no_uri_no_callbacks():
    assert tune_callbacks(None, "x") == [] and tune_callbacks("", "x") == []


def test_sqlite_folder_is_created(tmp_path):
    check_mlflow_uri(f"sqlite:///{tmp_path}/a/b/mlflow.db")
    assert (tmp_path / "a" / "b" / "mlflow.db").is_file()


@pytest.mark.parametrize("uri, message", [
    ("bogus://somewhere", "cannot use tracking URI 'bogus://somewhere'"),
    ("sqlite://", "in-memory database keeps nothing"),
    ("sqlite:///:memory:", "in-memory database keeps nothing"),
])
def test_unusable_uri_is_a_config_error(uri, message):
    with pytest.raises(ConfigError, match=message):
        check_mlflow_uri(uri)


def test_retired_file_store_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match="sqlite"):  # MLflow's own message points to a database store
        check_mlflow_uri(f"file://{tmp_path}/mlruns")


def test_server_that_does_not_answer_is_a_config_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match="does not answer"):
        check_mlflow_uri(f"http://127.0.0.1:{port}")


def test_missing_mlflow_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees when it is not installed
    with pytest.raises(ConfigError, match="pip install mlflow-skinny"):
        check_mlflow_uri("sqlite:///unused.db")
