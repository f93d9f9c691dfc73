#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/performance.md ("On a GPU"), as one script for a lent GPU machine
# whose image has torch and Lightning but neither pip access nor jsonargparse/torchdata.
#
#   bash benchmarks/gpu_check.sh prepare ../shared/data  # here: wheels and gzipped MNIST into .gpu/
#   bash benchmarks/gpu_check.sh run                     # there, from the repository root (.gpu/ carried);
#                                                        # results in $OUT (or ./gpu-results)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    data=${2:?usage: gpu_check.sh prepare DATA_DIR}
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
    mkdir -p .gpu/wheels .gpu/mnist
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels "jsonargparse==$(python3 -c 'import jsonargparse; print(jsonargparse.__version__)')" \
        torchdata==0.11.0 docstring-parser typeshed-client importlib-resources || exit 1
    for f in "$data"/MNIST/raw/*-ubyte; do gzip -c "$f" > ".gpu/mnist/$(basename "$f").gz"; done
    du -sh .gpu
    exit 0
fi
[ "${1:-}" = run ] || { echo "usage: gpu_check.sh prepare DATA_DIR | run" >&2; exit 2; }

out=${OUT:-gpu-results}
mkdir -p "$out" /tmp/gpu-data/MNIST/raw
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
for f in .gpu/mnist/*.gz; do gunzip -c "$f" > "/tmp/gpu-data/MNIST/raw/$(basename "$f" .gz)"; done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# 1. The GPU tests: recipes on the GPU, no host/device sync in a step, the data kept on the GPU.
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 15 | tee "$out/tests.txt"
# 2. The recipes side by side (seed 1), then the GPU recipe's seeds 2 and 3 (test accuracy's mean).
python3 -m benchmarks.bench --data-dir /tmp/gpu-data --accelerator gpu --variants plain-fast,seed,fast,gpu \
    --output "$out/bench.json" 2>&1 | tee "$out/bench.txt"
for seed in 2 3; do
    python3 -m benchmarks.bench --data-dir /tmp/gpu-data --accelerator gpu --variants gpu --seed "$seed" \
        --output "$out/gpu_seed$seed.json" 2>&1 | tail -n 3
done
# 3. Where a step's time goes.
python3 -m benchmarks.stepcost --data-dir /tmp/gpu-data --accelerator gpu 2>&1 | tee "$out/stepcost.txt"
