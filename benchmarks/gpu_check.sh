#!/usr/bin/env bash
# One script for a lent GPU machine (see the developers' guide): build rkfast there, run the CUDA tests and
# the benchmarks, and leave everything under $OUT (the device tool brings $OUT back).
#
#   bash benchmarks/gpu_check.sh [all|check|bench|learned|memory]     # OUT defaults to benchmarks/results/gpu-run
#
#   check: build, the CUDA tests (kernels, capture), a short end-to-end smoke run (about 2 minutes on an H100)
#   bench: build, the capture tests, the full end-to-end benchmark (every contender, workload, tableau and
#          order), the kernel benchmark, the few-shot conv4 and navigation benchmarks, profiles
#          of one step (benchmarks/profile_step.py) (about 6 minutes)
#   all:   the CUDA tests and bench, without the smoke run (about 5 minutes)
#   learned: build, the CUDA tests of learned rates and tableaus (capture, per-element kernels, steps against
#          the CPU), the per-element kernel rows and the cost of learned coefficients (about 4 minutes)
#   memory: build, the memory levers' grid on the GPU (benchmarks/memory.py --device cuda: conv4-84 and
#          ResNet-12 84x84 5-way 5-shot, maml and rk4, T 1 and 4, every lever; max_memory_allocated and step
#          times, the ResNet-12 MiniImageNet step included), written as memory-<card>.json/.png (not yet run)
#
# The peer libraries of the end-to-end benchmark (higher, torchopt + optree, learn2learn) are not on the GPU
# image, which has no network: put their wheels in .peers/ (here: pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .peers higher torchopt optree graphviz) and learn2learn's package folder in
# .peers/site/, and carry .peers; without it those contenders report "not available".
# Each step has its own time limit so a slow step still leaves the others' results behind.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:-all}
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
log="$OUT/gpu_check-$phase.log"
: >"$log"
export PYTHONUNBUFFERED=1

step() {  # step <seconds> <description> <command...>
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date +%T))" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc ($(date +%T))" | tee -a "$log"
}

# .peers/: wheels (pip download --python-version 3.12 ... higher torchopt optree graphviz) and site/ with
# learn2learn's package folder (its compiled parts are not needed: the benchmark loads its MAML alone)
if [ -d .peers ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .peers/*.whl >>"$log" 2>&1 \
        && cp -r .peers/site/. /tmp/peers/ 2>/dev/null
    export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
fi

step 30 "machine" bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc;
    python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name(0))"'
step 180 "install" env RKFAST_REQUIRE_CPP=1 python3 -m pip install -q --no-build-isolation --no-deps -e .
step 30 "backends" python3 -c "import rkfast.kernels as k, rkfast._C as c; print(k.available(), 'isa', c.isa(), 'openmp', c.has_openmp())"
# the results' file names: the GPU's name as e2e.py spells it (benchmarks/_common.py's device_slug)
card=$(python3 -c "import sys, torch; sys.path.insert(0, 'benchmarks'); from _common import device_slug; print(device_slug(torch.device('cuda')))" 2>/dev/null || echo gpu)

if [ "$phase" = all ] || [ "$phase" = check ]; then
    step 90 "capture tests" python3 -m pytest -q -rs tests/test_capture.py
    step 150 "kernel tests" python3 -m pytest -q -rs -n 4 tests/test_kernels.py -k "cuda or meta_direction or half"
    [ "$phase" = check ] && step 90 "end-to-end smoke" python3 benchmarks/e2e.py --contenders loop,vmap,rkfast,rkfast-captured \
        --tableaus maml,rk4 --warmup 4 --repeats 20 \
        --json "$OUT/e2e-smoke-$card.json" --png "$OUT/e2e-smoke-$card.png"
fi
if [ "$phase" = all ] || [ "$phase" = bench ]; then
    [ "$phase" = bench ] && step 90 "capture tests" python3 -m pytest -q -rs tests/test_capture.py
    step 330 "end-to-end benchmark" python3 benchmarks/e2e.py --cell-budget 6 \
        --json "$OUT/e2e-$card.json" --png "$OUT/e2e-$card.png"
    step 120 "kernel benchmark" python3 benchmarks/kernels.py --target-s 0.1 --json "$OUT/kernels-$card.json"
    step 120 "few-shot benchmark" python3 benchmarks/fewshot.py --device cuda --repeats 10 --json "$OUT/fewshot-$card.json"
    step 90 "navigation benchmark" python3 benchmarks/navigation.py --device cuda --json "$OUT/navigation-$card.json"
    step 90 "profiles" bash -c "python3 benchmarks/profile_step.py --contenders vmap,rkfast --out $OUT/profile-$card.txt >/dev/null &&
        python3 benchmarks/profile_step.py --workload conv4 --contenders rkfast,rkfast-captured --out $OUT/profile-$card.txt >/dev/null"
fi
if [ "$phase" = learned ]; then
    step 150 "learned: CUDA tests" python3 -m pytest -q -rs tests/test_capture.py tests/test_learned_tableau.py \
        tests/test_kernels_elementwise.py -k "cuda or capture"
    step 120 "learned: kernel rows" python3 benchmarks/kernels.py --ops sp_elem,sp_elem_bwd --target-s 0.05 \
        --json "$OUT/kernels-elementwise-$card.json"
    step 120 "learned: cost per step" python3 benchmarks/learned_cost.py --repeats 200 \
        --json "$OUT/learned-cost-$card.json"
fi
if [ "$phase" = memory ]; then
    step 480 "memory benchmark" python3 benchmarks/memory.py --device cuda --backbones conv4-84,resnet12-84 \
        --tableaus maml,rk4 --tasks 1,4 --json "$OUT/memory-$card.json" --plot "$OUT/memory-$card.png"
fi
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
