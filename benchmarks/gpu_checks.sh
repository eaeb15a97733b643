#!/usr/bin/env bash
# Every GPU check of the open issues, for the device tool (a fresh H100/H200 machine), in two parts that each
# fit one call (~9 minutes; a session has 15 minutes of device time in all, so run part 1 first):
#   run(command="bash benchmarks/gpu_checks.sh 1", timeout_s=590)    issue 10: the compiled step
#   run(command="bash benchmarks/gpu_checks.sh 2", timeout_s=590)    issues 7 and 8: Ray Train and Tune on a GPU
# Writes its figures and logs under $OUT (default ./gpu-out).
# Part 1 (issue 10):
#   a. compiled == eager on CUDA (CUDA-graph replay), tests/learner/test_compiled.py with RAYOFFLINE_TEST_DEVICE
#   b. updates/s eager vs compiled, K=1 and K=64, IQL and CQL (targets: CQL >= 2,000 and IQL >= 5,000 updates/s
#      at K=1; CQL K=64 >= 10,000 member-updates/s), benchmarks/throughput.py --compile
#   c. where the time goes, K=1 and K=16, benchmarks/profile_step.py --compile
#   d. bf16 autocast vs fp32: updates/s and the return on builtin:pendulum-medium (precision: bf16)
# Part 2 (issues 7, 8):
#   1. tests that exercise the GPU path where one exists (learner, algorithms)
#   2. one Ray Train GPU worker vs in-process on the same GPU (target: <= 5% overhead), benchmarks/scaling.py --gpu
#   3. learner throughput table on the GPU (benchmarks/throughput.py), K=1 and K=16
#   4. 16-configuration IQL and CQL sweeps fused vs unfused, and 64 fused CQL configurations on Hopper-shaped data
#      (target >= 10,000 member-updates/s), benchmarks/tune_throughput.py --gpu
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q --upgrade pip
.venv-gpu/bin/pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 2>&1 | tail -2
.venv-gpu/bin/pip install -q -e ".[dev]" 2>&1 | tail -2
.venv-gpu/bin/python -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" \
  | tee "$OUT/torch.txt"
PART=${1:-1}
if [ "$PART" = 1 ]; then
  PY=.venv-gpu/bin/python
  RAYOFFLINE_TEST_DEVICE=cuda timeout 170 $PY -m pytest -q tests/learner/test_compiled.py \
    -k "iql or cql or td3_bc or members" 2>&1 | tail -8 | tee "$OUT/compiled_tests.txt"
  timeout 200 $PY benchmarks/throughput.py --compile --algos iql,cql --ks 1,64 --repeats 3 \
    --json "$OUT/throughput_compiled.json" 2>&1 | tail -14 | tee "$OUT/throughput_compiled.txt"
  timeout 90 $PY benchmarks/profile_step.py --algos iql --ks 1,16 --compile 2>&1 | tail -8 | tee "$OUT/profile.txt"
  for prec in fp32 bf16; do
    timeout 60 .venv-gpu/bin/rayoffline train --algo iql --data builtin:pendulum-medium --steps 5000 \
      --out "/tmp/prec-$prec" --set precision=$prec --set compile=off --set progress=off --set eval_episodes=10 \
      > "$OUT/precision_$prec.txt" 2>&1
    python3 -c "import json; r=json.load(open('/tmp/prec-$prec/result.json')); print('$prec', r['updates_per_s'], r['eval_return_mean'], r['behavior_return_mean'])" \
      2>&1 | tee -a "$OUT/precision.txt"
  done
  exit 0
fi
timeout 150 .venv-gpu/bin/python -m pytest -q -x tests/algorithms tests/learner/test_loop.py tests/learner/test_members.py \
  2>&1 | tail -5 | tee "$OUT/tests.txt"
timeout 240 .venv-gpu/bin/python benchmarks/scaling.py --gpu --algos cql,iql --steps 2000 --repeats 2 \
  --json "$OUT/scaling_gpu.json" 2>&1 | tail -5 | tee "$OUT/scaling_gpu.txt"
timeout 120 .venv-gpu/bin/python benchmarks/throughput.py --algos iql,cql,td3_bc --repeats 3 \
  2>&1 | tail -8 | tee "$OUT/throughput_gpu.txt"
# issue 8: fused vs unfused sweeps on the GPU (targets: fused >= 10x unfused config-updates/s; 64 fused CQL
# configurations >= 10,000 member-updates/s); every sweep a fresh `rayoffline tune` process, 1 repeat
timeout 420 .venv-gpu/bin/python benchmarks/tune_throughput.py --gpu --repeats 1 --timeout 150 \
  --json "$OUT/tune_gpu.json" 2>&1 | tail -24 | tee "$OUT/tune_gpu.txt"
