"""qlora-ray: QLoRA adapters tuned by Ray Tune + Optuna, served from one base by Ray Serve."""

__version__ = "0.1.0"
