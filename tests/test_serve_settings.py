"""Serve settings: environment variables, Serve config-file args (which win), and bad values."""

from __future__ import annotations

import pytest
import yaml

from qlora_ray.serving.settings import ServeSettings
from tests.conftest import ROOT


def test_env_then_args(monkeypatch):
    monkeypatch.setenv("QLORA_RAY_REGISTRY", "/srv/registry")
    monkeypatch.setenv("QLORA_RAY_MAX_ADAPTERS_PER_REPLICA", "2")
    monkeypatch.setenv("QLORA_RAY_NUM_GPUS", "auto")
    s = ServeSettings.load({"max_batch_size": 4})
    assert (s.registry, s.max_adapters_per_replica, s.max_batch_size, s.num_gpus) == ("/srv/registry", 2, 4, None)
    assert ServeSettings.load({"registry": "/other"}).registry == "/other"


def test_defaults_read_the_default_registry(monkeypatch):
    for name in ("REGISTRY", "MAX_ADAPTERS_PER_REPLICA", "NUM_GPUS"):
        monkeypatch.delenv(f"QLORA_RAY_{name}", raising=False)
    assert ServeSettings.load().registry == "./runs/registry"


def test_shipped_serve_config_is_valid():
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "serve:build"
    assert config["http_options"]["host"] == "127.0.0.1"  # localhost unless changed on purpose
    ServeSettings.load(app["args"])  # every arg is a known setting


@pytest.mark.parametrize("args", [{"no_such_setting": 1}, {"max_batch_size": "many"}])
def test_bad_settings_fail(args):
    with pytest.raises(ValueError):
        ServeSettings.load(args)
