#!/usr/bin/env bash
# A T5-3b sweep on one GPU (run through the device tool; bundle as in bench/gpu_smoke.sh):
# the t5-3b-billsum preset with --random-init (no hub there) on the embedded corpus, Optuna + ASHA,
# GPU utilization sampled every 2 s. GPUS_PER_TRIAL=0.5 runs two trials at once on the GPU.
# LONG=1 trains on billsum-length documents (bench/long_documents.py: 1024 source / 128 target tokens
# after truncation, the recipe's shapes) instead of the short docstring pairs.
# Writes sweep.log, gpu_util.csv and summary.json under ${OUT:-bench/results/gpu_sweep}.
# Extra arguments go to tune_t5.py (after these, so they win); SWEEP_DIR (default /tmp/gpu-sweep) is its
# --output-dir; TIMEOUT (seconds) interrupts the sweep like Ctrl-C past it. bench/multi_gpu.sh uses all three.
set -uo pipefail
out="${OUT:-bench/results/gpu_sweep}"; mkdir -p "$out"
sweep_dir="${SWEEP_DIR:-/tmp/gpu-sweep}"
export QLORA_RAY_CACHE="${QLORA_RAY_CACHE:-/tmp/qlora-ray-cache}" RAY_DEDUP_LOGS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
date -u +%Y-%m-%dT%H:%M:%SZ >> "$out/device.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 2 > "$out/gpu_util.csv" &
smi=$!
start=$(date +%s)
dataset=embedded:stdlib-docstrings
if [ "${LONG:-0}" = 1 ]; then dataset=/tmp/long-docs.jsonl; python3 bench/long_documents.py "$dataset" | tee "$out/dataset.txt"; fi
${TIMEOUT:+timeout -s INT -k 60 "$TIMEOUT"} python3 experiments/tune_t5.py --preset t5-3b-billsum --random-init --dataset "$dataset" \
  --output-dir "$sweep_dir" --num-samples "${SAMPLES:-4}" --max-steps "${STEPS:-30}" --eval-every "${EVAL_EVERY:-10}" \
  --eval-size "${EVAL_SIZE:-8}" --gpus-per-trial "${GPUS_PER_TRIAL:-1}" "$@" > "$out/sweep.log" 2>&1
rc=$?
echo "sweep exit $rc, wall $(( $(date +%s) - start )) s" | tee -a "$out/sweep.log"
kill $smi
cp "$sweep_dir"/sweeps/*/summary.json "$out/summary.json" 2>/dev/null
python3 - "$out/gpu_util.csv" <<'PY' | tee -a "$out/sweep.log"
import sys
rows = [l.split(", ") for l in open(sys.argv[1]) if l.count(",") == 2]
util = [int(r[1].split()[0]) for r in rows]
mem = [int(r[2].split()[0]) for r in rows]
if util:
    print(f"GPU utilization: mean {sum(util) / len(util):.0f}% over {len(util)} samples (every 2 s); "
          f"busy (>0%) {sum(u > 0 for u in util) / len(util):.0%}; peak memory used {max(mem)} MiB")
PY
grep -E "Sweep|trials in|stopped|published|base model|Leaderboard|error" "$out/sweep.log" | head -30
# (the sweep's driver started its own Ray instance and stopped it on exit: nothing else to stop)
