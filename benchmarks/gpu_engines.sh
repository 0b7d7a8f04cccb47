#!/usr/bin/env bash
# One command for a lent GPU machine (H100/H200, no network, <= 10 minutes): machine facts, the
# GPU tests, build/verify/bench for torch-cuda and AOTInductor, and for trt, ort-cuda and ort-trt
# where TensorRT / onnxruntime-gpu are importable (else the JSON says why; their wheels are far
# over what can be carried to the machine), Predictor end to end, SAT, and the SAM-family peers,
# as one JSON (benchmarks/gpu_engines.py says what runs).
#   benchmarks/gpu_engines.sh prepare                    here, with network: the wheels the GPU
#                                                        machine lacks, into .whl/ (git-ignored)
#   benchmarks/gpu_engines.sh [--out DIR] [--budget-s S] on the GPU machine (carry .whl/)
#   benchmarks/gpu_engines.sh --cpu-smoke --out DIR      the same on a CPU, GPU-only steps skipped
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Pure-Python (or cp312) wheels: the GPU image has CUDA PyTorch, Triton, onnx and onnxruntime, but
# not these. iopath and antlr4 (omegaconf's parser) are sdists only, and SAM 2 has no wheel on
# PyPI: pure-Python wheels are built from them here (SAM 2 without its optional CUDA extension).
BINARY=(polygraphy==0.53.6 onnxslim==0.1.98 segment-anything==1.0 hydra-core==1.3.2 omegaconf==2.3.0
        portalocker==3.1.1 pyyaml==6.0.2 tqdm==4.67.1)
SDIST=(antlr4-python3-runtime==4.9.3 iopath==0.1.10)

if [ "${1:-}" = prepare ]; then
    mkdir -p .whl
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 -d .whl "${BINARY[@]}"
    "$PY" -m pip wheel --quiet --no-deps -w .whl "${SDIST[@]}"
    SAM2_BUILD_CUDA=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl sam2==1.1.0
    ls .whl
    exit 0
fi

site=${OIS_SITE:-/tmp/ois-site}
if compgen -G ".whl/*.whl" >/dev/null; then
    for wheel in .whl/*.whl; do  # one by one: a wheel this Python cannot take is named, not fatal
        "$PY" -m pip install --quiet --no-index --no-deps --target "$site" "$wheel" 2>/dev/null ||
            echo "note: $wheel not installed here" >&2
    done
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_engines.py "$@"
