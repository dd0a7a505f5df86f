"""MLflow tracking of a sweep through Ray Tune's own MLflowLoggerCallback.

One MLflow run per trial (named after the trial) in an experiment named by the caller: the trial's
hyperparameters as params, and every Tune report's numeric values (rougeL, rouge1, rouge2, eval_loss,
step, ...) as metrics, at MLflow step = Tune's training_iteration (one per evaluation). The callback
runs in the driver process, so a local store on the driver's machine works for multi-node clusters too.

Stores: MLflow 3 refuses its old file store (`./mlruns`, `file:///...`) unless MLFLOW_ALLOW_FILE_STORE=true
is set; use a database store such as `sqlite:///runs/mlflow.db` (offline, no server), or a tracking
server's `http(s)://` URL. check_mlflow_uri() finds a bad one before Ray starts.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from qlora_ray.config import ConfigError

SERVER_TIMEOUT_S = 5.0


def tune_callbacks(mlflow_uri: str | None, experiment_name: str, tags: dict[str, str] | None = None) -> list:
    """Ray Tune callbacks for tune.RunConfig(callbacks=...): none without a URI, else MLflow's logger."""
    if not mlflow_uri:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=mlflow_uri, experiment_name=experiment_name, tags=tags,
                                 save_artifact=False)]


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///relative.db` or `sqlite:////absolute.db` URI, else None."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


def check_mlflow_uri(uri: str) -> None:
    """Raise ConfigError unless MLflow is installed and can open `uri` (creating a sqlite file's folder)."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ConfigError(f"MLflow tracking needs the mlflow package (pip install mlflow-skinny): {e}") from None
    scheme = urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            raise ConfigError(f"MLflow tracking URI {uri!r}: an in-memory database keeps nothing; "
                              "give a file, e.g. sqlite:///runs/mlflow.db")
        try:
            path.expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"MLflow tracking URI {uri!r}: cannot create its folder ({e})") from None
    try:
        # Builds the store: an unknown scheme, the retired file store, a missing database driver or an
        # unwritable sqlite file fail here (a sqlite database is created and migrated now).
        MlflowClient(tracking_uri=uri)
    except Exception as e:
        raise ConfigError(f"MLflow {mlflow.__version__} cannot use tracking URI {uri!r}: {_first_line(e)}") from None
    if scheme in ("http", "https"):
        _check_server(uri)


def _check_server(uri: str) -> None:
    """A tracking server must answer; any HTTP answer counts (it may want a token for /health)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:  # URLError, timeouts, refused connections, a malformed URL
        reason = getattr(e, "reason", e)
        raise ConfigError(f"MLflow tracking server {uri!r} does not answer: {reason}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
