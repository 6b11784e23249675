#!/usr/bin/env bash
# The GPU checks, one script for the device tool (about 6 minutes on one H100 / H200), most important first:
# the GPU-marked tests; the train-step benchmark (CRATE-MAE-B at batch 256: eager, compiled and as CUDA graphs,
# with the plain reference path as the in-run baseline, profiled; CRATE-B classification); the end-to-end
# benchmark (shards → device or CPU decode → step, against the random-pixel step); the data benchmark
# (nvjpeg's batched decode). Results, logs and Chrome traces land in $OUT (default bench/out).
#
# The device image has torch, torchvision, timm, pytest but not webdataset, braceexpand or lion-pytorch:
# carry them as wheels in .whl/ (see the device tool's README), e.g. here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl webdataset braceexpand lion-pytorch
# and run with carry [".whl"]:  bash bench/gpu_check.sh
# Without CUDA it runs the same commands at toy sizes (the CPU smoke test of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"

if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/device.txt" 2>&1
    # In order of what matters most; each command has its own limit, 9 minutes at most in all (the device
    # tool's per-call cap is 10), about 6 expected.
    timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
    timeout 140 python3 bench/step.py --kind mae --variant base --batch 256 --precision bf16 --compile both \
        --reference --steps 20 --warmup 5 --profile 5 --trace "$OUT/traces" --json "$OUT/step_mae.json" 2>&1 | tee "$OUT/step.log"
    timeout 90 python3 bench/step.py --kind mae --variant base --batch 256 --precision bf16 --compile yes \
        --compile-mode reduce-overhead --steps 20 --warmup 5 --json "$OUT/step_mae_graphs.json" 2>&1 | tee -a "$OUT/step.log"
    timeout 80 python3 bench/step.py --kind classifier --variant base --batch 256 --precision bf16 --compile both \
        --steps 20 --warmup 5 --profile 5 --json "$OUT/step_classifier.json" 2>&1 | tee -a "$OUT/step.log"
    timeout 60 python3 bench/e2e.py --num-images 400 --out /tmp/bench_data --steps 30 --warmup 5 \
        --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
    timeout 40 python3 bench/data.py --num-images 400 --measure 256 --repeats 2 --out /tmp/bench_data \
        --device-batch 256 --device-measure 2048 --json "$OUT/data.json" 2>&1 | tee "$OUT/data.log"
else
    echo "no CUDA: CPU smoke run of the same commands at toy sizes"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -n 2
    python3 bench/step.py --kind mae classifier --variant nano --batch 16 --steps 2 --warmup 1 --reference \
        --profile 1 --top 5 --trace "$OUT/traces" --json "$OUT/step_cpu.json" 2>&1 | tee "$OUT/step.log"
    python3 bench/e2e.py --num-images 64 --out /tmp/bench_data_smoke --steps 2 --warmup 1 \
        --set data.batch_size=8 --json "$OUT/e2e.json" 2>&1 | tail -n 8
    python3 bench/data.py --num-images 64 --measure 64 --repeats 1 --write-resize 0 --out /tmp/bench_data_smoke \
        --device-batch 16 --device-measure 32 --json "$OUT/data.json" 2>&1 | tail -n 4
fi
