"""Tune QLoRA adapters for a seq2seq model (T5 by default) and publish the best.

    python experiments/tune_t5.py                       # offline default: tiny T5, stdlib corpus
    python experiments/tune_t5.py --preset t5-3b-billsum # the T5-3b recipe (needs a GPU and the hub)
    python experiments/tune_t5.py --help
"""

import sys

from qlora_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
