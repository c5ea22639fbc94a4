#!/usr/bin/env bash
# One-shot GPU check of normlab's Triton batch norm kernels (under 4 minutes).
#
# Run from the repository root on a machine with a CUDA device, torch, triton and pytest:
#     bash benchmarks/cuda_check.sh
# 1. the CUDA tests of the Triton kernels (tests/test_fused_triton.py -m cuda);
# 2. normlab's CUDA batch norm tests (tests/test_batch_norm_cuda.py, which run the kernels; most
#    of their time is Triton compiling about 25 kernel variants, shared through Triton's cache
#    with step 1);
# 3. the benchmark of the fused layer against torch's native BatchNorm and normlab's reference,
#    fp32 and bf16 (benchmarks/bench_devices.py --fused): a Markdown table.
# Every step has its own time limit (230 s in all); pytest prints the failing tests' summary
# (-rf) and the slowest tests. With OUT set (a directory), every step's full output and a
# summary are also written there (OUT/cuda_check/*.log, summary.txt). The exit status is non-zero
# when a step failed. The interpreter tests (TRITON_INTERPRET=1, CPU) are not run here: they
# need a recent Triton's interpreter and no GPU (run them locally or in CI).
set -u
export PYTHONPATH="$PWD"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
PY="${PYTHON:-python3}"
if [ -n "${OUT:-}" ]; then
    LOG="$OUT/cuda_check"
else
    LOG="$(mktemp -d)"
fi
mkdir -p "$LOG"
SUMMARY="$LOG/summary.txt"
: >"$SUMMARY"
status=0

step() {  # step SECONDS NAME LOGFILE COMMAND...
    local limit=$1 name=$2 log=$3
    shift 3
    echo "=== $name (limit ${limit}s)" | tee -a "$SUMMARY"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$LOG/$log"
    local rc=${PIPESTATUS[0]}
    local line="=== $name: exit $rc in $((SECONDS - t0))s (log: $LOG/$log)"
    [ "$rc" -eq 124 ] && line="$line TIMED OUT"
    echo "$line" | tee -a "$SUMMARY"
    [ "$rc" -eq 0 ] || status=1
}

"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'device', torch.cuda.get_device_name(0))" 2>&1 | tee -a "$SUMMARY"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rf --durations=8)
step 70 "CUDA tests of the Triton kernels" kernels_tests.log "${PYTEST[@]}" \
    tests/test_fused_triton.py -m cuda
step 120 "CUDA batch norm tests" batch_norm_cuda_tests.log "${PYTEST[@]}" \
    tests/test_batch_norm_cuda.py
step 40 "benchmark: fused vs torch native" bench_fused.log "$PY" benchmarks/bench_devices.py \
    --device cuda --fused --repeats 9 --steps 20

# Each pytest log's last line (counts), the failures and the benchmark table, together.
{
    for f in kernels_tests batch_norm_cuda_tests; do
        echo "--- $f:"
        grep -E '^(FAILED|ERROR) ' "$LOG/$f.log"
        tail -n 1 "$LOG/$f.log"
    done
    echo "--- benchmark:"
    grep -E '^(\||##)' "$LOG/bench_fused.log"
} >>"$SUMMARY"
echo "=== summary ($SUMMARY):"
cat "$SUMMARY"
exit $status
