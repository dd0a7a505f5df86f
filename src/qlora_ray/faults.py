"""Injected failures, for the tests of failure handling (never active unless asked).

`QLORA_RAY_FAULTS` holds a JSON list of faults. Trial faults are applied by a Trainer
callback in every trial of the sweep (Ray workers inherit the driver's environment):

  {"kind": "crash", "step": 6}            raise after optimizer step 6 (Tune retries the trial)
  {"kind": "oom", "step": 2, "above": 4}  out of memory at step 2 while the micro-batch is > 4
  {"kind": "nan", "step": 3}              the adapter's weights become NaN after step 3

and one driver fault, at a named point of the sweep's own code:

  {"kind": "exit", "at": "publish_installed"}  the driver dies (os._exit) right after an
                                               adapter's files went into the registry,
                                               before the index names it

"once": true fires a fault only the first time any trial (or run) reaches it, across the
sweep and its retries: a marker file under "marker_dir" (required then) records it.
Only the standard library is imported here: the registry calls `exit_point`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

ENV = "QLORA_RAY_FAULTS"


def from_env() -> list[dict]:
    text = os.environ.get(ENV)
    return json.loads(text) if text else []


def _claim(index: int, fault: dict) -> bool:
    """False if a "once" fault already fired."""
    if not fault.get("once"):
        return True
    marker = Path(fault["marker_dir"]) / f"fault-{index}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def exit_point(name: str) -> None:
    for i, fault in enumerate(from_env()):
        if fault["kind"] == "exit" and fault["at"] == name and _claim(i, fault):
            print(f"injected: exiting at {name}", flush=True)
            os._exit(70)


def trainer_callback(micro_batch_size: int):
    """A Trainer callback that applies the trial faults, or None when none are set."""
    faults = [(i, f) for i, f in enumerate(from_env()) if f["kind"] in ("crash", "oom", "nan")]
    if not faults:
        return None
    import torch
    from transformers import TrainerCallback

    def due(kind: str, step: int) -> bool:
        return any(f["kind"] == kind and f["step"] == step
                   and not (kind == "oom" and micro_batch_size <= f.get("above", 0)) and _claim(i, f)
                   for i, f in faults)

    class InjectFaults(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if due("oom", state.global_step + 1):
                raise torch.OutOfMemoryError(
                    f"injected: CUDA out of memory at step {state.global_step + 1} (micro-batch {micro_batch_size})")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if due("crash", state.global_step):
                raise RuntimeError(f"injected crash after step {state.global_step}")
            if due("nan", state.global_step):
                with torch.no_grad():
                    for param in model.parameters():
                        if param.requires_grad:
                            param.fill_(math.nan)

    return InjectFaults()
