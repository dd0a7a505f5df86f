"""Ray Serve application: `serve run serve.app` (see serve/__init__.py and serve/config.yaml)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ray
from ray.serve import Application

from qlora_ray.serving.api import Api
from qlora_ray.serving.replica import AdapterModel
from qlora_ray.serving.settings import ServeSettings


def build_app(args: dict | None = None) -> Application:
    """The application; `args` are ServeSettings fields (a Serve config file's `args`)."""
    settings = ServeSettings.load(args)
    # Replicas run elsewhere (other processes, maybe other nodes): never a cwd-relative path.
    roots = [str(Path(r).expanduser().resolve()) for r in settings.registries()]
    settings = dataclasses.replace(settings, registry=",".join(roots))
    settings.validate()  # two spellings of one directory
    num_gpus = settings.num_gpus
    if num_gpus is None:  # serve run has connected to Ray before it imports the app
        has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
        # Several registries share one GPU by default (their bases side by side); num_gpus=1 gives each its own.
        num_gpus = 1 / len(roots) if has_gpu else 0
    models = [
        AdapterModel.options(
            # One deployment per registry (its own base): AdapterModel, AdapterModel_2, ...
            name="AdapterModel" if i == 0 else f"AdapterModel_{i + 1}",
            num_replicas=settings.num_replicas,
            ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": num_gpus},
            # Enough in the replica for a full batch plus the next one waiting to join between
            # steps; beyond that callers queue (bounded: BackPressureError -> 503).
            max_ongoing_requests=2 * settings.max_batch_size,
            max_queued_requests=settings.max_queued_requests,
        ).bind(dataclasses.replace(settings, registry=root))
        for i, root in enumerate(roots)
    ]
    return Api.bind(models, settings)


__all__ = ["build_app", "ServeSettings"]
