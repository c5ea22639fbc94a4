#!/usr/bin/env bash
# One-shot GPU check of normlab's Triton batch norm kernels (under 4 minutes).
#
# Run from the repository root on a machine with a CUDA device, torch, triton and pytest:
#     bash benchmarks/cuda_check.sh
# 1. the CUDA tests of the Triton kernels (tests/test_fused_triton.py -m cuda) and normlab's CUDA
#    batch norm tests (tests/test_batch_norm_cuda.py, which now run the kernels);
# 2. the benchmark of the fused layer against torch's native BatchNorm and normlab's reference,
#    fp32 and bf16 (benchmarks/bench_devices.py --fused): a Markdown table;
# 3. meanwhile, in the background on the CPU, the interpreter tests of the same file
#    (TRITON_INTERPRET=1, CPU tensors); their log is printed at the end.
# Every step has its own time limit (210 s in all); the exit status is non-zero when a step failed.
set -u
export PYTHONPATH="$PWD"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
PY="${PYTHON:-python3}"
LOG="$(mktemp -d)"
status=0

step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc in $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || status=1
}

"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'device', torch.cuda.get_device_name(0))" || exit 1

# Interpreter tests: CPU only, in a process of their own, alongside the GPU steps.
(
    TRITON_INTERPRET=1 timeout 200 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_fused_triton.py -m "not cuda" >"$LOG/interpret.txt" 2>&1
    echo $? >"$LOG/interpret.rc"
) &
bg=$!

step 80 "CUDA tests of the Triton kernels" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_fused_triton.py -m cuda
step 60 "CUDA batch norm tests" "$PY" -m pytest -q -p no:cacheprovider tests/test_batch_norm_cuda.py
step 60 "benchmark: fused vs torch native" "$PY" benchmarks/bench_devices.py --device cuda \
    --fused --repeats 9 --steps 20

wait "$bg"
echo "=== interpreter tests (background): exit $(cat "$LOG/interpret.rc" 2>/dev/null || echo '?')"
tail -n 15 "$LOG/interpret.txt"
[ "$(cat "$LOG/interpret.rc" 2>/dev/null)" = "0" ] || status=1
exit $status
