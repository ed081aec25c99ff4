#!/usr/bin/env bash
# Every GPU measurement of dinocell in one go, for a device session of a few minutes (issue: "GPU speed, measured").
#
#   OUT=/tmp/out bash bench/gpu_session.sh        # on the GPU machine, from the repository root
#   (device tool: command "bash bench/gpu_session.sh", timeout_s 540; results come back under $OUT)
#
# Runs, each with its own time limit so one stuck part cannot eat the session:
#   1. bench_train_step.py --with-ref: ours eager / compiled / compiled+ckpt and the anchor (../shared/bench or
#      bench/anchor/ref_step_bench.py when ../shared does not travel), batch 64, same process, same GPU;
#   2. bench_augment.py --device cuda (both resampling paths): choose AugmentConfig.resample on CUDA;
#   3. bench_data.py: the shard data path on this machine's cores (the >= 1,000 fields/s question);
#   4. a torch.profiler summary of one compiled step (top kernels by CUDA time).
# Writes JSON (one file per part) and the raw logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
REF=../shared/bench/ref_step_bench.py
[ -f "$REF" ] || REF=bench/anchor/ref_step_bench.py

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; "$PY" -c \
  "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; \
  nproc; } > "$OUT/machine.txt" 2>&1

part() {  # part NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? ($(tail -n 1 "$OUT/$name.log" | cut -c1-160))"
}

part train_step 240 "$PY" bench/bench_train_step.py --with-ref --ref "$REF" --batch 64 --iters 20 --warmup 5 \
  --modes eager,compile,compile+ckpt --json-out "$OUT/train_step.json"
part augment_taps 40 "$PY" bench/bench_augment.py --device cuda --batch 64 --field 540 --resample taps --no-anchor
part augment_matmul 40 "$PY" bench/bench_augment.py --device cuda --batch 64 --field 540 --resample matmul --no-anchor
part data_path 120 "$PY" bench/bench_data.py --fields 96 --read-seconds 3
part profile 90 "$PY" bench/bench_train_step.py --batch 64 --iters 3 --warmup 3 --modes compile --profile \
  --json-out "$OUT/profile.json"
echo "results in $OUT"
