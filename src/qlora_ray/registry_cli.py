"""`qlora-ray`: list, import, promote and remove adapters in a registry; estimate a trial's memory.

A running server re-reads index.json, so every change takes effect live. Errors are one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qlora_ray.adapter_check import AdapterInvalid, check_adapter
from qlora_ray.cli import add_flag, overrides_from, settings_flags
from qlora_ray.config import DEFAULT_PRESET
from qlora_ray.registry import INDEX, Registry, RegistryError, check_adapter_id, entry_load, entry_task

DEFAULT_REGISTRY = "./runs/registry"
PROG = "qlora-ray"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        _fail(f"{message} (see {self.prog} --help)")


def _fail(message: str):
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Manage the adapters of a qlora-ray registry (a running server sees "
                                            "changes live).")
    registry_help = f"the registry directory (default: $QLORA_RAY_REGISTRY or {DEFAULT_REGISTRY})"
    parser.add_argument("--registry", default=None, help=registry_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=argparse.SUPPRESS, help=registry_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("list", parents=[common], help="the adapters, their settings, metric and validity")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("import", parents=[common], help="validate a PEFT LoRA adapter directory and add it")
    p.add_argument("directory", help="a directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--id", required=True, dest="adapter_id", help="the new adapter's id (its directory name)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="import an adapter whose base_model_name_or_path is not the registry's base "
                        "(the shapes are still checked)")

    p = sub.add_parser("promote", parents=[common], help="make an adapter the default (later sweeps keep it)")
    p.add_argument("adapter_id", metavar="ID")

    p = sub.add_parser("remove", parents=[common], help="remove an adapter and its files")
    p.add_argument("adapter_id", metavar="ID")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    p = sub.add_parser("estimate", help="predict a trial's peak GPU memory (no GPU needed), with the breakdown",
                       description="Predict the peak GPU memory of the sweep's trials from the model's config: "
                       "one row per searched target set at the largest searched r. The same flags as tune_t5.py.")
    p.add_argument("--preset", default=DEFAULT_PRESET)
    p.add_argument("--config", help="YAML file with model/data/lora/train/search sections")
    p.add_argument("--gpu-gb", type=float, help="a GPU size to check against (GB): prints the micro-batch that fits")
    for _section, f in settings_flags():
        if f.name not in ("output_dir", "storage", "mlflow"):
            add_flag(p, f)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "estimate":
        return _estimate(args)
    root = args.registry or os.environ.get("QLORA_RAY_REGISTRY") or DEFAULT_REGISTRY
    registry = Registry(Path(root).expanduser())
    try:
        if not registry.exists():
            raise RegistryError(f"no registry at {registry.root} (no {INDEX}); pass --registry or set "
                                "QLORA_RAY_REGISTRY")
        if args.command == "list":
            return _list(registry, args.json)
        if args.command == "import":
            entry = registry.import_adapter(args.directory, args.adapter_id,
                                            allow_base_mismatch=args.allow_base_mismatch)
            default = registry.read().get("default")
            print(f"imported {entry['id']} (r {entry['hyperparameters']['r']}, alpha "
                  f"{entry['hyperparameters']['lora_alpha']}) into {registry.root}"
                  + (" as the default" if default == entry["id"] else f"; the default is still {default}"))
        elif args.command == "promote":
            registry.promote(args.adapter_id)
            print(f"{args.adapter_id} is now the default (pinned: later sweeps keep it)")
        elif args.command == "remove":
            registry.adapter(args.adapter_id)  # unknown ids fail before the question
            if not args.yes:
                _confirm(f"remove adapter {args.adapter_id} and its files from {registry.root}?")
            default = registry.remove(args.adapter_id)
            print(f"removed {args.adapter_id}; the default is {default or 'none (the registry is empty)'}")
    except BrokenPipeError:  # `qlora-ray list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (RegistryError, AdapterInvalid) as e:
        _fail(str(e))
    except (OSError, json.JSONDecodeError) as e:
        _fail(f"{type(e).__name__}: {e}")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from qlora_ray import memory, random_init
    from qlora_ray.config import ConfigError, load_config

    try:
        config = load_config(args.preset, args.config, overrides_from(args))
        name = config.model.name
        if name in random_init.KNOWN_ARCHITECTURES:  # no weights, no hub: the shipped config
            model_config = random_init.architecture_config(name)
        else:
            from transformers import AutoConfig

            from qlora_ray.model import resolve_model_path

            model_config = AutoConfig.from_pretrained(resolve_model_path(config.model, progress=False),
                                                      trust_remote_code=config.model.trust_remote_code)
        dtype = "bfloat16" if config.model.compute_dtype == "auto" else config.model.compute_dtype
        r = max(config.search.r)
        print(f"{name}: micro-batch {config.train.batch_size} x {config.train.gradient_accumulation_steps}, "
              f"checkpointing {config.train.gradient_checkpointing}, r {r}, {dtype}")
        for targets in config.search.target_modules:
            hparams = {"r": r, "target_modules": targets}
            estimate = memory.estimate_trial(model_config, config, hparams, compute_dtype=dtype)
            line = f"  targets {targets:<12} predicted peak {estimate.total_gb:7.2f} GB"
            if args.gpu_gb:  # what a trial on that GPU does (trial.plan_to_fit): halve until it fits
                micro = config.train.batch_size

                def fits(micro: int, hparams=hparams) -> bool:
                    return memory.estimate_trial(model_config, config, hparams, micro_batch_size=micro,
                                                 compute_dtype=dtype).fits(args.gpu_gb)

                while micro > 1 and not fits(micro):
                    micro //= 2
                accumulation = config.train.gradient_accumulation_steps * config.train.batch_size // micro
                if not fits(micro):
                    line += f"  does not fit {args.gpu_gb:g} GB even at micro-batch 1"
                elif micro == config.train.batch_size:
                    line += f"  fits {args.gpu_gb:g} GB"
                else:
                    line += f"  {args.gpu_gb:g} GB: micro-batch {micro} x {accumulation} accumulation"
            print(line)
        print("breakdown of the last row:\n" + estimate.table())
    except (ConfigError, ValueError, OSError) as e:
        _fail(str(e))
    return 0


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        _fail("refusing to remove without --yes (stdin is not a terminal)")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        _fail("not removed")


def _validity(registry: Registry, index: dict) -> dict[str, str | None]:
    """Each adapter's problem (None: valid), checked against the registry's base."""
    try:
        base = registry.base_spec(index)
    except RegistryError as e:
        return {a["id"]: f"base model not checkable: {e}" for a in index["adapters"]}
    result: dict[str, str | None] = {}
    for entry in index["adapters"]:
        try:
            check_adapter(registry.root / check_adapter_id(entry["id"]), base)
            result[entry["id"]] = None
        except (AdapterInvalid, RegistryError) as e:
            result[entry["id"]] = str(e)
    return result


def _list(registry: Registry, as_json: bool) -> int:
    index = registry.read()
    problems = _validity(registry, index)
    metric = index.get("metric") or "rougeL"
    default = index.get("default")
    if as_json:
        out = {k: index.get(k) for k in ("default", "pinned_default", "base_model", "base_metrics", "metric", "mode")}
        out["registry"] = str(registry.root)
        out["adapters"] = [
            entry | {"default": entry["id"] == default, "valid": problems[entry["id"]] is None,
                     "rejected": problems[entry["id"]], "load": entry_load(index, entry),
                     "task": entry_task(index, entry), "source": _source(entry)}
            for entry in index["adapters"]
        ]
        print(json.dumps(out, indent=2))
        return 0
    pinned = " (promoted)" if index.get("pinned_default") else ""
    print(f"registry {registry.root}\nbase model {index.get('base_model')}; default {default}{pinned}; "
          f"metric {metric} ({index.get('mode') or 'max'})")
    base_value = (index.get("base_metrics") or {}).get(metric)
    if base_value is not None:
        print(f"base model {metric}: {base_value:.4f}")
    rows = [("", "id", "r", "alpha", "targets", metric, "source", "status")]
    for entry in index["adapters"]:
        hp = entry.get("hyperparameters") or {}
        targets = hp.get("target_modules")
        targets = "+".join(targets) if isinstance(targets, list) else str(targets)
        value = (entry.get("metrics") or {}).get(metric)
        problem = problems[entry["id"]]
        rows.append(("*" if entry["id"] == default else "", entry["id"], str(hp.get("r", "?")),
                     str(hp.get("lora_alpha", "?")), targets, "-" if value is None else f"{value:.4f}",
                     _source(entry), "ok" if problem is None else f"rejected: {problem}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    if len(rows) == 1:
        print("(no adapters)")
    return 0


def _source(entry: dict) -> str:
    return entry.get("source") or ("sweep" if entry.get("sweep") else "unknown")


if __name__ == "__main__":
    sys.exit(main())
