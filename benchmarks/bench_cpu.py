"""CPU latency, side by side in one run: PyTorch eager and ONNX Runtime, FP32, FP16 and INT8.

    python benchmarks/bench_cpu.py [--presets ois-tiny ois-s-1024] [--repeats 5]

For each preset: encoder latency and per-click decoder latency (1 and 20 clicks), median ms,
through the same runner interface the Predictor uses (numpy in, numpy out). Graphs are
exported to artifacts/bench/<preset> first if missing or stale. Each preset's default weights (bundled
for ois-tiny, random init otherwise; each row names them): latency does not depend on them.
Writes benchmarks/results/cpu_<date>.json with machine, versions and date.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import numpy as np

from ois_deploy.runtime.ort_backend import OrtRunner
from ois_deploy.errors import run_script
from ois_deploy.contract import read_manifest, write_manifest
from ois_deploy.export.onnx import ExportRequest, export_model
from ois_deploy.model.weights import state_dict_hash
from ois_deploy.export.quantize import quantize_export
from ois_deploy.model.precision import to_fp16
from ois_deploy.runtime.torch_backend import TorchRunner
from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.model.weights import load_model, weights_provenance
import ois_deploy

RESULTS = Path(__file__).parent / "results"
EXPORTS = Path("artifacts/bench")
# PyTorch runs float16 emulated on CPUs (about 50x slower than float32 on ois-tiny here): it is
# timed on small inputs only, and recorded as skipped above this size.
TORCH_FP16_MAX_INPUT = 512


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: allocation, kernel and thread-pool start stay out of the numbers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


# Calibration scenes for the INT8 graphs timed here (latency does not depend on them; the
# exported default is quantize.CALIBRATION_SCENES): fewer at 1024 px, where calibrating is slow.
BENCH_CALIBRATION_SCENES = 2


def graph_source_hash() -> str:
    """SHA-256 of the code that makes the graphs (the model and the exporters): the same weights
    exported by other code are other graphs."""
    package = Path(ois_deploy.__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*(package / "model").glob("*.py"), *(package / "export").glob("*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def ensure_export(preset: str, model, report, precisions=("fp32", "fp16", "int8")) -> Path:
    """Reuse the cached graphs only if they hold this very model, made by this very code, and
    these precisions: after a retrain, a preset or a model-code change, stale graphs would time
    another architecture."""
    out = EXPORTS / preset
    stamp = out / "graph_source.sha256"  # beside the export, not in its manifest: a cache key
    floats = tuple(p for p in precisions if p != "int8")
    try:
        manifest = read_manifest(out)
        same_model = manifest["model_hash"] == state_dict_hash(model) and stamp.read_text() == graph_source_hash()
    except Exception:
        manifest, same_model = None, False
    if not (same_model and set(floats) <= set(manifest["precisions"])):
        print(f"exporting {preset} to {out} ...", flush=True)
        EXPORTS.mkdir(parents=True, exist_ok=True)
        manifest = export_model(model, weights_provenance(report), ExportRequest(out, floats))
        stamp.write_text(graph_source_hash())
    if "int8" in precisions and "int8" not in manifest["precisions"]:
        print(f"quantizing {preset} ...", flush=True)
        manifest["int8"] = quantize_export(model, out, manifest["graphs"], scenes=BENCH_CALIBRATION_SCENES)
        manifest["precisions"].append("int8")
        write_manifest(out, manifest)
    return out


def bench_runner(runner, size: int, repeats: int, rng) -> dict:
    image = (rng.random((1, 3, size, size)) * 255).astype(np.float32)
    state = runner.encode(image)
    row = {"encoder_ms": median_ms(lambda: runner.encode(image), max(1, repeats // 2))}
    for clicks in (1, 20):
        coords = (rng.random((1, clicks, 2)) * (size - 1)).astype(np.float32)
        labels = (np.arange(clicks) % 3 != 2).astype(np.int32)[None]
        prev = rng.random((1, 1, size, size)).astype(np.float32)
        row[f"decoder_ms_{clicks}_clicks"] = median_ms(lambda: runner.decode(state, coords, labels, prev), repeats)
    return row


def bench(preset: str, repeats: int) -> list[dict]:
    model, report = load_model(preset)
    folder = ensure_export(preset, model, report)
    size = model.cfg.input_size
    runners = {
        ("torch", "fp32"): TorchRunner(model),
        ("torch", "fp16"): TorchRunner(to_fp16(model)) if size <= TORCH_FP16_MAX_INPUT else None,
        ("ort", "fp32"): OrtRunner(folder, "fp32", providers="cpu"),
        ("ort", "fp16"): OrtRunner(folder, "fp16", providers="cpu"),
        ("ort", "int8"): OrtRunner(folder, "int8", providers="cpu"),
    }
    rows, skipped = [], []
    for (backend, precision), runner in runners.items():
        if runner is None:
            skipped.append({"preset": preset, "backend": backend, "precision": precision,
                            "skipped": "float16 is emulated by PyTorch on this CPU"})
            continue
        print(f"{preset} {backend} {precision} ...", flush=True)
        row = {"preset": preset, "backend": backend, "precision": precision,
               "weights": "bundled" if report.bundled else report.format}
        row.update(bench_runner(runner, size, repeats, np.random.default_rng(0)))
        rows.append(row)
    torch32 = rows[0]
    for row in rows:
        row["decoder_speedup_vs_torch_fp32"] = torch32["decoder_ms_1_clicks"] / row["decoder_ms_1_clicks"]
        row["encoder_speedup_vs_torch_fp32"] = torch32["encoder_ms"] / row["encoder_ms"]
    return rows + skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["ois-tiny", "ois-s-1024"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {
        "benchmark": "CPU latency, PyTorch eager vs ONNX Runtime (CPU EP) FP32/FP16/INT8, median ms",
        "date": now_utc(),
        "machine": machine_info(),
        "versions": tool_versions(),
        "results": [row for preset in args.presets for row in bench(preset, args.repeats)],
    }
    out = args.out or RESULTS / f"cpu_{result['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["results"]:
        if "skipped" in r:
            print(f"{r['preset']:11} {r['backend']:5} {r['precision']}  skipped: {r['skipped']}")
            continue
        print(f"{r['preset']:11} {r['backend']:5} {r['precision']}  encoder {r['encoder_ms']:9.1f} ms  "
              f"decoder {r['decoder_ms_1_clicks']:8.1f} ms (1 click) {r['decoder_ms_20_clicks']:8.1f} ms (20)  "
              f"decoder x{r['decoder_speedup_vs_torch_fp32']:.2f}")
    print(f"written {out}")


if __name__ == "__main__":
    run_script(main)
