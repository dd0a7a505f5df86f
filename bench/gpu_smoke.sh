#!/usr/bin/env bash
# A short sweep and Serve round trip on a GPU machine (run through the device tool, see
# ../shared/device/README.md): checks that trials take {"gpu": 1} automatically, train with
# bf16 compute and paged_adamw_8bit, and that the Serve replica answers from the GPU.
# Writes the logs under ${OUT:-./bench/results/gpu_smoke}. Bundle (Serve needs a grpcio-reflection
# that matches the image's grpcio 1.84):
#   ../shared/device/make_bundle.sh "ray[tune,serve]==2.60.0" bitsandbytes==0.50.2 peft==0.21.2 trl==1.16.0 \
#     datasets==5.2.0 optuna==5.0.0 evaluate==0.4.6 rouge-score==0.1.2 nltk absl-py grpcio-reflection==1.84.0
set -uo pipefail
out="${OUT:-bench/results/gpu_smoke}"; mkdir -p "$out"
export QLORA_RAY_CACHE="${QLORA_RAY_CACHE:-/tmp/qlora-ray-cache}" RAY_DEDUP_LOGS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
date -u +%Y-%m-%dT%H:%M:%SZ >> "$out/device.txt"
start=$(date +%s)
python3 experiments/tune_t5.py --output-dir /tmp/gpu-runs --num-samples "${SAMPLES:-4}" --max-steps "${STEPS:-120}" \
  --eval-every "$(( ${STEPS:-120} / 4 ))" \
  2>&1 | tee "$out/sweep.log" | grep -E "Sweep|Leaderboard|^ *[0-9]+\*? |base model|trials in|published|error" 
echo "sweep wall: $(( $(date +%s) - start )) s" | tee -a "$out/sweep.log"
cp /tmp/gpu-runs/sweeps/*/summary.json "$out/summary.json" 2>/dev/null
# `serve run serve.app`, through python3: the bundle's console scripts point at another interpreter.
# In its own session, so that stopping it (and the Ray instance it started) touches nothing else.
QLORA_RAY_REGISTRY=/tmp/gpu-runs/registry setsid python3 -c "from ray.serve.scripts import cli; cli()" run serve.app > "$out/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 1 90); do curl -sf localhost:8000/healthz >/dev/null && break; sleep 2; done
{
  curl -s localhost:8000/v1/adapters | python3 -c "import json,sys; d=json.load(sys.stdin); print('default', d['default'], len(d['adapters']), 'adapters')"
  for id in $(python3 -c "import json; print(' '.join(a['id'] for a in json.load(open('/tmp/gpu-runs/registry/index.json'))['adapters'][:2]))"); do
    curl -s localhost:8000/v1/summarize -H "Content-Type: application/json" -d "{\"text\": [\"def add(a, b):\\n    return a + b\", \"def read(path):\\n    with open(path) as f:\\n        return f.read()\"], \"adapter\": \"$id\"}"; echo
  done
  curl -s -w " %{http_code}\n" localhost:8000/v1/summarize -H "Content-Type: application/json" -d '{"text": "x", "adapter": "../etc"}'
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv
} 2>&1 | tee "$out/serve_requests.txt"
kill -INT -- "-$serve_pid" 2>/dev/null; sleep 15; kill -KILL -- "-$serve_pid" 2>/dev/null
