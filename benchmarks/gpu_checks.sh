#!/usr/bin/env bash
# Every GPU check of the open issues, for the device tool (an H100/H200 machine). That machine reaches nothing
# outside it: no pip installs. Its image's python3 has torch (2.11 as last seen), Triton, pyarrow, PyYAML,
# tqdm, TensorBoard and pytest, but neither Ray nor Gymnasium; rayoffline's learner, algorithms and benchmarks
# run there from the checkout (PYTHONPATH) without Ray, and evaluation needs Gymnasium, carried as wheels.
#
#   bash benchmarks/gpu_checks.sh prepare          # here: a builtin dataset + Gymnasium wheels -> benchmarks/_work/gpu
#   run(command="bash benchmarks/gpu_checks.sh 1", carry=["benchmarks/_work/gpu"], timeout_s=590)
#
# Part 1 (issue 10; ~8 minutes; figures and logs under $OUT, default ./gpu-out):
#   a. compiled == eager on CUDA (CUDA-graph replay; IQL, CQL, TD3+BC and the member/resume test, all through
#      Inductor), tests/learner/test_compiled.py with RAYOFFLINE_TEST_DEVICE=cuda
#   b. updates/s eager vs compiled: CQL at K=1 and K=64, IQL at K=1 (targets: CQL >= 2,000 and IQL >= 5,000 updates/s
#      at K=1; CQL K=64 >= 10,000 member-updates/s), benchmarks/throughput.py --compile
#   c. where the time goes, K=1 and K=16, benchmarks/profile_step.py --compile
#   e. (issue 11) FQE updates/s beside TD3+BC's, K=1 and K=16, eager (benchmarks/throughput.py --algos fqe,td3_bc)
#   d. bf16 autocast vs fp32: updates/s and the return on pendulum-medium (precision: bf16)
# Part 2 (issues 7, 8: Ray Train and Tune on a GPU) needs Ray, which the image lacks and whose wheel is larger
# than what a call may carry (64 MiB); it runs on a GPU machine with the package installed (`make install`):
#   bash benchmarks/gpu_checks.sh 2
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
WORK=benchmarks/_work/gpu
PART=${1:-1}
if [ "$PART" = prepare ]; then
  mkdir -p "$WORK/wheels"
  .venv/bin/python -c "import rayoffline.data as d; print(d.resolve('builtin:pendulum-medium'))" > "$WORK/src.txt"
  rm -rf "$WORK/pendulum-medium" && cp -r "$(cat "$WORK/src.txt")" "$WORK/pendulum-medium"
  .venv/bin/python -m pip download -q --no-deps -d "$WORK/wheels" gymnasium==1.2.2 farama-notifications
  du -sh "$WORK"
  exit 0
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if [ "$PART" = 1 ]; then
  PY=python3
  python3 -m pip install -q --no-index --no-deps --target /tmp/extra "$WORK"/wheels/*.whl 2>&1 | tail -2
  export PYTHONPATH="$PWD:/tmp/extra"
  $PY -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" \
    | tee "$OUT/torch.txt"
  T=tests/learner/test_compiled.py
  RAYOFFLINE_TEST_DEVICE=cuda RAYOFFLINE_TEST_COMPILE_BACKEND=inductor timeout 230 $PY -m pytest -q -p no:cacheprovider \
    "$T::test_compiled_step_equals_eager_over_100_steps[iql-inductor]" \
    "$T::test_compiled_step_equals_eager_over_100_steps[cql-aot_eager]" \
    "$T::test_compiled_step_equals_eager_over_100_steps[td3_bc-aot_eager]" \
    "$T::test_compiled_members_equal_their_single_runs_and_resume_exactly" 2>&1 | tail -8 | tee "$OUT/compiled_tests.txt"
  timeout 150 $PY benchmarks/throughput.py --devices cuda --compile --algos cql --ks 1,64 --repeats 3 \
    --json "$OUT/throughput_cql.json" 2>&1 | tail -14 | tee "$OUT/throughput_cql.txt"
  timeout 60 $PY benchmarks/throughput.py --devices cuda --compile --algos iql --ks 1 --repeats 3 \
    --json "$OUT/throughput_iql.json" 2>&1 | tail -8 | tee "$OUT/throughput_iql.txt"
  timeout 60 $PY benchmarks/profile_step.py --algos iql --ks 1,16 --compile 2>&1 | tail -8 | tee "$OUT/profile.txt"
  # issue 11: OPE's FQE beside the learner it evaluates (TD3+BC), member-batched, eager
  timeout 45 $PY benchmarks/throughput.py --devices cuda --algos fqe,td3_bc --ks 1,16 --repeats 3 \
    --json "$OUT/throughput_fqe.json" 2>&1 | tail -8 | tee "$OUT/throughput_fqe.txt"
  for prec in fp32 bf16; do
    for seed in 0; do
      timeout 30 $PY -c "
import rayoffline
r = rayoffline.train('iql', '$WORK/pendulum-medium', '/tmp/prec-$prec-$seed', steps=5000, seed=$seed, overrides={
    'precision': '$prec', 'compile': 'off', 'progress': 'off', 'eval_episodes': 10, 'device': 'cuda'})
print('$prec', $seed, round(r['updates_per_s'], 1), round(r['eval_return_mean'], 1), r['behavior_return_mean'])
" 2>&1 | tail -1 | tee -a "$OUT/precision.txt"
    done
  done
  exit 0
fi
# part 2: Ray Train and Tune, with the package installed in .venv (make install, with a CUDA torch)
ls .venv/bin/python > /dev/null || { echo "part 2 needs .venv with a CUDA torch and Ray (make install)"; exit 1; }
ln -sfn .venv .venv-gpu
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
