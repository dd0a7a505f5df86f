"""`python experiments/tune_t5.py`: flags -> Config -> checks -> Ray Tune sweep -> registry."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from qlora_ray import notices
from qlora_ray.config import DEFAULT_PRESET, SECTIONS, Config, ConfigError, available_presets, load_config


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def _lr(text: str) -> list[float]:
    try:  # low:high (or, for the grid, values: 1e-4,3e-4,1e-3)
        return [float(v) for v in text.replace(",", ":").split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate like 2e-5 or a range like 1e-4:3e-3, got {text!r}") from None


# Where each section's flags show in --help.
GROUPS = {"model": "model and data", "data": "model and data", "train": "training (per trial)",
          "search": "search (a comma list is a choice, one value pins it)"}


def settings_flags() -> list[tuple[str | None, dataclasses.Field]]:
    """(section, or None at the top level; field) for every setting that is a flag (config.setting with help)."""
    flags = [(None, f) for f in dataclasses.fields(Config) if f.metadata.get("help")]
    for section, cls in SECTIONS.items():
        flags += [(section, f) for f in dataclasses.fields(cls) if f.metadata.get("help")]
    return flags


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_flag(group, f: dataclasses.Field) -> None:
    """The argparse option for one setting: its type from the annotation, its text from the field."""
    kind = str(f.type).replace(" | None", "")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = (":" if kind == "list[float]" else ",").join(map(str, default)) if isinstance(default, list) else default
    text = f.metadata["help"] + ("" if kind == "bool" or shown is None else f" (default {shown})")
    if kind == "bool":
        group.add_argument(_flag_name(f), action="store_true", default=None, dest=f.name, help=text)
        return
    parse = {"int": int, "float": float, "str": str, "list[int]": _csv(int), "list[str]": _csv(str),
             "list[float]": _lr}[kind]
    options = {"choices": f.metadata["choices"]} if f.metadata.get("choices") else {"metavar": f.metadata["metavar"]}
    group.add_argument(_flag_name(f), *f.metadata.get("aliases", ()), type=parse, dest=f.name, help=text,
                       **options)


def parser(prog: str = "tune_t5.py", default_preset: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Tune QLoRA adapters with Ray Tune + Optuna + ASHA and publish the best to a registry.",
        epilog="Precedence: flags > --config > --preset > built-in defaults (the defaults shown; a preset may "
        "change them). Every flag is a setting of src/qlora_ray/config.py. Presets: "
        + ", ".join(available_presets()),
    )
    p.add_argument("--preset", default=default_preset, help=f"preset name (default {default_preset})")
    p.add_argument("--config", help="YAML file with model/data/lora/train/search sections")
    p.add_argument("--resume", action="store_true",
                   help="finish the latest sweep in --output-dir, with the settings it started with")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a running local cluster, "
                   "else a new one; 'local' always starts a new one)")
    p.add_argument("--verbose", action="store_true",
                   help="show the third-party notices a default run hides (see qlora_ray/notices.py)")
    groups: dict = {}
    for section, f in settings_flags():  # the settings' own flags, from config.py
        if section is None:
            add_flag(p, f)
        else:
            title = GROUPS[section]
            groups.setdefault(title, p.add_argument_group(title))
            add_flag(groups[title], f)
    return p


def overrides_from(args: argparse.Namespace) -> dict:
    overrides: dict = {}
    for section, f in settings_flags():
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if section is None:
            overrides[f.name] = value
        else:
            overrides.setdefault(section, {})[f.name] = value
    return overrides


def main(argv: list[str] | None = None, *, prog: str = "tune_t5.py", default_preset: str = DEFAULT_PRESET) -> int:
    args = parser(prog, default_preset).parse_args(argv)
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
