"""--gpus-per-trial auto: each trial asks Ray for the share of a GPU its predicted peak memory needs,
so small trials pack several to a GPU, and plans its micro-batch within the share it was given; a
configuration too big for a whole GPU even at micro-batch 1 is skipped with the reason in the leaderboard.

The end-to-end test runs the real CLI on a private local Ray whose node declares one GPU
(RAY_OVERRIDE_RESOURCES: Ray counts it and hands out shares of it; the trials still train on the
CPU) of --gpu-memory-gb, which is what a trial without CUDA plans within.
"""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoConfig

from qlora_ray import memory, search
from qlora_ray.cluster import KNOWN_GPU_GB, memory_from
from qlora_ray.config import ConfigError, SearchSettings, load_config
from qlora_ray.model import resolve_model_path
from tests.conftest import run_cli
from tests.test_cli_errors import _assert_clean_failure
from tests.test_resume import _results, _summary

SMALL, BIG = 4, 100_000  # LoRA ranks: a tiny adapter, and one predicted at several GB even at micro-batch 1


def test_a_share_is_the_prediction_with_headroom_in_eighths_of_a_gpu():
    assert search.gpu_share(1.0, 10.0) == 0.125  # 1.2 GB of 10: one eighth
    assert search.gpu_share(2.0, 10.0) == 0.25  # 2.4 GB: two eighths
    assert search.gpu_share(0.001, 80.0) == 0.125  # never less than one step
    assert search.gpu_share(9.0, 10.0) == 1.0 and search.gpu_share(50.0, 10.0) == 1.0  # at most one GPU
    edge = 10.0 * 2 / search.SHARE_STEPS / (1 + search.SHARE_HEADROOM)  # exactly two eighths: not three
    assert search.gpu_share(edge, 10.0) == 0.25


def test_packed_resources_follow_each_configuration():
    predicted = {(4, "qv"): 2.0, (64, "all-linear"): 9.0, (1, "all-linear"): 1.5}
    packed = search.PackedResources(cpus=1, gpu_gb=24.0, predicted=predicted)
    small, big = {"r": 4, "target_modules": "qv"}, {"r": 64, "target_modules": "all-linear", "learning_rate": 1e-3}
    assert (packed.share(small), packed.share(big)) == (0.125, 0.5)  # 2.4 / 24 -> 1/8; 10.8 / 24 -> 4/8
    assert packed(big).required_resources == {"CPU": 1, "GPU": 0.5}  # what Tune asks Ray for
    assert packed.share({"r": 8, "target_modules": "qv"}) == 1.0  # outside the table: a whole GPU
    # A set memory limit caps what a trial plans for, so it asks for no more than that.
    assert search.PackedResources(1, 24.0, predicted, limit_gb=3.0).share(big) == 0.25
    s = SearchSettings(num_samples=8, r=[4, 64], target_modules=["qv", "all-linear"], gpus_per_trial="auto")
    assert search.memory_keys(s) == [(4, "qv"), (4, "all-linear"), (64, "qv"), (64, "all-linear")]
    # Concurrency: as many as the smallest share allows (bigger ones wait for room), within CPUs and trials.
    one_gpu = {"CPU": 16.0, "GPU": 1.0}
    assert search.trial_resources(s, one_gpu) == {"cpu": 1, "gpu": 1}  # the most a trial asks for
    assert search.max_concurrency(s, {"cpu": 1, "gpu": 0.125}, one_gpu) == 8
    assert search.max_concurrency(s, {"cpu": 1, "gpu": 0.125}, {"CPU": 3.0, "GPU": 1.0}) == 3
    # auto on a cluster without GPUs: CPU trials, as by default.
    assert search.trial_resources(s, {"CPU": 2.0, "GPU": 0.0}) == {"cpu": 1, "gpu": 0}


def test_a_bigger_configuration_is_predicted_bigger_and_asks_for_more(cache_dir):
    config = load_config(overrides={"search": {"r": [4, 2048], "target_modules": ["qv", "all-linear"],
                                               "gpus_per_trial": "auto"}})
    model_config = AutoConfig.from_pretrained(resolve_model_path(config.model))
    predicted = search.predicted_peaks(config, model_config)
    assert set(predicted) == {*search.memory_keys(config.search), (1, "all-linear")}  # + the base evaluation
    assert predicted[(2048, "all-linear")] > predicted[(2048, "qv")] > predicted[(4, "qv")]
    packed = search.PackedResources(1, 2.5 * predicted[(4, "qv")], predicted)
    shares = packed.shares(config.search)
    assert shares[(4, "qv")] < shares[(2048, "all-linear")] <= 1.0
    assert sorted(shares.values()) == [shares[k] for k in sorted(shares, key=predicted.get)]


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("0.5", 0.5), ("1", 1), (2, 2), (None, None)])
def test_gpus_per_trial_values(value, expected):
    assert load_config(overrides={"search": {"gpus_per_trial": value}}).search.gpus_per_trial == expected


@pytest.mark.parametrize("bad", ["lots", "-1", "nan", "inf", True, "Auto "])
def test_gpus_per_trial_bad_values(bad):
    with pytest.raises(ConfigError, match="gpus_per_trial must be a number of GPUs >= 0 .* or 'auto'"):
        load_config(overrides={"search": {"gpus_per_trial": bad}})


def test_gpu_memory_must_be_positive():
    with pytest.raises(ConfigError, match="gpu_memory_gb must be positive"):
        load_config(overrides={"search": {"gpus_per_trial": "auto", "gpu_memory_gb": 0}})


def test_a_bad_gpus_per_trial_flag_fails_before_ray_starts():
    _assert_clean_failure(run_cli("--gpus-per-trial", "half"),
                          "gpus_per_trial must be a number of GPUs >= 0 (0.5 shares a GPU) or 'auto', got 'half'")


def test_where_the_gpu_memory_comes_from():
    def node(ip, **resources):
        return {"NodeManagerAddress": ip, "Resources": {"CPU": 4.0, "GPU": 1.0, **resources}}

    a10g = node("10.0.0.1", **{"accelerator_type:A10G": 1.0})
    # Measured (NVML on the node) wins; the smallest GPU of the cluster counts.
    assert memory_from([a10g, node("10.0.0.2")], [23.6, 85.0], []) == (23.6, "measured on the GPU nodes")
    # Not measurable (no NVIDIA driver seen): Ray's accelerator type, by its smallest model.
    assert memory_from([a10g], [None], []) == (KNOWN_GPU_GB["A10G"], "from Ray's accelerator type")
    # A GPU node that is neither measurable nor of a known type: unknown, and the reason names it.
    gb, why = memory_from([node("10.0.0.3")], [None], [])
    assert gb is None and "10.0.0.3" in why
    # No GPU node up yet (workers scale from zero): the autoscaler's GPU node types must say what they are.
    assert memory_from([], [], [{"CPU": 0}, {"CPU": 4, "GPU": 1, "accelerator_type:L4": 1}])[0] == KNOWN_GPU_GB["L4"]
    gb, why = memory_from([], [], [{"CPU": 4, "GPU": 1}])
    assert gb is None and "accelerator_type" in why
    assert memory_from([], [], [])[0] is None  # nothing at all
    # A live node's measurement stands for node types that declare no type.
    assert memory_from([node("10.0.0.4")], [24.1], [{"CPU": 4, "GPU": 1}]) == (24.1, "measured on the GPU nodes")


def test_the_sweep_stops_with_one_line_when_the_gpu_memory_cannot_be_known(monkeypatch, capsys):
    from qlora_ray import sweep

    config = load_config(overrides={"search": {"r": [4], "target_modules": ["qv"], "gpus_per_trial": "auto"}})
    predicted = {(4, "qv"): 2.0, (1, "all-linear"): 2.0}
    prepared = sweep.Prepared(config, "model", None, None, "sweep-x", predicted=predicted)
    monkeypatch.setattr(sweep, "gpu_memory_gb", lambda: (None, "no GPU node is up to measure"))
    with pytest.raises(SystemExit) as stopped:
        sweep._packed_resources(prepared, {"cpu": 1, "gpu": 1})
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --gpus-per-trial auto needs the memory of the workers' GPUs, and no GPU node is up to measure: "
        "give it with --gpu-memory-gb (e.g. 24 for an A10G), or a number of GPUs per trial"]
    # Measured (or declared): each configuration's share, printed.
    monkeypatch.setattr(sweep, "gpu_memory_gb", lambda: (24.0, "measured on the GPU nodes"))
    assert sweep._packed_resources(prepared, {"cpu": 1, "gpu": 1}).share({"r": 4, "target_modules": "qv"}) == 0.125
    assert "on a 24 GB GPU (measured on the GPU nodes; with 20% headroom, in steps of 1/8): r 4 qv 2.00 GB -> 0.125" \
        in capsys.readouterr().out


def _seed_sampling(ranks: list[int], pattern: list[int]) -> int:
    """A search seed whose first trials sample `pattern` (Tune asks Optuna for every concurrent trial at
    once, before any result, so these come from TPE's seeded random start-up phase). Optuna's log level,
    which search.searcher lowers for the sweep's process, is left as it was for the other tests."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    try:
        return _first_seed_sampling(ranks, pattern)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _first_seed_sampling(ranks: list[int], pattern: list[int]) -> int:
    for seed in range(50):
        config = load_config(overrides={"search": {"num_samples": len(pattern), "r": ranks, "lora_alpha": [16],
                                                   "learning_rate": [3e-3], "target_modules": ["qv"], "seed": seed}})
        searcher = search.searcher(config)
        searcher.set_search_properties(config.search.metric, config.search.mode, search.param_space(config.search))
        if [searcher.suggest(f"t{i}")["r"] for i in range(len(pattern))] == pattern:
            return seed
    raise AssertionError(f"no search seed below 50 samples r = {pattern}")


def test_auto_packs_small_trials_on_one_gpu_and_skips_one_that_cannot_fit(tmp_path):
    config = load_config(overrides={"model": {"compute_dtype": "float32"}, "train": {"batch_size": 4}})
    model_config = AutoConfig.from_pretrained(resolve_model_path(config.model))

    def predicted(r: int, micro: int = 4) -> float:
        return memory.estimate_trial(model_config, config, {"r": r, "target_modules": "qv"},
                                     micro_batch_size=micro).total_gb

    # A GPU on which the small configuration needs 1.5 eighths with headroom (so asks for a quarter), and
    # the big one is over the whole GPU even at micro-batch 1.
    gpu_gb = predicted(SMALL) * (1 + search.SHARE_HEADROOM) * search.SHARE_STEPS / 1.5
    assert predicted(BIG, micro=1) > gpu_gb
    small_share, big_share = 0.25, 1.0
    assert search.gpu_share(predicted(SMALL), gpu_gb) == small_share
    seed = _seed_sampling([SMALL, BIG], [SMALL, SMALL, BIG])  # two small trials, then the big one

    out = tmp_path / "runs"
    no_retry = tmp_path / "no-retry.yaml"  # a skipped trial would fail the same way again: spare the test the retry
    no_retry.write_text("search:\n  max_failures: 0\n")
    proc = run_cli(
        "--config", str(no_retry), "--output-dir", str(out), "--address", "local",
        "--num-samples", "3", "--seed", str(seed),
        "--r", f"{SMALL},{BIG}", "--lora-alpha", "16", "--learning-rate", "3e-3", "--target-modules", "qv",
        "--max-steps", "4", "--eval-every", "2", "--train-size", "32", "--eval-size", "8", "--batch-size", "4",
        "--compute-dtype", "float32", "--top-k", "1",
        "--gpus-per-trial", "auto", "--gpu-memory-gb", f"{gpu_gb:.6f}",
        env={"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 4, "GPU": 1})},  # one (declared) GPU, 4 trial slots
    )
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # Ray colours its worker-log prefixes
    assert proc.returncode == 0, output[-5000:]
    # The driver sized every configuration's share from its prediction, and concurrency from the smallest.
    assert f"GPU shares by predicted peak memory on a {gpu_gb:g} GB GPU (--gpu-memory-gb" in output, output[-5000:]
    assert f"r {SMALL} qv {predicted(SMALL):.2f} GB -> {small_share:g}; r {BIG} qv" in output
    assert f"{{'cpu': 1, 'gpu': '{small_share:g}-{big_share:g} (auto)'}} each, up to 3 at once" in output

    summary, results = _summary(out), _results(out)
    trained = summary["leaderboard"]
    assert len(trained) == 2 and all(row["hyperparameters"]["r"] == SMALL for row in trained), summary
    assert all(row["gpus"] == small_share for row in trained)
    # Each trial planned within the share Ray gave it (it printed it from its own Ray context), and at
    # that share the small configuration trains at its configured micro-batch.
    given = {int(pid): float(share) for pid, share in
             re.findall(r"pid=(\d+)[^)]*\) GPU share ([\d.]+) of a [\d.]+ GB GPU: planning within", output)}
    for row in trained:
        rows = results[row["trial_id"]]
        assert {r["pid"] for r in rows} <= set(given) and {given[r["pid"]] for r in rows} == {small_share}, given
        assert all(r["micro_batch_size"] == 4 for r in rows)
    assert big_share in given.values()  # the big trial was given the whole GPU, and planned in it
    # The two small trials ran at the same time, sharing the one GPU (0.25 + 0.25 of it).
    (start_a, end_a), (start_b, end_b) = [
        (rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"])
        for rows in (results[row["trial_id"]] for row in trained)]
    assert start_a < end_b and start_b < end_a, (start_a, end_a, start_b, end_b)

    # The big trial: skipped by its memory plan, with the reason, in the summary and the leaderboard.
    (skipped,) = summary["failed"]
    assert skipped["hyperparameters"]["r"] == BIG and summary["skipped"] == 1
    assert skipped["error"].startswith("DoesNotFit: predicted peak") and "GB limit" in skipped["error"]
    line = next(ln for ln in output.splitlines() if ln.lstrip().startswith(skipped["trial_id"]))
    assert re.search(rf"{BIG}\s+16\s+3.00e-03 qv\s+skipped\s+does not fit: predicted peak [\d.]+ GB at micro-batch 1 "
                     rf"exceeds the {gpu_gb:.1f} GB limit", line), line
    assert "(1 skipped: predicted not to fit)" in proc.stdout
    assert f"(GPU share {small_share:g})" in proc.stdout  # the leaderboard shows each trial's share
