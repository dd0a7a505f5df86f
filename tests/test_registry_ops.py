"""Registry import / promote / remove, per-entry settings, and the `qlora-ray` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_ray.adapter_check import AdapterInvalid
from qlora_ray.config import DataSettings, ModelSettings
from qlora_ray.registry import (
    Candidate,
    Registry,
    RegistryError,
    UnknownAdapter,
    entry_load,
    entry_task,
    load_settings,
    task_settings,
)
from tests.test_adapter_check import LORA, make_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_path(cache_dir) -> str:
    from qlora_ray import embedded

    return str(embedded.build_tiny_t5(cache_dir))


@pytest.fixture(scope="module")
def adapter(base_path, tmp_path_factory) -> Path:
    """A real PEFT adapter of the tiny T5 (r 4, alpha 8, q+v, lm_head saved)."""
    out = tmp_path_factory.mktemp("adapters") / "my-run-7"
    make_adapter(base_path, out, **LORA)
    return out


def _source(tmp_path, adapter: Path, name: str, config_edit=None) -> Path:
    out = tmp_path / name
    shutil.copytree(adapter, out)
    (out / "README.md").write_text("not copied")
    (out / "training_args.bin").write_bytes(b"never copied")
    if config_edit:
        config = json.loads((out / "adapter_config.json").read_text())
        config_edit(config)
        (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _publish(reg: Registry, adapter: Path, base_path: str, trial: str, rouge: float, sweep="sweep-1") -> list[str]:
    candidate = Candidate(adapter_id=f"{sweep}-{trial}", source_dir=adapter, metrics={"rougeL": rouge},
                          hyperparameters={"r": 4, "lora_alpha": 8, "target_modules": "qv"}, trial_id=trial, step=10)
    settings = ModelSettings(compute_dtype="float32")
    return reg.publish([candidate], base_model=base_path, base_metrics={"rougeL": 0.05},
                       task=task_settings(DataSettings(prefix="doc: "), num_beams=2, base_model=base_path),
                       load=load_settings(settings), metric="rougeL", mode="max", sweep=sweep)


@pytest.fixture
def registry(tmp_path, adapter, base_path) -> Registry:
    reg = Registry(tmp_path / "registry")
    _publish(reg, adapter, base_path, "a", 0.2)
    _publish(reg, adapter, base_path, "b", 0.3)
    return reg


def test_publish_records_per_entry_settings(registry, base_path):
    index = registry.read()
    entry = registry.adapter("sweep-1-b")
    assert entry["load"] == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32",
                             "trust_remote_code": False}
    # the tiny T5's generation_config.json has repetition_penalty 1.3; num_beams is the trainer's
    assert entry["task"] == {"prefix": "doc: ", "max_source_length": 256, "max_target_length": 32,
                             "prompt_template": None, "format": "auto", "chat_template": None,
                             "generation": {"repetition_penalty": 1.3, "num_beams": 2}}
    assert index["task"] == entry["task"] and index["default"] == "sweep-1-b" and not index["pinned_default"]
    assert entry_task(index, entry) == entry["task"] and entry_load(index, entry) == entry["load"]


def test_old_format_entries_resolve(tmp_path, base_path, adapter):
    """Registries written before per-entry settings: entries without "load"/"task"."""
    old = {"default": "old-1", "base_model": base_path, "base_metrics": {},
           "task": {"prefix": "summarize: ", "max_source_length": 128, "max_target_length": 16},
           "metric": "rougeL", "mode": "max",
           "adapters": [{"id": "old-1", "metrics": {"rougeL": 0.1}, "hyperparameters": {"r": 8},
                         "base_model": base_path, "created": "2026-01-01T00:00:00Z", "sweep": "s", "trial_id": "1",
                         "step": 5}]}
    entry = old["adapters"][0]
    # keys an old entry lacks take the defaults, which are what it was trained with
    assert entry_task(old, entry) == {"prefix": "summarize: ", "max_source_length": 128, "max_target_length": 16,
                                      "prompt_template": None, "format": "auto", "chat_template": None,
                                      "generation": {"repetition_penalty": 1.3, "num_beams": 1}}
    assert entry_load(old, entry) == load_settings(ModelSettings())
    bare = {"base_model": "no/such-model", "adapters": []}  # not even an index-level task
    assert entry_task(bare, {}) == {"prefix": "summarize: ", "max_source_length": 256, "max_target_length": 32,
                                    "prompt_template": None, "format": "auto", "chat_template": None,
                                    "generation": {"num_beams": 1}}
    # a new sweep into an old registry: the old entry is left as it was and keeps resolving
    reg = Registry(tmp_path / "registry")
    reg.root.mkdir()
    (reg.root / "index.json").write_text(json.dumps(old))
    shutil.copytree(adapter, reg.root / "old-1")
    assert reg.adapter_dir("old-1") == reg.root / "old-1"
    _publish(reg, adapter, base_path, "n", 0.05, sweep="sweep-9")
    index = reg.read()
    old_entry, new_entry = reg.adapter("old-1"), reg.adapter("sweep-9-n")
    assert "load" not in old_entry and "task" not in old_entry and index["default"] == "old-1"
    assert entry_load(index, old_entry)["compute_dtype"] == "float32"  # the registry's latest load settings
    assert entry_task(index, old_entry) == entry_task(index, new_entry) == new_entry["task"]


def test_import_good(registry, adapter, tmp_path, base_path):
    source = _source(tmp_path, adapter, "downloaded")
    entry = registry.import_adapter(source, "imported-1")
    assert entry["source"] == "import" and entry["imported_from"] == "downloaded" and entry["metrics"] == {}
    assert entry["hyperparameters"] == {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]}
    assert entry["base_model"] == base_path and entry["load"]["compute_dtype"] == "float32"
    assert entry["task"]["prefix"] == "doc: " and entry["task"]["generation"]["repetition_penalty"] == 1.3
    assert sorted(p.name for p in (registry.root / "imported-1").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    index = registry.read()
    assert registry.adapter_dir("imported-1") == registry.root / "imported-1"
    assert index["default"] == "sweep-1-b" and [a["id"] for a in index["adapters"]][-1] == "imported-1"
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".") and p.name not in (".lock",)]


def test_import_refusals(registry, adapter, tmp_path):
    before = registry.read()
    bad = _source(tmp_path, adapter, "dora", lambda c: c.update(use_dora=True))
    with pytest.raises(AdapterInvalid, match="DoRA"):
        registry.import_adapter(bad, "bad-1")
    with pytest.raises(RegistryError, match="already exists"):
        registry.import_adapter(adapter, "sweep-1-a")
    for bad_id in ("../x", "A", "", ".hidden"):
        with pytest.raises(RegistryError, match="adapter id must be"):
            registry.import_adapter(adapter, bad_id)
    other = _source(tmp_path, adapter, "other-base",
                    lambda c: c.update(base_model_name_or_path="google-t5/t5-small"))
    with pytest.raises(RegistryError, match="trained on 'google-t5/t5-small'.*--allow-base-mismatch"):
        registry.import_adapter(other, "other-1")
    linked = _source(tmp_path, adapter, "linked")
    (linked / "adapter_model.safetensors").unlink()
    (linked / "adapter_model.safetensors").symlink_to(adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterInvalid, match="symlink"):
        registry.import_adapter(linked, "linked-1")
    assert registry.read() == before
    assert sorted(p.name for p in registry.root.iterdir()) == [".lock", "index.json", "sweep-1-a", "sweep-1-b"]
    # an adapter of another name for the same architecture: allowed on request, its shapes still checked
    entry = registry.import_adapter(other, "other-1", allow_base_mismatch=True)
    assert entry["id"] == "other-1"
    wrong_rank = _source(tmp_path, adapter, "wrong-rank",
                         lambda c: c.update(r=8, base_model_name_or_path="google-t5/t5-small"))
    with pytest.raises(AdapterInvalid, match="says r=8"):
        registry.import_adapter(wrong_rank, "wrong-1", allow_base_mismatch=True)


def test_import_needs_a_registry_with_a_base(tmp_path, adapter):
    with pytest.raises(RegistryError, match="no registry at"):
        Registry(tmp_path / "empty").import_adapter(adapter, "x")


def test_leftover_directory_is_replaced(registry, adapter, tmp_path, base_path):
    """A crash between moving a directory in and writing the index leaves a directory no entry names."""
    for stale in ("imported-2", "sweep-2-c"):
        (registry.root / stale).mkdir()
        (registry.root / stale / "junk").write_text("left by a crash")
    registry.import_adapter(adapter, "imported-2")
    assert _publish(registry, adapter, base_path, "c", 0.1, sweep="sweep-2") == ["sweep-2-c"]
    for stale in ("imported-2", "sweep-2-c"):
        assert sorted(p.name for p in (registry.root / stale).iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors"]


def test_promote_is_kept_by_later_sweeps(registry, adapter, base_path):
    registry.promote("sweep-1-a")
    index = registry.read()
    assert index["default"] == "sweep-1-a" and index["pinned_default"] is True
    _publish(registry, adapter, base_path, "d", 0.9, sweep="sweep-2")  # better than everything
    index = registry.read()
    assert index["default"] == "sweep-1-a" and index["adapters"][0]["id"] == "sweep-2-d"
    with pytest.raises(UnknownAdapter):
        registry.promote("nope")
    with pytest.raises(RegistryError):
        registry.promote("../x")
    # removing the promoted default unpins: the best remaining takes over, and sweeps pick again
    assert registry.remove("sweep-1-a") == "sweep-2-d"
    assert registry.read()["pinned_default"] is False


def test_remove_moves_default(registry):
    assert registry.remove("sweep-1-b") == "sweep-1-a"
    assert not (registry.root / "sweep-1-b").exists()
    assert [a["id"] for a in registry.read()["adapters"]] == ["sweep-1-a"]
    with pytest.raises(UnknownAdapter):
        registry.remove("sweep-1-b")
    assert registry.remove("sweep-1-a") is None
    assert registry.read()["adapters"] == [] and registry.read()["default"] is None
    assert sorted(p.name for p in registry.root.iterdir()) == [".lock", "index.json"]


def _cli(*args, env_registry=None):
    env = dict(os.environ)
    env.pop("QLORA_RAY_REGISTRY", None)
    if env_registry:
        env["QLORA_RAY_REGISTRY"] = str(env_registry)
    return subprocess.run([sys.executable, "-m", "qlora_ray.registry_cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _one_line_error(proc, text: str):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlora-ray: error: ") and text in lines[0], proc.stderr


def test_cli(registry, adapter, tmp_path):
    reg = str(registry.root)
    bad = _source(tmp_path, adapter, "bad", lambda c: c.update(r=16))
    _one_line_error(_cli("import", str(bad), "--id", "bad-1", "--registry", reg),
                    "rank 4 in the weights, but adapter_config.json says r=16")
    proc = _cli("import", str(_source(tmp_path, adapter, "good")), "--id", "good-1", env_registry=reg)
    assert proc.returncode == 0 and "imported good-1" in proc.stdout, proc.stderr
    _one_line_error(_cli("promote", "nope", "--registry", reg), "unknown adapter 'nope'")
    _one_line_error(_cli("--registry", reg, "promote", "../x"), "adapter id must be")
    proc = _cli("--registry", reg, "promote", "good-1")
    assert proc.returncode == 0 and registry.read()["default"] == "good-1"
    _one_line_error(_cli("remove", "sweep-1-a", "--registry", reg), "refusing to remove without --yes")
    proc = _cli("remove", "sweep-1-a", "--yes", "--registry", reg)
    assert proc.returncode == 0 and "removed sweep-1-a; the default is good-1" in proc.stdout
    _one_line_error(_cli("list", "--registry", str(tmp_path / "missing")), "no registry at")
    _one_line_error(_cli("list", env_registry=tmp_path / "missing"), "no registry at")
    _one_line_error(_cli("frobnicate", "--registry", reg), "invalid choice")

    # a broken adapter shows up as rejected, with its reason
    weights = registry.root / "sweep-1-b" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1)
    proc = _cli("list", "--registry", reg)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in proc.stdout.splitlines()}
    assert rows["good-1"].startswith("*") and " 4 " in rows["good-1"] and "q+v" in rows["good-1"]
    assert "import" in rows["good-1"] and rows["good-1"].rstrip().endswith("ok")
    assert "0.3000" in rows["sweep-1-b"] and "sweep" in rows["sweep-1-b"]
    assert "rejected: adapter_model.safetensors is truncated" in rows["sweep-1-b"]
    proc = _cli("list", "--json", "--registry", reg)
    listing = json.loads(proc.stdout)
    by_id = {a["id"]: a for a in listing["adapters"]}
    assert listing["default"] == "good-1" and listing["pinned_default"] is True
    assert by_id["good-1"]["valid"] and by_id["good-1"]["default"] and by_id["good-1"]["source"] == "import"
    assert not by_id["sweep-1-b"]["valid"] and "truncated" in by_id["sweep-1-b"]["rejected"]
    assert by_id["sweep-1-b"]["task"]["generation"] == {"repetition_penalty": 1.3, "num_beams": 2}
