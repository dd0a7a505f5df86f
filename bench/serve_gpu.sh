#!/usr/bin/env bash
# Serving throughput on a GPU machine: bench/serve_throughput.py with T5-3b's architecture (random
# weights, built offline) and 32 synthetic adapters: PEFT baseline, then the Serve application under
# 32 concurrent clients. Run through the device tool with the bundle (as in bench/gpu_smoke.sh),
# carry [".device"], command:
#   [ -f /tmp/site/.unpacked ] || { mkdir -p /tmp/site && tar xJf .device/site.tar.xz -C /tmp/site && touch /tmp/site/.unpacked; }; export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH; bash bench/serve_gpu.sh
# Extra arguments go to serve_throughput.py, e.g. `bash bench/serve_gpu.sh --with-lm-head` (adapters with
# their own lm_head: a separate device command) or `--seconds 10 --no-peft-baseline`. The run stops
# itself after MAX_WALL (default 480) seconds, keeping what it measured (a device command has 600).
# Writes serve_throughput[_lm_head].json, serve[_lm_head].log, gpu_util[_lm_head].csv and device.txt
# under ${OUT:-bench/results/serve_gpu}.
set -uo pipefail
out="${OUT:-bench/results/serve_gpu}"; mkdir -p "$out"
export QLORA_RAY_CACHE="${QLORA_RAY_CACHE:-/tmp/qlora-ray-cache}" RAY_DEDUP_LOGS=0
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
name=serve_throughput; log=serve; util=gpu_util
for arg in "$@"; do
  if [ "$arg" = "--with-lm-head" ]; then name+=_lm_head; log+=_lm_head; util+=_lm_head; fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
date -u +%Y-%m-%dT%H:%M:%SZ >> "$out/device.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 > "$out/$util.csv" &
smi=$!
start=$(date +%s)
# python3, not console scripts: on the device machine they may point at another interpreter.
python3 bench/serve_throughput.py --model t5-3b --max-wall "${MAX_WALL:-480}" --out "$out/$name.json" \
  --server-log "$out/$log.log" "$@"
rc=$?
kill "$smi" 2>/dev/null
echo "exit $rc, wall $(( $(date +%s) - start )) s"
python3 - "$out/$util.csv" <<'PY'
import sys
rows = [l.split(", ") for l in open(sys.argv[1]) if l.count(",") == 2]
util = [int(r[1].split()[0]) for r in rows if r[1].split()[0].isdigit()]
mem = [int(r[2].split()[0]) for r in rows if r[2].split()[0].isdigit()]
if util:
    print(f"GPU utilization: mean {sum(util) / len(util):.0f}% over {len(util)} samples (every 1 s); "
          f"peak memory used {max(mem)} MiB")
PY
exit $rc
