#!/usr/bin/env bash
# Every GPU check of the open issues in one run, for the device tool (a fresh H100/H200 machine):
#   run(command="bash benchmarks/gpu_checks.sh", timeout_s=590)
# Writes its figures and logs under $OUT (default ./gpu-out). Sized for ~8 minutes of device time:
#   1. CUDA build of torch 2.13.0 + the package in .venv-gpu
#   2. tests that exercise the GPU path where one exists (learner, algorithms)
#   3. issue 7: one Ray Train GPU worker vs in-process on the same GPU, CQL and IQL updates/s (target: <= 5%
#      overhead), benchmarks/scaling.py --gpu
#   4. learner throughput table on the GPU (benchmarks/throughput.py), K=1 and K=16
#   5. issue 8: 16-configuration IQL and CQL sweeps fused (one pack on the GPU) vs unfused (16 trials sharing it),
#      and 64 fused CQL configurations on Hopper-shaped data (target >= 10,000 member-updates/s),
#      benchmarks/tune_throughput.py --gpu
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
