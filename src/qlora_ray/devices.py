"""Which GPU a process's tensors are on, as one log line (a trial's or a Serve replica's).

A trial and a model replica each print `device_note(...)` once: the tag, then JSON with the
process's CUDA_VISIBLE_DEVICES (set by Ray for the GPU it was given), Ray's GPU ids, the torch
device of the model's weights and that GPU's name and UUID (nvidia-smi's `GPU-...` spelling, so
nvidia-smi's index follows from `--query-gpu=index,uuid`). `bench/multi_gpu_summary.py` reads
the lines back out of the logs. Never raises: a note that cannot be made says why.
"""

from __future__ import annotations

import json
import os
import socket

DEVICE_TAG = "qlora-ray device:"


def describe(model=None, **extra) -> dict:
    """This process's GPU assignment and the device of `model`'s weights (else the current CUDA device)."""
    import torch

    info: dict = {"pid": os.getpid(), "hostname": socket.gethostname(),
                  "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import ray

        if ray.is_initialized():
            info["ray_gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # not in a Ray worker
        pass
    device = None
    if model is not None:
        device = next((p.device for p in model.parameters()), None)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    info["device"] = str(device) if device is not None else "cpu"
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_name"] = props.name
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            uuid = str(uuid)
            info["gpu_uuid"] = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    return info | extra


def device_note(model=None, **extra) -> str:
    """`DEVICE_TAG {json}`: see the module docstring."""
    try:
        return f"{DEVICE_TAG} {json.dumps(describe(model, **extra), sort_keys=True)}"
    except Exception as e:
        return f"{DEVICE_TAG} {json.dumps({'pid': os.getpid(), 'error': f'{type(e).__name__}: {e}'} | extra)}"


def trial_id() -> str | None:
    """The running Tune trial's id, or None outside one."""
    try:
        from ray import tune

        return tune.get_context().get_trial_id()
    except Exception:
        return None


def replica_id() -> str | None:
    """The running Serve replica's id, or None outside one."""
    try:
        from ray import serve

        rid = serve.get_replica_context().replica_id
        return str(getattr(rid, "unique_id", rid))
    except Exception:
        return None
