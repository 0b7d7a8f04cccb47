"""Which decoder nodes stay FP32 in the INT8 graphs, and how to calibrate: each setting, measured.

    python benchmarks/int8_ablation.py [--preset ois-tiny] [--scenes 4]

Each setting quantizes the FP32 decoder graph of artifacts/int8/<preset> (exported first if
missing) with the calibration data of `export --precision int8` (or a variant of it, named in
the setting) and measures the INT8 decoder against FP32 twice:
- held-out: mask logits on click sessions of held-out scenes (the evaluation's simulated user,
  not the calibration scenes): relative L2, IoU of masks at logit 0;
- verify: the rows `ois-deploy verify --precision int8` gates (decoder on random images and
  clicks; click sessions on the bundled images), from verify itself on a copy of the export.
Writes benchmarks/results/int8_ablation_<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ois_deploy.contract import graph_file, read_manifest, write_manifest
from ois_deploy.errors import run_script
from ois_deploy.export import quantize as q
from ois_deploy.export.onnx import ExportRequest, export_model
from ois_deploy.model.weights import load_model, weights_provenance
from ois_deploy.provenance import machine_info, now_utc, sha256_file, tool_versions
from ois_deploy.verify import verify

RESULTS = Path(__file__).parent / "results"
BEFORE = ("attention", "prompt_encoder", "token_convs", "layernorm", "order_maps", "logits_conv", "depth_head")
SETTINGS = [  # (name, op types quantized (None: all ONNX Runtime can), groups kept FP32, method, clicks per object)
    ("all ops, nothing kept", None, (), "MinMax", q.CLICKS_PER_OBJECT),
    ("compute ops, nothing kept", q.OP_TYPES, (), "MinMax", q.CLICKS_PER_OBJECT),
    ("compute ops, groups before fusion_out_convs", q.OP_TYPES, BEFORE, "MinMax", q.CLICKS_PER_OBJECT),
    ("compute ops, + fusion_out_convs", q.OP_TYPES, BEFORE + ("fusion_out_convs",), "MinMax", q.CLICKS_PER_OBJECT),
    ("compute ops, all groups (default)", q.OP_TYPES, q.KEEP_FP32, "MinMax", q.CLICKS_PER_OBJECT),
    ("default, 6 clicks per object", q.OP_TYPES, q.KEEP_FP32, "MinMax", 6),
    ("default, Entropy calibration", q.OP_TYPES, q.KEEP_FP32, "Entropy", q.CLICKS_PER_OBJECT),
    ("default, Percentile calibration (99.999)", q.OP_TYPES, q.KEEP_FP32, "Percentile", q.CLICKS_PER_OBJECT),
    ("MatMul only, all groups", ("MatMul", "Gemm"), q.KEEP_FP32, "MinMax", q.CLICKS_PER_OBJECT),
    ("Conv only, + fusion_out_convs", ("Conv", "ConvTranspose"), BEFORE + ("fusion_out_convs",), "MinMax",
     q.CLICKS_PER_OBJECT),
]


def heldout_feeds(model, scenes: int) -> list[dict]:
    """Decoder feeds of clicker sessions on held-out scenes."""
    from ois_deploy.train.scenes import heldout_scene

    original = q.calibration_images
    q.calibration_images = lambda n: [(f"heldout{i}", s.image, [m for m in s.masks if m.mean() >= 0.01])
                                      for i, s in ((i, heldout_scene(0, i)) for i in range(n))]
    try:
        return q.calibration_feeds(model, scenes, clicks=5)[1]
    finally:
        q.calibration_images = original


def compare(src: Path, dst: Path, feeds: list[dict]) -> dict:
    import onnxruntime as ort

    ref, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (src, dst))
    err = nrm = 0.0
    ious, nonfinite = [], 0
    for feed in feeds:
        a, b = ref.run(None, feed)[0], got.run(None, feed)[0]
        err += float(((a.astype(np.float64) - b) ** 2).sum())
        nrm += float((a.astype(np.float64) ** 2).sum())
        nonfinite += int((~np.isfinite(b)).sum())
        union = ((a > 0) | (b > 0)).sum()
        ious.append(1.0 if union == 0 else float(((a > 0) & (b > 0)).sum() / union))
    return {"rel_l2": float(np.sqrt(err / nrm)), "nonfinite": nonfinite, "mask_iou_mean": float(np.mean(ious)),
            "mask_iou_min": float(np.min(ious))}


def verify_rows(folder: Path, decoder: Path, workdir: Path) -> dict:
    """verify's decoder and session rows for this INT8 decoder (the FP32 encoder's int8 twin unchanged)."""
    copy = workdir / "export"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    shutil.copy(decoder, copy / graph_file("decoder", "int8"))
    manifest = read_manifest(copy)
    manifest["graphs"][graph_file("decoder", "int8")]["sha256"] = sha256_file(copy / graph_file("decoder", "int8"))
    write_manifest(copy, manifest)
    rows = verify(copy, precisions=("int8",))["results"]
    keep = ("rel_l2", "mask_iou_mean", "mask_iou_min")
    return {r["output"]: {k: r[k] for k in keep} for r in rows if r["output"].endswith("mask_logits")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ois-tiny")
    parser.add_argument("--scenes", type=int, default=4, help="held-out scenes to compare on")
    args = parser.parse_args()
    model, report = load_model(args.preset)
    folder = Path("artifacts/int8") / args.preset
    if not (folder / graph_file("decoder", "int8")).is_file():  # verify needs the int8 pair
        shutil.rmtree(folder, ignore_errors=True)
        export_model(model, weights_provenance(report), ExportRequest(folder, ("fp32", "int8")))
    test = heldout_feeds(model, args.scenes)
    feeds = {}  # clicks per object -> (decoder feeds, description)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "decoder.int8.onnx"
        for name, op_types, keep, method, clicks in SETTINGS:
            if clicks not in feeds:
                _, dec, description = q.calibration_feeds(model, clicks=clicks)
                feeds[clicks] = dec, description
            kept = q.quantize_graph(folder / "decoder.onnx", dst, feeds[clicks][0], keep, op_types, method=method)
            row = {"setting": name, "op_types": list(op_types) if op_types else "all", "fp32_groups": list(keep),
                   "calibration": method, "clicks_per_object": clicks, "decoder_fp32_nodes": len(kept),
                   "heldout": compare(folder / "decoder.onnx", dst, test), "verify": verify_rows(folder, dst, Path(tmp))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = RESULTS / f"int8_ablation_{args.preset}.json"
    out.write_text(json.dumps({
        "benchmark": "INT8 decoder settings (FP32 node groups, calibration) against the FP32 graph",
        "preset": args.preset, "weights": "bundled" if report.bundled else report.format,
        "calibration_data": feeds[q.CLICKS_PER_OBJECT][1],
        "heldout": f"{len(test)} decoder calls on {args.scenes} held-out scenes",
        "verify": "ois_deploy.verify.verify(..., precisions=('int8',)) rows decoder/ and session/mask_logits",
        "gate": {"mask_iou_mean": 0.98},
        "results": rows, "machine": machine_info(), "versions": tool_versions(), "date": now_utc()}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    run_script(main)
