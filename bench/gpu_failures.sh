#!/usr/bin/env bash
# Failure handling on a real GPU (run through the device tool; bundle as in bench/gpu_smoke.sh):
# 1. exact resume with the GPU recipe's optimizer (paged_adamw_8bit) and bf16: the tiny T5 trial
#    uninterrupted vs crashed after step 6 (injected) and retried by Tune from its step-4 checkpoint;
# 2. a real CUDA out-of-memory: T5-3b (random weights) without gradient checkpointing at micro-batch
#    256 (sources up to 1024 tokens) does not fit in 80 GB (32 does); the trial halves its micro-batch
#    (doubling accumulation) until it fits, and finishes. SKIP_RESUME=1 runs only this part.
# Writes logs, resume_gpu.json and oom_summary.json under ${OUT:-bench/results/gpu_failures}.
set -uo pipefail
out="${OUT:-bench/results/gpu_failures}"; mkdir -p "$out"
export QLORA_RAY_CACHE="${QLORA_RAY_CACHE:-/tmp/qlora-ray-cache}" RAY_DEDUP_LOGS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
date -u +%Y-%m-%dT%H:%M:%SZ >> "$out/device.txt"

if [ -z "${SKIP_RESUME:-}" ]; then
tiny=(--model "${TINY_MODEL:-$PWD/.device/tiny-t5}" --num-samples 1 --max-steps 12 --eval-every 4 --train-size 64
      --eval-size 8 --r 4 --lora-alpha 16 --learning-rate 3e-3 --target-modules qv --optim paged_adamw_8bit
      --address local)
python3 experiments/tune_t5.py "${tiny[@]}" --output-dir /tmp/resume-a > "$out/resume_uninterrupted.log" 2>&1
mkdir -p /tmp/resume-marks
QLORA_RAY_FAULTS='[{"kind": "crash", "step": 6, "once": true, "marker_dir": "/tmp/resume-marks"}]' \
  python3 experiments/tune_t5.py "${tiny[@]}" --output-dir /tmp/resume-b > "$out/resume_crashed.log" 2>&1
python3 - /tmp/resume-a /tmp/resume-b "$out/resume_gpu.json" <<'PY'
import glob, json, sys
def rows(out):
    (path,) = glob.glob(f"{out}/tune/sweep-*/trial-*/result.json")
    return [json.loads(line) for line in open(path)]
a, b = rows(sys.argv[1]), rows(sys.argv[2])
keys = ("eval_loss", "train_loss", "rougeL")
diff = {k: max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b)) for k in keys}
report = {"steps_uninterrupted": [r["step"] for r in a], "steps_crashed_and_retried": [r["step"] for r in b],
          "uninterrupted": [{k: r[k] for k in ("step", *keys)} for r in a],
          "crashed_and_retried": [{k: r[k] for k in ("step", *keys)} for r in b],
          "max_relative_difference": diff}
json.dump(report, open(sys.argv[3], "w"), indent=2)
print(json.dumps(report["max_relative_difference"]), report["steps_crashed_and_retried"])
PY
grep -h "injected crash\|Restored" "$out/resume_crashed.log" | head -3
fi

python3 experiments/tune_t5.py --preset t5-3b-billsum --random-init --dataset embedded:stdlib-docstrings \
  --output-dir /tmp/oom-$$ --num-samples 1 --max-steps 4 --eval-every 2 --eval-size 8 --train-size 512 \
  --max-target-length 32 --batch-size "${BATCH:-256}" --gradient-checkpointing none --r 8 --lora-alpha 16 \
  --learning-rate 1e-4 --target-modules qv --address local > "$out/oom.log" 2>&1
echo "oom sweep exit $?"
cp "$(ls -d /tmp/oom-$$/sweeps/*/ | tail -1)summary.json" "$out/oom_summary.json"
grep -h "Out of memory with\|trials in\|out of memory [0-9]x" "$out/oom.log" | cut -c1-400
python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['leaderboard'][0]; print('micro_batch_size', r['micro_batch_size'], 'oom_retries', r['oom_retries'], r['status'])" "$out/oom_summary.json"
