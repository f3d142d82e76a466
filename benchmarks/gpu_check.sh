#!/usr/bin/env bash
# One script for a lent GPU machine (see the developers' guide): build rkfast there, run the tests on CUDA,
# run the kernel benchmark, and leave everything under $OUT (the device tool brings $OUT back).
#
#   run: bash benchmarks/gpu_check.sh            # OUT defaults to benchmarks/results/gpu-run
#
# Each step has its own time limit so a slow step still leaves the others' results behind.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
log="$OUT/gpu_check.log"
: >"$log"

step() {  # step <seconds> <description> <command...>
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date +%T))" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc" | tee -a "$log"
    echo "$name: $rc" >>"$OUT/steps.txt"
}

step 30 "machine" bash -c 'nvidia-smi; python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))"'
step 180 "install" env RKFAST_REQUIRE_CPP=1 pip install --no-build-isolation --no-deps -e .
step 30 "backends" python -c "import rkfast.kernels as k, rkfast._C as c; print(k.available(), 'openmp', c.has_openmp())"
step 240 "cuda tests" python -m pytest -q -x tests/test_kernels.py tests/test_capture.py tests/test_optim.py
card=$(python -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))" 2>/dev/null || echo gpu)
step 240 "kernel benchmark" python benchmarks/kernels.py --json "$OUT/kernels-$card.json"
step 300 "end-to-end benchmark" python benchmarks/e2e.py --json "$OUT/e2e-$card.json" --png "$OUT/e2e-$card.png"
echo "results in $OUT: $(ls "$OUT")"
