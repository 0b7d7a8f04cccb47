"""Where a decoder click's time goes: ONNX Runtime's profiler on the decoder graphs, FP32 and INT8.

    python benchmarks/profile_decoder.py [--presets ois-s-1024 ois-b-1024] [--clicks 5]

Graphs come from artifacts/bench/<preset> (bench_cpu.ensure_export: exported once, reused;
random weights for the 1024 presets: time does not depend on them). Each graph runs one warm-up
click, then --clicks profiled clicks (P=1, N=1, a previous mask) on the CPU provider; the
profile's node events are summed per op type and per node, divided by the clicks.
Writes benchmarks/results/profile_decoder_<date>.json with machine, CPU flags, versions, date.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from ois_deploy.errors import run_script
from ois_deploy.model.weights import load_model
from ois_deploy.provenance import cpu_flags, machine_info, now_utc, tool_versions

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import ensure_export  # noqa: E402


RESULTS = Path(__file__).parent / "results"
TOP_NODES = 15


def profile_graph(path: Path, feed: dict, clicks: int, threads: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feed)  # warm-up, dropped below by its run index
        for _ in range(clicks):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    per_op, per_node, nodes_us = defaultdict(float), {}, 0.0
    warm_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < warm_end:
            continue
        op = e["args"].get("op_name", "?")
        name = e["name"][: -len("_kernel_time")]
        per_op[op] += e["dur"]
        entry = per_node.setdefault(name, {"node": name, "op": op, "us": 0.0, "output_shape": e["args"].get("output_type_shape")})
        entry["us"] += e["dur"]
        nodes_us += e["dur"]
    click_ms = float(np.median([r["dur"] for r in runs[1:]])) / 1000 if len(runs) > 1 else None
    ops = sorted(per_op.items(), key=lambda kv: -kv[1])
    top = sorted(per_node.values(), key=lambda n: -n["us"])[:TOP_NODES]
    return {
        "click_ms_median": click_ms,
        "kernel_ms_per_click": nodes_us / clicks / 1000,
        "per_op_type": [{"op": op, "ms_per_click": us / clicks / 1000, "share": us / nodes_us} for op, us in ops],
        "top_nodes": [{**n, "ms_per_click": n.pop("us") / clicks / 1000} for n in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["ois-s-1024", "ois-b-1024"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for preset in args.presets:
        from ois_deploy.runtime.ort_backend import OrtRunner

        model, report = load_model(preset)
        folder = ensure_export(preset, model, report, tuple(args.precisions))
        size = model.cfg.input_size
        image = (rng.random((1, 3, size, size)) * 255).astype(np.float32)
        state = OrtRunner(folder, "fp32", providers="cpu").encode(image)
        feed = {**state, "point_coords": (rng.random((1, 1, 2)) * (size - 1)).astype(np.float32),
                "point_labels": np.ones((1, 1), np.int32), "prev_mask": rng.random((1, 1, size, size)).astype(np.float32)}
        for precision in args.precisions:
            graph = folder / ("decoder.onnx" if precision == "fp32" else f"decoder.{precision}.onnx")
            print(f"profiling {preset} {precision} ...", flush=True)
            row = {"preset": preset, "precision": precision, **profile_graph(graph, feed, args.clicks, args.threads)}
            rows.append(row)
            print(f"  {row['click_ms_median']:.1f} ms per click; " + ", ".join(
                f"{o['op']} {o['share']:.0%}" for o in row["per_op_type"][:5]), flush=True)
    result = {"benchmark": "decoder graph profile (ONNX Runtime profiler, CPU provider), per click",
              "clicks": args.clicks, "threads": args.threads, "cpu_flags": cpu_flags(), "machine": machine_info(),
              "versions": tool_versions(), "date": now_utc(), "results": rows}
    out = args.out or RESULTS / f"profile_decoder_{result['date'][:10]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    run_script(main)
