"""qlora-ray: QLoRA adapters tuned by Ray Tune + Optuna, served from one base by Ray Serve."""

from qlora_ray.notices import quiet_third_party

__version__ = "0.1.0"

quiet_third_party()
