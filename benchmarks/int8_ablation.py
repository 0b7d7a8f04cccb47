"""Which node groups stay FP32 in the INT8 graphs: quantize with each setting, compare with FP32.

    python benchmarks/int8_ablation.py [--preset ois-tiny] [--scenes 4]

Each setting quantizes the FP32 graphs of artifacts/int8/<preset> (exported first if missing)
with the same calibration data as `export --precision int8`, and compares, on click sessions of
held-out scenes (the evaluation's simulated user; not the calibration scenes), the INT8
decoder's mask logits (relative L2, IoU of masks at logit 0) and the INT8 encoder's outputs with
the FP32 graphs'. Writes benchmarks/results/int8_ablation_<preset>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ois_deploy.errors import run_script
from ois_deploy.export import quantize as q
from ois_deploy.export.onnx import ExportRequest, export_model
from ois_deploy.model.weights import load_model, weights_provenance
from ois_deploy.provenance import machine_info, now_utc, tool_versions

RESULTS = Path(__file__).parent / "results"
SETTINGS = [  # (name, op types quantized (None: all ONNX Runtime can), groups kept FP32)
    ("all ops, nothing kept", None, ()),
    ("compute ops, nothing kept", q.OP_TYPES, ()),
    ("compute ops, attention kept", q.OP_TYPES, ("attention",)),
    ("compute ops, attention + prompt encoder", q.OP_TYPES, ("attention", "prompt_encoder")),
    ("compute ops, attention + prompt encoder + token convs", q.OP_TYPES, ("attention", "prompt_encoder", "token_convs")),
    ("compute ops, all groups kept (default)", q.OP_TYPES, q.KEEP_FP32),
    ("all ops, all groups kept", None, q.KEEP_FP32),
    ("MatMul only, all groups kept", ("MatMul", "Gemm"), q.KEEP_FP32),
    ("Conv only, all groups kept", ("Conv", "ConvTranspose"), q.KEEP_FP32),
]


def heldout_feeds(model, scenes: int):
    """Decoder feeds of clicker sessions on held-out scenes, and their encoder feeds."""
    from ois_deploy.train.scenes import heldout_scene

    original = q.calibration_images
    q.calibration_images = lambda n: [(f"heldout{i}", s.image, [m for m in s.masks if m.mean() >= 0.01])
                                      for i, s in ((i, heldout_scene(0, i)) for i in range(n))]
    try:
        enc, dec, _ = q.calibration_feeds(model, scenes, clicks=5)
    finally:
        q.calibration_images = original
    return enc, dec


def compare(src: Path, dst: Path, feeds: list[dict], output: str | None) -> dict:
    import onnxruntime as ort

    ref, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (src, dst))
    err = nrm = 0.0
    ious = []
    for feed in feeds:
        a = ref.run(None, feed)
        b = got.run(None, feed)
        for x, y in zip(a, b):
            err += float(((x.astype(np.float64) - y) ** 2).sum())
            nrm += float((x.astype(np.float64) ** 2).sum())
        if output == "mask_logits":
            r, g = a[0] > 0, b[0] > 0
            union = (r | g).sum()
            ious.append(1.0 if union == 0 else float((r & g).sum() / union))
    row = {"rel_l2": float(np.sqrt(err / nrm)), "nonfinite": int(sum((~np.isfinite(y)).sum() for y in b))}
    if ious:
        row.update(mask_iou_mean=float(np.mean(ious)), mask_iou_min=float(np.min(ious)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ois-tiny")
    parser.add_argument("--scenes", type=int, default=4, help="held-out scenes to compare on")
    args = parser.parse_args()
    model, report = load_model(args.preset)
    folder = Path("artifacts/int8") / args.preset
    if not (folder / "decoder.onnx").is_file():
        export_model(model, weights_provenance(report), ExportRequest(folder, ("fp32",)))
    enc_cal, dec_cal, calibration = q.calibration_feeds(model)
    enc_test, dec_test = heldout_feeds(model, args.scenes)
    rows = []
    for name, op_types, keep in SETTINGS:
        row = {"setting": name, "op_types": list(op_types) if op_types else "all", "fp32_groups": list(keep)}
        for role, cal, test, output in (("decoder", dec_cal, dec_test, "mask_logits"), ("encoder", enc_cal, enc_test, None)):
            dst = folder / f"ablation.{role}.int8.onnx"
            row[f"{role}_fp32_nodes"] = len(q.quantize_graph(folder / f"{role}.onnx", dst, cal, keep, op_types,
                                                              method=q.CALIBRATION[role]))
            row[role] = compare(folder / f"{role}.onnx", dst, test, output)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = RESULTS / f"int8_ablation_{args.preset}.json"
    out.write_text(json.dumps({"benchmark": "INT8 node groups kept FP32: INT8 vs FP32 ONNX graphs on held-out sessions",
                               "preset": args.preset, "weights": "bundled" if report.bundled else report.format,
                               "calibration": calibration, "test": f"{len(dec_test)} decoder calls on {args.scenes} held-out scenes",
                               "results": rows, "machine": machine_info(), "versions": tool_versions(),
                               "date": now_utc()}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    run_script(main)
