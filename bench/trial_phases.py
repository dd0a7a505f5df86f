"""Where a sweep trial's wall time goes, phase by phase, outside Ray.

Run on a GPU (through the device tool; bundle as in bench/gpu_smoke.sh):

    python3 bench/trial_phases.py --out $OUT

Runs what `trial.run_trial` runs, with the sweep settings of bench/gpu_sweep.sh (the
t5-3b-billsum preset, --random-init, the embedded corpus), and times imports, the 4-bit
load + adapter, the Trainer build, every training step, every evaluation (ROUGE by
generation) and one adapter save (what each Tune report checkpoints). Writes
trial_phases.json under --out.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qlora_ray import sweep, trial  # noqa: E402
from qlora_ray.config import load_config  # noqa: E402

HPARAMS = {"r": 32, "lora_alpha": 16, "target_modules": "v+o", "learning_rate": 1e-4}


class Clock(TrainerCallback):
    def __init__(self):
        self.marks: list[tuple[str, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.marks.append((f"step {state.global_step}", time.perf_counter()))

    def on_evaluate(self, args, state, control, **kwargs):
        self.marks.append((f"eval at {state.global_step}", time.perf_counter()))


def main() -> None:
    imports = time.perf_counter() - T0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-size", type=int, default=8)
    ap.add_argument("--eval-generation", choices=["auto", "engine", "generate"], default="auto",
                    help="how ROUGE's summaries are generated (train.eval_generation)")
    ap.add_argument("--compile", choices=["auto", "none", "blocks"], default="auto", help="train.compile")
    ap.add_argument("--name", default="trial_phases", help="the result file's name (without .json)")
    args = ap.parse_args()
    phases: dict[str, float] = {"imports": imports}

    t = time.perf_counter()
    config = load_config("t5-3b-billsum", overrides={
        "model": {"random_init": True},
        "data": {"dataset": "embedded:stdlib-docstrings", "eval_size": args.eval_size},
        "train": {"max_steps": args.steps, "eval_every": args.eval_every, "eval_generation": args.eval_generation,
                  "compile": args.compile},
    })
    prepared = sweep.prepare(config)
    phases["prepare (driver: data, model checks, tokenize)"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    phases["cuda init"] = time.perf_counter() - t

    t = time.perf_counter()
    tokenizer = trial.load_tokenizer(prepared.model_path, config.model)
    model = trial.build_model(prepared.model_path, config, HPARAMS)
    torch.cuda.synchronize()
    phases["build_model (4-bit load + LoRA)"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        trainer = trial.build_trainer(model, tokenizer, prepared.data, config, work, HPARAMS["learning_rate"],
                                      max_steps=args.steps)
        clock = Clock()
        trainer.add_callback(clock)
        phases["build_trainer"] = time.perf_counter() - t

        t = start = time.perf_counter()
        trainer.train()
        phases["train() total"] = time.perf_counter() - t

        t = time.perf_counter()
        model.save_pretrained(Path(work) / "adapter", safe_serialization=True)
        phases["one adapter save (each Tune report)"] = time.perf_counter() - t
        adapter_mb = sum(f.stat().st_size for f in (Path(work) / "adapter").iterdir()) / 1e6

    steps, evals, prev = [], [], start
    for name, mark in clock.marks:
        (evals if name.startswith("eval") else steps).append(mark - prev)
        prev = mark
    phases["train steps (sum)"] = sum(steps)
    phases["evaluations (sum)"] = sum(evals)
    result = {
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "settings": {"preset": "t5-3b-billsum", "random_init": True, "dataset": "embedded:stdlib-docstrings",
                     "steps": args.steps, "eval_every": args.eval_every, "eval_size": args.eval_size,
                     "batch_size": config.train.batch_size, "hparams": HPARAMS,
                     "eval_generation": args.eval_generation, "compile": args.compile},
        "seconds": {k: round(v, 2) for k, v in phases.items()},
        "step_s": [round(s, 3) for s in steps],
        "eval_s": [round(s, 2) for s in evals],
        "eval_metrics": [{k: round(v, 5) for k, v in row.items() if k in ("step", "eval_loss", "eval_rougeL",
                                                                        "eval_gen_len")}
                         for row in trainer.state.log_history if "eval_loss" in row],
        "adapter_checkpoint_mb": round(adapter_mb, 1),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
