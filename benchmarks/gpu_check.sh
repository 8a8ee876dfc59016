#!/usr/bin/env bash
# All GPU verification in one run (DESIGN.md "GPU checks"): build the extension, run the
# `gpu`-marked tests, run every kernel benchmark at its standard sizes and a short end-to-end
# training benchmark, then print a summary table. Full results go to OUTDIR.
#
#   benchmarks/gpu_check.sh [OUTDIR]        (default: benchmarks/results/h200)
#
# Needs: python with torch (CUDA build), triton, ninja, pybind11, nvcc; installs nothing from
# the network. Wheels that travel with the tree (wheels/*.whl) are installed offline first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/h200}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-16}"
export TURBOLM_EXT_DIR="${TURBOLM_EXT_DIR:-$PWD/build/ext}"
SUMMARY="$OUT/summary.md"
: > "$SUMMARY"
status=0

step() {  # step NAME TIMEOUT_S CMD...   -> runs CMD, logs to $OUT/NAME.log, records the result
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    echo "== $name" >&2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0))
    printf '| %s | %s | %ss | %s |\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAIL rc=$rc")" "$dt" "$(tail -n 1 "$OUT/$name.log" | cut -c1-100)" >> "$SUMMARY"
    [ $rc -eq 0 ] || status=1
    tail -n 5 "$OUT/$name.log" >&2
}

if compgen -G "wheels/*.whl" > /dev/null; then
    step install_wheels 120 "$PY" -m pip install --no-index --no-deps wheels/*.whl
fi
step install 180 "$PY" -m pip install --no-build-isolation --no-deps -e .
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Command: \`benchmarks/gpu_check.sh $OUT\` at commit $(git rev-parse --short HEAD 2>/dev/null)"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    echo
    echo "| step | result | time | last line |"
    echo "|---|---|---|---|"
} > "$OUT/header.md"
step doctor 120 "$PY" -m turbolm doctor
step build_ext 300 "$PY" -m turbolm.ext
step pytest_gpu 240 "$PY" -m pytest -q -m gpu -x -p no:cacheprovider tests
for bench in benchmarks/bench_*.py; do
    name=$(basename "$bench" .py)
    [ "$name" = bench_zero ] && continue  # CPU-only benchmark (needs DeepSpeed)
    [ "$name" = bench_finetune ] && continue
    step "$name" 150 "$PY" "$bench" --out "$OUT"
done
step train_e2e 120 "$PY" -m turbolm train --no-progress --overwrite train.out_dir="$OUT/train_e2e" \
    train.max_steps=200 train.eval_every=100 train.batch_size=32 model.context=512 \
    model.d_model=512 model.n_layer=8 model.n_head=8 train.sample_tokens=50 train.tensorboard=false
cat "$OUT/header.md" "$SUMMARY" > "$OUT/README.md"
echo
cat "$OUT/README.md"
exit $status
