#!/usr/bin/env bash
# Evidence for the bundled ois-tiny weights (README, "Training the bundled ois-tiny weights"), on
# generated scenes from the held-out stream, never seen in training:
#   1. the bundled model, also broken down by shape and object size, and its first-click errors;
#   2. the same model with order-aware attention switched off at inference;
#   3. the ablation trained without order-aware attention (same seed and steps; trained here if
#      artifacts/train/ois-tiny-no-order.safetensors is missing, 55-75 minutes on 2 cores as
#      this shared machine's speed goes: delete it after changing the preset or the training),
#      and 1-3 compared object by object with the bundled model;
#   4. task-level parity of the ONNX Runtime FP16 graphs against PyTorch FP32 (exported afresh,
#      so that the graphs always hold the bundled weights).
# Writes benchmarks/results/heldout/*.json (with machine, versions and date) and a curve PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
OIS=${OIS:-.venv/bin/ois-deploy}
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/heldout
DATA=artifacts/heldout
ABLATION=artifacts/train/ois-tiny-no-order.safetensors
mkdir -p "$OUT" artifacts/train

[[ -d $DATA ]] || $OIS scenes --out $DATA --count 60 --seed 0
$OIS eval ois-tiny --dataset $DATA --json $OUT/ois-tiny.json --plot $OUT/ois-tiny_miou.png \
    --save-clicks $OUT/ois-tiny.clicks.jsonl
$PY benchmarks/heldout_breakdown.py $OUT/ois-tiny.clicks.jsonl --seed 0 --json $OUT/ois-tiny_by-shape-and-size.json
$PY benchmarks/first_click_errors.py --seed 0 --count 60 --json $OUT/ois-tiny_first-click-errors.json
$OIS eval ois-tiny --dataset $DATA --order-attention off --json $OUT/ois-tiny_order-off-at-inference.json \
    --save-clicks $OUT/ois-tiny_order-off-at-inference.clicks.jsonl
$PY benchmarks/compare_clicks.py $OUT/ois-tiny.clicks.jsonl $OUT/ois-tiny_order-off-at-inference.clicks.jsonl \
    --labels bundled order-off --json $OUT/ois-tiny_vs_order-off-at-inference.json
$OIS export --preset ois-tiny --out artifacts/ois-tiny
$OIS eval artifacts/ois-tiny --backend ort --precision fp16 --compare-backend torch --dataset $DATA \
    --json $OUT/ois-tiny_ort-fp16_vs_torch-fp32.json
[[ -f $ABLATION ]] || $OIS train --preset ois-tiny --out $ABLATION --steps 3300 --seed 0 --order-attention off \
    --log benchmarks/results/train/ois-tiny-no-order.log.jsonl
$OIS eval ois-tiny --checkpoint $ABLATION --dataset $DATA --json $OUT/ois-tiny_trained-without-order.json \
    --save-clicks $OUT/ois-tiny_trained-without-order.clicks.jsonl
$PY benchmarks/compare_clicks.py $OUT/ois-tiny.clicks.jsonl $OUT/ois-tiny_trained-without-order.clicks.jsonl \
    --labels bundled without-order --json $OUT/ois-tiny_vs_trained-without-order.json
