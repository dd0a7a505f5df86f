"""`serve run serve.app` from the project root serves ./runs/registry (or $QLORA_RAY_REGISTRY).

`serve run serve/config.yaml` does the same with settings in a Serve config file, whose
`args` go to `serve.build` (fields of qlora_ray.serving.ServeSettings).
"""

from qlora_ray.serving import build_app

build = build_app  # application builder for Serve config files: import_path: serve:build
app = build_app()
