"""Where a click's decoder time goes on the CPU runtimes, and what the image state's form costs.

    python benchmarks/profile_decoder.py [--presets ois-s-1024] [--precisions fp32 bf16] [--rounds 9] [--threads 2]
        [--against OTHER_EXPORT]

Graphs come from artifacts/bench/<preset> (bench_cpu.ensure_export: exported once, reused; random
weights for the 1024 presets: time does not depend on them). One click: P = N = 1 with a previous
mask. Per preset and OpenVINO precision, two decoders of the same graph, side by side in one
process, both with OpenVINO's per-node counters (PERF_COUNT), rounds interleaved:
- before: the graph as read, fed the contract's image state (NCHW float32 arrays) on every click,
  P dynamic with the state's broadcast made explicit (tile_state_inputs): how the openvino
  backend ran it before the state was kept in the plugin's form;
- after: the openvino backend as it is (OpenVinoRunner.profile_decode).
- against (with --against DIR): another export of the preset, e.g. made by an earlier checkout, run
  by the openvino backend as it is: a model or exporter change's before and after.
`state_conversions` lists the executed nodes that convert or copy a state input (OpenVINO names a
Reorder after its source: `pyramid_l1_abcd_acdb_...`; Tile copies the state to P rows). ONNX
Runtime's profile of the same click (fp32) is added for comparison.
Writes benchmarks/results/profile_decoder_<date>.json with machine, CPU flags, versions, date
and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ois_deploy.contract import ENCODER_OUTPUTS
from ois_deploy.errors import run_script
from ois_deploy.model.weights import load_model
from ois_deploy.provenance import cpu_flags, machine_info, now_utc, tool_versions
from ois_deploy.runtime.openvino_backend import OpenVinoRunner, compile_settings, import_openvino, tile_state_inputs
from ois_deploy.runtime.ort_backend import OrtRunner
from ois_deploy.runtime.profiling import NodeTime, summarise

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import ensure_export  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def state_conversions(profile: dict) -> list[dict]:
    """The conversions and copies of click-independent inputs in a profile."""
    sources = ENCODER_OUTPUTS + ("Tile",)
    return [c for c in profile["conversions"] if c["type"] == "Tile" or c["name"].startswith(sources)]


class Before:
    """The decoder as the openvino backend ran it before: the ONNX graph as read, NCHW float32
    state fed per click, the state's broadcast over P tiled."""

    def __init__(self, folder: Path, precision: str, threads: int, feed: dict):
        ov = import_openvino()
        import openvino.opset13 as ops

        model = ov.Core().read_model(str(folder / "decoder.onnx"))
        tile_state_inputs(model, ops)
        settings = {**compile_settings(precision, threads), "PERF_COUNT": True}
        self.request = ov.Core().compile_model(model, "CPU", settings).create_infer_request()
        self.feed = feed

    def call(self) -> None:
        self.request.infer(self.feed)

    def events(self) -> list[NodeTime]:
        return [NodeTime(p.node_name, p.node_type, p.exec_type, p.real_time.total_seconds() * 1000)
                for p in self.request.profiling_info if p.status == p.Status.EXECUTED]


def compare(folder: Path, precision: str, threads: int, rounds: int, arrays: dict, click: tuple,
            against: Path | None = None) -> dict:
    """Before and after (and `against`), rounds interleaved: wall ms per call and the per-node profiles."""
    coords, labels, prev = click
    before = Before(folder, precision, threads, {**arrays, "point_coords": coords, "point_labels": labels, "prev_mask": prev})
    runners = {"after": OpenVinoRunner(folder, precision, threads=threads, cache=False, profile=True)}
    if against:
        runners["against"] = OpenVinoRunner(against, precision, threads=threads, cache=False, profile=True)
    states = {name: r.state_from_numpy(arrays) for name, r in runners.items()}  # once per image: the plugin's form
    calls = {"before": before.call}
    for name, r in runners.items():
        calls[name] = lambda r=r, state=states[name]: r.decode(state, coords, labels, prev)
    walls, events = {k: [] for k in calls}, []
    for fn in calls.values():
        fn()
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            walls[name].append((time.perf_counter() - start) * 1000)
        events += before.events()
    runtime = f"OpenVINO CPU ({precision})"
    profiles = {"before": summarise(events, rounds, walls["before"], runtime)}
    for name, r in runners.items():
        profiles[name] = r.profile_decode(states[name], coords, labels, prev, rounds)
    out = {}
    for name, profile in profiles.items():
        profile["call_ms"] = float(np.median(walls[name]))  # interleaved wall time (after: not its own profiling run)
        profile["state_conversions"] = state_conversions(profile)
        profile["state_conversion_ms"] = sum(c["ms"] for c in profile["state_conversions"])
        out[name] = profile
    out["after_vs_before"] = out["before"]["call_ms"] / out["after"]["call_ms"]
    if against:
        out["against_export"] = str(against)
        out["after_vs_against"] = out["against"]["call_ms"] / out["after"]["call_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["ois-s-1024"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="OpenVINO precisions")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against", type=Path, default=None,
                        help="another export of the (one) preset to profile side by side, e.g. from an earlier checkout")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.against and len(args.presets) != 1:
        parser.error("--against takes one preset")
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    rows = []
    for preset in args.presets:
        model, report = load_model(preset)
        folder = ensure_export(preset, model, report, ("fp32",))
        size = model.cfg.input_size
        del model
        image = (rng.random((1, 3, size, size)) * 255).astype(np.float32)
        ort = OrtRunner(folder, "fp32", providers="cpu", threads=args.threads, profile=True)
        state = ort.encode(image)
        click = ((rng.random((1, 1, 2)) * (size - 1)).astype(np.float32), np.ones((1, 1), np.int32),
                 rng.random((1, 1, size, size)).astype(np.float32))
        row = {"preset": preset, "onnxruntime_fp32": ort.profile_decode(state, *click, args.rounds)}
        for precision in args.precisions:
            print(f"profiling {preset} openvino {precision} ...", flush=True)
            row[f"openvino_{precision}"] = result = compare(folder, precision, args.threads, args.rounds, state, click,
                                                            args.against)
            print(f"  before {result['before']['call_ms']:.1f} ms (state conversions {result['before']['state_conversion_ms']:.1f} ms)"
                  f", after {result['after']['call_ms']:.1f} ms ({result['after']['state_conversion_ms']:.1f} ms): "
                  f"{result['after_vs_before']:.2f}x", flush=True)
            if args.against:
                print(f"  against {result['against']['call_ms']:.1f} ms: {result['after_vs_against']:.2f}x", flush=True)
        rows.append(row)
    result = {"benchmark": "a click's decoder call by node type: OpenVINO before/after the native image state (and against another export); ONNX Runtime",
              "command": "python benchmarks/profile_decoder.py " + " ".join(sys.argv[1:]),
              "rounds": args.rounds, "threads": args.threads, "cpu_flags": cpu_flags(), "machine": machine_info(),
              "versions": tool_versions(), "date": now_utc(),
              "load_average": [round(load_before[0], 1), round(os.getloadavg()[0], 1)], "results": rows}
    out = args.out or RESULTS / f"profile_decoder_{result['date'][:10]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    run_script(main)
