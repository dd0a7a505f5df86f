#!/usr/bin/env bash
# Issue 12: many T5-3b trials at once on a multi-GPU host, and Serve replicas across its GPUs.
# N = the GPUs nvidia-smi lists (GPUS=k overrides it). Four stages (STAGES, comma-separated, default all):
#   sweep_one_gpu       bench/gpu_sweep.sh with CUDA_VISIBLE_DEVICES=0 for the Ray instance the sweep starts:
#                       2N trials of the t5-3b-billsum preset (--random-init), one at a time on GPU 0
#   sweep_all_gpus      the same 2N trials with every GPU: one GPU per trial, N at once
#   serve_one_replica   bench/serve_gpu.sh (bench/serve_throughput.py): the Serve app with 1 replica on GPU 0,
#                       CLIENTS closed-loop clients, uniform over 8 adapters
#   serve_all_replicas  num_replicas=N (one GPU each), CLIENTS x N clients, each replica's batch still CLIENTS rows
# The trials are a grid, so both sweeps run the same ones: r 16 and 32 (alpha 32, lr 1e-4, q,v), N times
# each, every trial to the end (no ASHA: the wall times compare like with like), STEPS steps, an
# evaluation every EVAL_EVERY on EVAL_SIZE examples. With N = 1 the two "all" stages would repeat the
# "one" stages exactly: skipped unless DUPLICATE=1 (summary.json says so).
# Recorded over the whole run: gpu_trace.csv (nvidia-smi index, timestamp, utilization, memory, every 1 s),
# compute_apps.csv (which process holds memory on which GPU, where nvidia-smi shows processes),
# gpus.csv, stages.csv (each stage's start, end, exit status). Each trial and each replica logs its
# CUDA_VISIBLE_DEVICES and the device its weights are on (qlora_ray/devices.py: "qlora-ray device:"
# lines in sweep.log / serve.log). Then bench/multi_gpu_summary.py writes summary.json (the issue's keys),
# details.json (per trial, per replica, per GPU, the goals) and table.md.
#
# Through the device tool (bundle as in ../shared/device/README.md, carry [".device"]), one call:
#   [ -f /tmp/site/.unpacked ] || { ...unpack... }; export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 \
#     PATH=/tmp/site/bin:$PATH; bash bench/multi_gpu.sh
# The device tool brings back at most 8 files, none deeper than $OUT/a/b/: run with OUT=/tmp/mg/multi_gpu and
# end the command with `tar czf $OUT/multi_gpu.tar.gz -C /tmp/mg multi_gpu` (the stage folders hold the logs
# and each trial's Tune reports). The run of 2026-12-04 wrote straight to $OUT and got back only the 8
# top-level files (details.json has what the summary read from the rest).
# A stage over the 10-minute call limit (the one-GPU sweep of 2N trials grows with N): run the stages in
# separate calls (STAGES=sweep_one_gpu, then STAGES=sweep_all_gpus,...), copy each call's $OUT into its own
# directory and merge: python3 bench/multi_gpu_summary.py DIR1 DIR2 --out bench/results/multi_gpu.
# SWEEP_TIMEOUT / SERVE_WALL (seconds) bound each sweep / serve stage; what was measured is kept.
# Writes under ${OUT:-bench/results/multi_gpu}.
set -uo pipefail
out="${OUT:-bench/results/multi_gpu}"; mkdir -p "$out"
out="$(cd "$out" && pwd)"
export QLORA_RAY_CACHE="${QLORA_RAY_CACHE:-/tmp/qlora-ray-cache}" RAY_DEDUP_LOGS=0
stages="${STAGES:-sweep_one_gpu,sweep_all_gpus,serve_one_replica,serve_all_replicas}"
n="${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)}"
[ "$n" -ge 1 ] 2>/dev/null || { echo "no GPU: nvidia-smi lists none" >&2; exit 1; }
clients="${CLIENTS:-32}"
log="$out/multi_gpu.log"
echo "multi_gpu: N=$n GPUs, stages $stages, $(date -u +%Y-%m-%dT%H:%M:%SZ)" | tee -a "$log"

nvidia-smi --query-gpu=index,uuid,name,memory.total,pci.bus_id,driver_version --format=csv > "$out/gpus.csv"
cat "$out/gpus.csv" | tee -a "$log"
nvidia-smi --query-gpu=index,timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$out/gpu_trace.csv" &
trace=$!
nvidia-smi --query-compute-apps=timestamp,gpu_uuid,pid,used_memory --format=csv -l 2 > "$out/compute_apps.csv" 2>/dev/null &
apps=$!
trap 'kill $trace $apps 2>/dev/null' EXIT
[ -f "$out/stages.csv" ] || echo "stage,start_epoch,start_local,end_epoch,end_local,rc" > "$out/stages.csv"

wanted() { case ",$stages," in *",$1,"*) return 0;; *) return 1;; esac; }

run_stage() {  # name, command...: timed into stages.csv (local time in nvidia-smi's format, for the trace)
  local name=$1; shift
  local t0 l0 rc
  t0=$(date +%s); l0=$(date '+%Y/%m/%d %H:%M:%S')
  echo "== $name ($l0): $*" | tee -a "$log"
  "$@" >> "$log" 2>&1
  rc=$?
  echo "$name,$t0,$l0,$(date +%s),$(date '+%Y/%m/%d %H:%M:%S'),$rc" >> "$out/stages.csv"
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$log"
}

sweep() {  # stage name: the grid of 2N trials; the caller's environment restricts the GPUs or not
  local dir="$out/$1" sweep_dir="/tmp/multi-gpu-$1" rc f
  rm -rf "$sweep_dir"
  OUT="$dir" SWEEP_DIR="$sweep_dir" SAMPLES="$n" STEPS="${STEPS:-10}" EVAL_EVERY="${EVAL_EVERY:-5}" \
    EVAL_SIZE="${EVAL_SIZE:-8}" GPUS_PER_TRIAL=1 TIMEOUT="${SWEEP_TIMEOUT:-}" \
    bash bench/gpu_sweep.sh --address local --search-algorithm grid --r 16,32 --lora-alpha 32 \
    --learning-rate 1e-4 --target-modules qv --early-stopping none --top-k 1
  rc=$?
  mkdir -p "$dir/tune"  # each trial's Tune reports (pid, timestamps, metrics)
  for f in "$sweep_dir"/tune/*/trial-*/result.json; do
    [ -f "$f" ] && cp "$f" "$dir/tune/$(basename "$(dirname "$f")").json"
  done
  grep -h "qlora-ray device:" "$dir/sweep.log" > "$dir/devices.log" 2>/dev/null
  return $rc
}

serve_stage() {  # stage name, replicas
  local dir="$out/$1"
  OUT="$dir" MAX_WALL="${SERVE_WALL:-480}" bash bench/serve_gpu.sh --no-peft-baseline --no-cold-loads \
    --adapters 8 --scenarios uniform-8 --seconds "${SERVE_SECONDS:-20}" --requests 1000000 \
    --concurrency $(( clients * $2 )) --serve-arg "max_batch_size=$clients" --serve-arg "num_replicas=$2"
  local rc=$?
  grep -h "qlora-ray device:" "$dir/serve.log" > "$dir/devices.log" 2>/dev/null
  return $rc
}

duplicate() { [ "$n" -gt 1 ] || [ "${DUPLICATE:-0}" = 1 ]; }

wanted sweep_one_gpu && CUDA_VISIBLE_DEVICES=0 run_stage sweep_one_gpu sweep sweep_one_gpu
if wanted sweep_all_gpus; then
  if duplicate; then (unset CUDA_VISIBLE_DEVICES; run_stage sweep_all_gpus sweep sweep_all_gpus)
  else echo "== sweep_all_gpus: skipped (N=1: it is sweep_one_gpu; DUPLICATE=1 runs it)" | tee -a "$log"; fi
fi
wanted serve_one_replica && CUDA_VISIBLE_DEVICES=0 run_stage serve_one_replica serve_stage serve_one_replica 1
if wanted serve_all_replicas; then
  if duplicate; then (unset CUDA_VISIBLE_DEVICES; run_stage serve_all_replicas serve_stage serve_all_replicas "$n")
  else echo "== serve_all_replicas: skipped (N=1: it is serve_one_replica; DUPLICATE=1 runs it)" | tee -a "$log"; fi
fi

sleep 2; kill $trace $apps 2>/dev/null
python3 bench/multi_gpu_summary.py "$out" --gpus "$n" | tee -a "$log"
