#!/usr/bin/env bash
# The one-call GPU check: install offline, train the nets whose weights are not bundled yet, run the GPU tests,
# measure the GPU targets and run the benchmark suite; everything lands in OUTDIR (at most 8 files):
#   log.txt, summary.json (targets), bench.json (pytest-benchmark), runs.json (metrics of each training run),
#   net1..net4.safetensors (weights to bundle).
# usage: benchmarks/gpu/run.sh OUTDIR [--dry-run]
#   --dry-run: the same steps on the CPU on a tiny budget (synthetic data, 1 epoch), as CI runs it.
# env: CIFARBENCH_GPU_STEPS (default train,check,train-more,tests,bench) picks steps, so a short lease can split the work.
# env: CIFARBENCH_GPU_DATA (default .data/cifar10-jpeg75.tar.gz), PYTHON (default python3),
#      CIFARBENCH_GPU_BUDGET seconds for the whole script (default 450).
set -uo pipefail
OUT=${1:?usage: run.sh OUTDIR [--dry-run]}
DRY=${2:-}
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${CIFARBENCH_GPU_BUDGET:-450}
STEPS=${CIFARBENCH_GPU_STEPS:-train,check,train-more,tests,bench}
WORK=$(mktemp -d)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "== [$(( $(date +%s) - START )) s] $*"; }

if [ "$DRY" = "--dry-run" ]; then
    DATA=synthetic:200; EPOCHS=(--epochs 1); SMALL=(--set l1_oc=4); DEVICE=(--device cpu)
    export CUDA_VISIBLE_DEVICES=""
else
    DATA=${CIFARBENCH_GPU_DATA:-.data/cifar10-jpeg75.tar.gz}; EPOCHS=(); SMALL=(); DEVICE=()
    [ -f "$DATA" ] || { echo "missing $DATA: copy ../shared/data/cifar10-jpeg75.tar.gz there and carry .data"; }
fi

say "install"
if ! $PY -c "import cifarbench.models" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-index --no-build-isolation -e . || { echo "install failed"; exit 1; }
fi
CB=("$PY" -m cifarbench.cli)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

train() {  # train NET RECIPE SECONDS [extra args...]: train unless weights are bundled, then bundle them
    local net=$1 recipe=$2 seconds=$3; shift 3
    if [ -f "models/weights/$net.safetensors" ] && [ "$DRY" != "--dry-run" ]; then
        say "$net: weights already bundled"; return
    fi
    if [ "$(left)" -lt "$seconds" ]; then say "$net: skipped, $(left) s left of the budget"; return; fi
    local cmd=(cifarbench train "$net" --recipe "$recipe" "$@" "${EPOCHS[@]}" "${SMALL[@]}")
    say "train: ${cmd[*]}"
    timeout "$seconds" "${CB[@]}" train "$net" --recipe "$recipe" "$@" "${EPOCHS[@]}" "${SMALL[@]}" \
        "${DEVICE[@]}" --data "$DATA" --out "$WORK/$net" --json
    # a run stopped by the timeout still has its best epoch on disk: bundle that
    [ -f "$WORK/$net/best.safetensors" ] && $PY benchmarks/gpu/bundle.py "$WORK/$net" "$OUT" --command "${cmd[*]} --data cifar10-jpeg75.tar.gz" \
            --trained-on "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo cpu)"
}

step() { [[ ",$STEPS," == *",$1,"* ]]; }
if step train; then train net4 fast 200; fi
if step check; then
    say "targets (check.py)"
    timeout $(( $(left) > 150 ? 150 : $(left) )) $PY benchmarks/gpu/check.py --out "$OUT" --data "$DATA" \
        --net4-run "$WORK/net4" ${DRY:+--dry-run}
fi
if step train-more; then
    if [ "$DRY" != "--dry-run" ]; then  # a dry run checks the training step once (net4 above)
        train net3 fast 120 --epochs 40 --lr 0.1
        train net2 fast 80 --epochs 30
        train net1 seed 90
    fi
fi
if step tests; then
    say "GPU tests"
    # one process per test: the first GPU run died of a segfault in one of them (not named in the log), which
    # took the rest down with it; now a crash costs only its test, and its exit code (139) is in the log
    # a dry run collects one file and runs the loop once (on the CPU every GPU test skips)
    where=tests; [ "$DRY" = "--dry-run" ] && where=tests/test_runtimes.py
    ids=$($PY -m pytest --collect-only -q -m gpu "$where" -p no:cacheprovider 2>/dev/null | grep "::")
    [ "$DRY" = "--dry-run" ] && ids=$(head -n 1 <<< "$ids")
    while read -r id; do
        [ -n "$id" ] || continue
        if [ "$(left)" -lt 20 ]; then say "GPU tests: stopped, $(left) s left"; break; fi
        timeout 60 $PY -m pytest -q -rs -m gpu "$id" -p no:cacheprovider > "$WORK/test.log" 2>&1
        rc=$?
        echo "rc=$rc $id: $(tail -n 1 "$WORK/test.log")"
        if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then grep -vE "^\s+File .*(pytest|pluggy)" "$WORK/test.log" | tail -n 25; fi
    done <<< "$ids"
fi
if step bench; then
    # one pytest per suite, each with its own JSON, so a suite cut by its timeout costs only itself
    bench() {  # bench NAME SECONDS ARGS...
        local name=$1 seconds=$2; shift 2
        if [ "$(left)" -lt 30 ]; then say "bench $name: skipped, $(left) s left"; return; fi
        say "bench $name"
        timeout $(( $(left) < seconds ? $(left) : seconds )) $PY -m pytest -q -p no:cacheprovider \
            --benchmark-json="$WORK/bench-$name.json" "$@" 2>&1 | tail -n 30
    }
    if [ "$DRY" = "--dry-run" ]; then  # one small case per suite, one round
        export CIFARBENCH_BENCH_ROUNDS=1 CIFARBENCH_BENCH_TRAIN_NET=net1 CIFARBENCH_BENCH_BATCH=64
        bench conv 120 benchmarks/test_bench_conv.py -k "conv6-conv and eager-nchw"
        bench train 120 benchmarks/test_bench_train.py -k seed
        bench runtimes 120 benchmarks/test_bench_runtimes.py -k "torch_eager"
    else
        bench conv 60 benchmarks/test_bench_conv.py -k "not torch-compile"
        bench train 60 benchmarks/test_bench_train.py
        export CIFARBENCH_BENCH_BATCH=4096
        bench runtimes 150 benchmarks/test_bench_runtimes.py -k "not int8"
    fi
    $PY benchmarks/gpu/merge_bench.py "$OUT/bench.json" "$WORK"/bench-*.json
fi
say "done: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
