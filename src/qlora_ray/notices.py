"""Third-party notices a sweep's output would otherwise be buried in, silenced one by one.

Each entry is a known, understood message that needs no action from the user. Everything
else still shows. `--verbose` (QLORA_RAY_VERBOSE=1, which Ray workers inherit) keeps them all.
Installed when the package is imported, so Ray's trial workers get it before they import
bitsandbytes, PEFT or transformers.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "QLORA_RAY_VERBOSE"

# (category, message regex, why it is safe to hide)
WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "PEFT reads transformers' old property name when wrapping the model; nothing for us to change"),
    (UserWarning, r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
     "the recipe trains its own lm_head copy (modules_to_save) on purpose, untied from the input embeddings"),
]
# logger name -> level: loggers that report optional accelerations as warnings.
LOGGERS = {
    # "Failed to load CPU gemm_4bit_forward from kernels-community": an optional Hub kernel for
    # CPU inference, which cannot be fetched offline; the built-in kernel is used instead.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    # "Token authentication is enabled for this Ray cluster": Ray's default, which we keep (README, Security).
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # "Checkpoint successfully created at ...": one line per evaluation per trial; report.md lists them.
    "ray.train._internal.storage": logging.WARNING,
}
# Environment settings with the same purpose.
ENVIRONMENT = {
    # Tune's "Experiment state snapshotting has been triggered multiple times": a snapshot per
    # checkpoint is what we want (a resumed sweep then re-runs nothing finished).
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_third_party() -> None:
    if verbose():
        return
    for category, message, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, level in LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def be_verbose() -> None:
    """Undo quiet_third_party (it ran at import) and tell Ray workers to skip it."""
    os.environ[VERBOSE_ENV] = "1"
    for category, message, _why in WARNINGS:
        warnings.filterwarnings("default", message=message, category=category)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name, value in ENVIRONMENT.items():
        if os.environ.get(name) == value:
            del os.environ[name]
