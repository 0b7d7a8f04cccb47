#!/usr/bin/env bash
# GPU evidence for the torch-cuda backend on a lent GPU machine: what the machine has (GPU,
# CUDA PyTorch, TensorRT or not), the GPU tests, bench and verify for ois-s-1024 and ois-b-1024
# at FP32 and FP16 (random weights: no Depth Anything V2 checkpoint can be fetched there).
# The machine's image has CUDA PyTorch, onnx and onnxruntime but not polygraphy or onnxslim;
# put their wheels on PYTHONPATH first. Usage: benchmarks/gpu_torch_cuda.sh env|bench|verify OUT_DIR
set -uo pipefail
step=${1:?usage: gpu_torch_cuda.sh env|bench|verify OUT_DIR}
out=${2:?usage: gpu_torch_cuda.sh env|bench|verify OUT_DIR}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ois() { python3 -m ois_deploy "$@"; }
presets=(ois-s-1024 ois-b-1024)

case $step in
env)  # what the machine has, then the GPU-marked tests (CUDA graphs vs eager, torch-cuda parity)
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
        python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
        python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
        python3 -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1 | tail -1
    } | tee "$out/environment.txt"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engines.py 2>&1 | tee "$out/pytest_gpu.txt"
    ;;
bench)  # appends one record per run to $out/bench.jsonl
    for preset in "${presets[@]}"; do
        for precision in fp32 fp16; do
            ois bench "$preset" --backend torch-cuda --precision "$precision" --results-dir "$out"
        done
    done
    ;;
verify)  # torch-cuda against the PyTorch FP32 model on the CPU; the FP32 export carries the manifest
    for preset in "${presets[@]}"; do
        ois export --preset "$preset" --precision fp32 --out "/tmp/ois-export/$preset" &&
            ois verify "/tmp/ois-export/$preset" --backend torch-cuda --precision both --json "$out/verify-$preset.json"
    done
    ;;
*) echo "unknown step $step (env, bench or verify)" >&2; exit 2 ;;
esac
