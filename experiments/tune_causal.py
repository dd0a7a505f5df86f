"""Tune QLoRA adapters for a causal LM (decoder-only; TRL's SFTTrainer) and publish the best.

    python experiments/tune_causal.py                          # offline default: tiny Llama, stdlib corpus
    python experiments/tune_causal.py --preset phi-2-dialogsum  # the Phi-2 recipe (needs a GPU and the hub)
    python experiments/tune_causal.py --help                   # the same flags as tune_t5.py
"""

import sys

from qlora_ray.cli import main
from qlora_ray.config import DEFAULT_CAUSAL_PRESET

if __name__ == "__main__":
    sys.exit(main(prog="tune_causal.py", default_preset=DEFAULT_CAUSAL_PRESET))
