"""The per-click decoder on a CPU, side by side with SAM ViT-B's, in one process and one run.

    pip install "ois-deploy[peer]"    # segment-anything: the model and its ONNX wrapper; no torchvision
    python benchmarks/peer_sam.py [--presets ois-tiny ois-s-1024 ois-b-1024] [--rounds 7]

SAM ViT-B (random weights: latency does not depend on them) is built from the segment-anything
package's modeling code; its decoder is exported with the package's own ONNX wrapper
(SamOnnxModel: prompt encoder, mask decoder, mask upscaled to 1024x1024 and cropped to the image
in the graph), its image encoder as a plain ONNX graph. Our decoder and encoder graphs, FP32 and
INT8, come from artifacts/bench/<preset> (bench_cpu.ensure_export: exported once, reused).
Decoders run as bare sessions on the FP32 encoder's state. Every
graph runs in ONNX Runtime's CPU provider with the same session options (intra-op threads =
--threads), one call per graph per round, rounds interleaved so that load from elsewhere on the
machine spreads over all of them; the median is reported.

One click: OIS P=1, N=1 with a previous mask; SAM one point plus its padding point, with a
previous low-res mask (has_mask_input=1), image 1024x1024.
Writes benchmarks/results/peer_sam_<date>.json with machine, CPU flags, versions and date.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

from ois_deploy.errors import UserError, run_script
from ois_deploy.model.weights import load_model
from ois_deploy.provenance import machine_info, now_utc, tool_versions

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import ensure_export  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SAM_DIR = Path("artifacts/bench/sam-vit-b")
SAM_IMAGE = 1024


def import_sam():
    """segment_anything.modeling and .utils.onnx without the package's __init__, which imports
    the predictor and through it torchvision (not needed by the model or its ONNX wrapper)."""
    try:
        spec = importlib.util.find_spec("segment_anything")
    except ImportError:
        spec = None
    if spec is None:
        raise UserError("segment-anything is not installed: pip install segment-anything")
    if "segment_anything" not in sys.modules:
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    build = importlib.import_module("segment_anything.build_sam")
    onnx_wrapper = importlib.import_module("segment_anything.utils.onnx")
    return build, onnx_wrapper


def cpu_flags() -> dict:
    flags = set()
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    return {"model": model, **{f: f in flags for f in wanted}}


def export_sam(out: Path) -> dict[str, Path]:
    """SAM ViT-B's decoder (SamOnnxModel) and image encoder as ONNX, once (cached)."""
    import torch

    paths = {"decoder": out / "decoder.onnx", "encoder": out / "encoder.onnx"}
    if all(p.is_file() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    build, wrapper = import_sam()
    torch.manual_seed(0)
    sam = build.build_sam_vit_b(checkpoint=None).eval()
    onnx_model = wrapper.SamOnnxModel(sam, return_single_mask=True)
    dims = sam.prompt_encoder.image_embedding_size
    dummy = {
        "image_embeddings": torch.randn(1, sam.prompt_encoder.embed_dim, *dims),
        "point_coords": torch.randint(0, 1024, (1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(0, 4, (1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, 4 * dims[0], 4 * dims[1]),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    print("exporting SAM ViT-B decoder (SamOnnxModel) ...", flush=True)
    with torch.no_grad():  # as segment-anything's scripts/export_onnx_model.py does
        torch.onnx.export(onnx_model, tuple(dummy.values()), str(paths["decoder"]), dynamo=False,
                          input_names=list(dummy), output_names=["masks", "iou_predictions", "low_res_masks"],
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                          opset_version=17, do_constant_folding=True)
        print("exporting SAM ViT-B image encoder ...", flush=True)
        torch.onnx.export(sam.image_encoder, (torch.randn(1, 3, SAM_IMAGE, SAM_IMAGE),), str(paths["encoder"]),
                          dynamo=False, input_names=["image"], output_names=["image_embeddings"], opset_version=17)
    return paths


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sam_calls(paths: dict[str, Path], threads: int, rng) -> dict:
    enc, dec = session(paths["encoder"], threads), session(paths["decoder"], threads)
    image = rng.standard_normal((1, 3, SAM_IMAGE, SAM_IMAGE)).astype(np.float32)
    embedding = enc.run(None, {"image": image})[0]
    feed = {
        "image_embeddings": embedding,
        "point_coords": np.array([[[400.0, 500.0], [0.0, 0.0]]], np.float32),
        "point_labels": np.array([[1.0, -1.0]], np.float32),
        "mask_input": rng.standard_normal((1, 1, 256, 256)).astype(np.float32),
        "has_mask_input": np.array([1.0], np.float32),
        "orig_im_size": np.array([SAM_IMAGE, SAM_IMAGE], np.float32),
    }
    return {("sam-vit-b", "fp32", "decoder"): lambda: dec.run(None, feed),
            ("sam-vit-b", "fp32", "encoder"): lambda: enc.run(None, {"image": image})}


def ois_calls(preset: str, precisions, threads: int, rng) -> dict:
    from ois_deploy.runtime.ort_backend import OrtRunner

    model, report = load_model(preset)
    folder = ensure_export(preset, model, report, precisions)
    size = model.cfg.input_size
    image = (rng.random((1, 3, size, size)) * 255).astype(np.float32)
    coords = (rng.random((1, 1, 2)) * (size - 1)).astype(np.float32)
    labels = np.ones((1, 1), np.int32)
    prev = rng.random((1, 1, size, size)).astype(np.float32)
    calls = {}
    fp32 = OrtRunner(folder, "fp32", providers="cpu", threads=threads)
    feed = {**fp32.encode(image), "point_coords": coords, "point_labels": labels, "prev_mask": prev}
    for precision in precisions:
        runner = OrtRunner(folder, precision, providers="cpu", threads=threads)
        calls[(preset, precision, "encoder")] = lambda r=runner: r.encode(image)
        # the decoder graph itself, on the FP32 encoder's state: the same input for every precision
        decoder = session(folder / ("decoder.onnx" if precision == "fp32" else f"decoder.{precision}.onnx"), threads)
        calls[(preset, precision, "decoder")] = lambda d=decoder: d.run(None, feed)
    return calls


def run_rounds(calls: dict, rounds: int, encoder_rounds: int) -> dict:
    """Median ms per call, rounds interleaved over all graphs (one warm-up call each first)."""
    times = {key: [] for key in calls}
    for fn in calls.values():
        fn()
    for r in range(rounds):
        for key, fn in calls.items():
            if key[2] == "encoder" and r >= encoder_rounds:
                continue
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1000)
        print(f"round {r + 1}/{rounds}", flush=True)
    return {key: (statistics.median(v), len(v)) for key, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["ois-tiny", "ois-s-1024", "ois-b-1024"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--rounds", type=int, default=7, help="decoder calls per graph")
    parser.add_argument("--encoder-rounds", type=int, default=3, help="encoder calls per graph")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    calls = sam_calls(export_sam(SAM_DIR), args.threads, rng)
    for preset in args.presets:
        calls.update(ois_calls(preset, args.precisions, args.threads, rng))
    medians = run_rounds(calls, args.rounds, args.encoder_rounds)
    sam_decoder = medians[("sam-vit-b", "fp32", "decoder")][0]
    rows = []
    for (model, precision, graph), (ms, n) in medians.items():
        row = {"model": model, "precision": precision, "graph": graph, "median_ms": round(ms, 2), "calls": n}
        if graph == "decoder":
            row["vs_sam_decoder"] = round(ms / sam_decoder, 2)
            fp32 = medians.get((model, "fp32", "decoder"))
            if fp32 and precision != "fp32":
                row["speedup_vs_fp32"] = round(fp32[0] / ms, 2)
        rows.append(row)
    result = {
        "benchmark": "per-click decoder and encoder, ONNX Runtime CPU provider, OIS vs SAM ViT-B, median ms",
        "one_click": "OIS P=1 N=1 with a previous mask; SAM 1 point + padding point, has_mask_input=1, image 1024x1024",
        "weights": "ois-tiny bundled; ois-s-1024, ois-b-1024 and SAM ViT-B random init",
        "threads": args.threads, "rounds": args.rounds, "encoder_rounds": args.encoder_rounds,
        "cpu_flags": cpu_flags(), "machine": machine_info(), "versions": tool_versions(), "date": now_utc(),
        "results": rows,
    }
    try:
        from importlib.metadata import version

        result["versions"]["segment-anything"] = version("segment-anything")
    except Exception:
        pass
    out = args.out or RESULTS / f"peer_sam_{result['date'][:10]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        extra = f"  x{r['vs_sam_decoder']:.1f} SAM" if "vs_sam_decoder" in r else ""
        extra += f"  {r['speedup_vs_fp32']:.2f}x vs fp32" if "speedup_vs_fp32" in r else ""
        print(f"{r['model']:11} {r['precision']:5} {r['graph']:8} {r['median_ms']:9.1f} ms{extra}")
    print(f"written {out}")


if __name__ == "__main__":
    run_script(main)
