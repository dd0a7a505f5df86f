"""`python experiments/tune_t5.py`: flags -> Config -> checks -> Ray Tune sweep -> registry."""

from __future__ import annotations

import argparse
import os
import sys

from qlora_ray import notices
from qlora_ray.config import DEFAULT_PRESET, ConfigError, available_presets, load_config


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def _lr(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate like 2e-5 or a range like 1e-4:3e-3, got {text!r}") from None


# flag -> (section, key): every override lands in the same Config the YAML files fill.
FLAGS = {
    "model": ("model", "name"),
    "compute_dtype": ("model", "compute_dtype"),
    "trust_remote_code": ("model", "trust_remote_code"),
    "random_init": ("model", "random_init"),
    "dataset": ("data", "dataset"),
    "text_column": ("data", "text_column"),
    "summary_column": ("data", "summary_column"),
    "max_source_length": ("data", "max_source_length"),
    "max_target_length": ("data", "max_target_length"),
    "train_size": ("data", "train_size"),
    "eval_size": ("data", "eval_size"),
    "max_steps": ("train", "max_steps"),
    "eval_every": ("train", "eval_every"),
    "batch_size": ("train", "batch_size"),
    "optim": ("train", "optim"),
    "gradient_checkpointing": ("train", "gradient_checkpointing"),
    "num_samples": ("search", "num_samples"),
    "metric": ("search", "metric"),
    "mode": ("search", "mode"),
    "r": ("search", "r"),
    "lora_alpha": ("search", "lora_alpha"),
    "learning_rate": ("search", "learning_rate"),
    "target_modules": ("search", "target_modules"),
    "cpus_per_trial": ("search", "cpus_per_trial"),
    "gpus_per_trial": ("search", "gpus_per_trial"),
    "max_concurrent_trials": ("search", "max_concurrent_trials"),
    "top_k": ("search", "top_k"),
    "seed": ("search", "seed"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tune_t5.py",
        description="Tune QLoRA adapters with Ray Tune + Optuna + ASHA and publish the best to a registry.",
        epilog="Precedence: flags > --config > --preset > built-in defaults. Presets: "
        + ", ".join(available_presets()),
    )
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"preset name (default {DEFAULT_PRESET})")
    p.add_argument("--config", help="YAML file with model/data/lora/train/search sections")
    p.add_argument("--output-dir", help="where runs, sweeps and the registry go (default ./runs)")
    p.add_argument("--resume", action="store_true",
                   help="finish the latest sweep in --output-dir, with the settings it started with")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a running local cluster, "
                   "else a new one; 'local' always starts a new one)")
    p.add_argument("--verbose", action="store_true",
                   help="show the third-party notices a default run hides (see qlora_ray/notices.py)")
    p.add_argument("--storage", metavar="URI",
                   help="where trial results and checkpoints go: a directory every node sees, or s3://, gs://, "
                   "file:// (default <output-dir>/tune)")
    p.add_argument("--mlflow", metavar="URI",
                   help="log every trial to MLflow: a tracking URI such as sqlite:///runs/mlflow.db or http://host:5000")

    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="hub id or local directory of a seq2seq model (default: the embedded tiny T5)")
    g.add_argument("--compute-dtype", choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow the model repository's own code to run (off unless asked)")
    g.add_argument("--random-init", action="store_true", default=None,
                   help="the model's architecture with random weights (no hub needed; for timing and tests)")
    g.add_argument("--dataset", help="hub id or a local .json/.jsonl/.csv/.parquet file")
    g.add_argument("--text-column", help="column with the source text (default text)")
    g.add_argument("--summary-column", help="column with the reference summary (default summary)")
    g.add_argument("--max-source-length", type=int)
    g.add_argument("--max-target-length", type=int)
    g.add_argument("--train-size", type=int, help="cap on training examples")
    g.add_argument("--eval-size", type=int, help="held-out examples scored at every evaluation")

    g = p.add_argument_group("training (per trial)")
    g.add_argument("--max-steps", type=int)
    g.add_argument("--eval-every", type=int, help="steps between evaluations (each is one Tune report)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optim", help="transformers optimizer name (default auto: paged_adamw_8bit on GPU)")
    g.add_argument("--gradient-checkpointing", choices=["none", "feed-forward", "full"],
                   help="recompute in backward to save memory: FFN blocks only, or every layer (default none)")

    g = p.add_argument_group("search (a comma list is a choice, one value pins it)")
    g.add_argument("--num-samples", type=int, help="number of trials")
    g.add_argument("--metric", help="rougeL (default), rouge1, rouge2 or eval_loss")
    g.add_argument("--mode", choices=["max", "min"])
    g.add_argument("--r", type=_csv(int), help="LoRA ranks, e.g. 8,16,32")
    g.add_argument("--lora-alpha", type=_csv(int), help="LoRA alphas, e.g. 16,32")
    g.add_argument("--learning-rate", type=_lr, help="a rate (2e-5) or a log-uniform range (1e-4:3e-3)")
    g.add_argument("--target-modules", type=_csv(str),
                   help="named sets (qv, attention, all-linear) or modules joined by '+' (v+o)")
    g.add_argument("--cpus-per-trial", type=int)
    g.add_argument("--gpus-per-trial", type=float, help="default: 1 when the cluster has GPUs, else 0")
    g.add_argument("--max-concurrent-trials", type=int)
    g.add_argument("--top-k", type=int, help="adapters published to the registry (default 5)")
    g.add_argument("--seed", type=int, help="search seed")
    return p


def overrides_from(args: argparse.Namespace) -> dict:
    overrides: dict = {}
    for flag, (section, key) in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.mlflow:
        overrides["mlflow"] = args.mlflow
    if args.storage:
        overrides["storage"] = args.storage
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verbose:
        notices.be_verbose()
    try:
        config = load_config(args.preset, args.config, overrides_from(args))
        # Heavy imports (torch, transformers, ray) only once the cheap checks passed.
        # Tune's classic live table (CLIReporter) shows our parameter and metric columns.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        from qlora_ray import sweep

        prepared = sweep.prepare(config, resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = sweep.run(prepared, address=args.address)
    return 0 if summary["leaderboard"] else 1
