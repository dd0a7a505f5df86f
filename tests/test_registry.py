from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qlora_ray.registry import Candidate, Registry, RegistryError, UnknownAdapter, check_adapter_id, make_adapter_id


def _candidate(tmp_path, name: str, rouge: float) -> Candidate:
    src = tmp_path / f"src-{name}"
    src.mkdir()
    save_file({"w": torch.zeros(2)}, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text("{}")
    (src / "optimizer.pt").write_text("never copied")
    return Candidate(adapter_id=make_adapter_id("sweep-1", name), source_dir=src, metrics={"rougeL": rouge},
                     hyperparameters={"r": 8}, trial_id=name, step=10)


def _publish(reg, cands, sweep="sweep-1", base="base-a"):
    return reg.publish(cands, base_model=base, base_metrics={"rougeL": 0.1}, task={"prefix": "summarize: "},
                       metric="rougeL", mode="max", sweep=sweep)


def test_publish_accumulates_and_default_is_best(tmp_path):
    reg = Registry(tmp_path / "registry")
    assert _publish(reg, [_candidate(tmp_path, "a", 0.2), _candidate(tmp_path, "b", 0.3)]) == [
        "sweep-1-a", "sweep-1-b"]
    assert reg.read()["default"] == "sweep-1-b"
    _publish(reg, [_candidate(tmp_path, "c", 0.25)], sweep="sweep-2")
    index = json.loads((tmp_path / "registry" / "index.json").read_text())
    assert [a["id"] for a in index["adapters"]] == ["sweep-1-b", "sweep-1-c", "sweep-1-a"]
    assert index["default"] == "sweep-1-b" and index["base_metrics"] == {"rougeL": 0.1}
    assert sorted(p.name for p in (tmp_path / "registry" / "sweep-1-a").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    _publish(reg, [_candidate(tmp_path, "d", 0.9)], sweep="sweep-3")
    assert reg.read()["default"] == "sweep-1-d"


def test_other_base_model_refused(tmp_path):
    reg = Registry(tmp_path / "registry")
    _publish(reg, [_candidate(tmp_path, "a", 0.2)])
    with pytest.raises(RegistryError, match="serves base model 'base-a'"):
        _publish(reg, [_candidate(tmp_path, "b", 0.3)], base="base-b")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "A", "x" * 200, None, 5, "a b", "..", "a\\b"])
def test_adapter_ids_never_paths(bad):
    with pytest.raises(RegistryError):
        check_adapter_id(bad)


def test_only_registered_ids_resolve(tmp_path):
    reg = Registry(tmp_path / "registry")
    _publish(reg, [_candidate(tmp_path, "a", 0.2)])
    assert reg.adapter_dir("sweep-1-a") == (tmp_path / "registry" / "sweep-1-a").resolve()
    (tmp_path / "registry" / "stray").mkdir()
    with pytest.raises(UnknownAdapter):
        reg.adapter_dir("stray")


def test_nan_metrics_rank_last_and_are_stored_as_null(tmp_path):
    """A NaN metric (a diverged trial) never becomes the default and reaches index.json as null."""
    import math

    from qlora_ray.registry import Candidate, Registry, metric_rank_key

    source = tmp_path / "src"
    source.mkdir()
    (source / "adapter_model.safetensors").write_bytes(b"")
    (source / "adapter_config.json").write_text("{}")
    candidates = [Candidate(f"a{i}", source, {"rougeL": v, "eval_loss": v}, {}, str(i), 1)
                  for i, v in enumerate([float("nan"), 0.2, float("inf"), 0.3])]
    registry = Registry(tmp_path / "registry")
    registry.publish(candidates, base_model="base", base_metrics={"rougeL": float("nan")}, task={},
                     metric="rougeL", mode="max", sweep="s")
    text = (tmp_path / "registry" / "index.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    index = registry.read()
    assert index["default"] == "a3"
    assert [a["id"] for a in index["adapters"]][:2] == ["a3", "a1"]
    assert index["adapters"][-1]["metrics"]["rougeL"] is None and index["base_metrics"]["rougeL"] is None
    for mode in ("max", "min"):
        keys = sorted([0.5, math.nan, None, 0.1, math.inf], key=lambda v: metric_rank_key(v, mode))
        assert keys[:2] == ([0.5, 0.1] if mode == "max" else [0.1, 0.5])
