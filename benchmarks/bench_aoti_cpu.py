"""CPU decoder latency, side by side in one process: AOTInductor packages (aoti) vs ONNX Runtime
FP32 vs PyTorch eager, interleaved (each round times every backend once, so load from other
processes falls on all of them alike).

    python benchmarks/bench_aoti_cpu.py [--presets ois-tiny ois-s-1024] [--rounds 15] [--threads 2]

For each preset (its default weights: bundled for ois-tiny, random init otherwise; latency does not
depend on them): the graphs are exported to artifacts/bench/<preset> if missing or stale (as
bench_cpu.py does), the CPU FP32 packages built there if missing, then the encoder once per backend
and the per-click decoder at 1 and 20 clicks, P = 1, through the Runner interface (numpy in, numpy
out). Writes benchmarks/results/aoti_cpu_<date>.json with machine, CPU ISA flags, versions, load
average and date.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from bench_cpu import EXPORTS, RESULTS, ensure_export, median_ms

from ois_deploy.errors import run_script
from ois_deploy.export.aoti import build_packages
from ois_deploy.model.weights import load_model
from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.runtime.aoti_backend import cpu_isa_flags
from ois_deploy.runtime.registry import RunnerSpec, open_runner

CLICKS = (1, 20)


def decoder_inputs(size: int, clicks: int, rng) -> tuple:
    coords = (rng.random((1, clicks, 2)) * (size - 1)).astype(np.float32)
    labels = (np.arange(clicks) % 3 != 2).astype(np.int32)[None]
    return coords, labels, rng.random((1, 1, size, size)).astype(np.float32)


def bench(preset: str, rounds: int, threads: int) -> list[dict]:
    model, report = load_model(preset)
    folder = ensure_export(preset, model, report, precisions=("fp32",))
    start = time.perf_counter()
    entry = build_packages(folder, "cpu", "fp32", progress=lambda text: print(f"{preset}: {text}", flush=True))["aoti"]["cpu-fp32"]
    build_s = round(time.perf_counter() - start, 1)
    size = model.cfg.input_size
    runners = {name: open_runner(RunnerSpec(name, str(folder), "fp32", threads=threads)) for name in ("aoti", "ort", "torch")}
    rng = np.random.default_rng(0)
    image = (rng.random((1, 3, size, size)) * 255).astype(np.float32)
    states = {name: r.encode(image) for name, r in runners.items()}
    encoder_ms = {name: median_ms(lambda r=r: r.encode(image), 3) for name, r in runners.items()}
    inputs = {n: decoder_inputs(size, n, rng) for n in CLICKS}
    times = {(name, n): [] for name in runners for n in CLICKS}
    for name, r in runners.items():  # warm-up: first-call allocation stays out of the numbers
        for n in CLICKS:
            r.decode(states[name], *inputs[n])
    for _ in range(rounds):
        for n in CLICKS:
            for name, r in runners.items():
                t = time.perf_counter()
                r.decode(states[name], *inputs[n])
                times[(name, n)].append((time.perf_counter() - t) * 1000)
    rows = []
    for name in runners:
        row = {"preset": preset, "backend": name, "precision": "fp32", "threads": threads,
               "weights": "bundled" if report.bundled else report.format, "encoder_ms": encoder_ms[name]}
        for n in CLICKS:
            row[f"decoder_ms_{n}_clicks"] = statistics.median(times[(name, n)])
            row[f"decoder_ms_{n}_clicks_p90"] = float(np.percentile(times[(name, n)], 90))
        rows.append(row)
    ort = rows[1]
    for row in rows:
        for n in CLICKS:
            row[f"decoder_vs_ort_{n}_clicks"] = row[f"decoder_ms_{n}_clicks"] / ort[f"decoder_ms_{n}_clicks"]
    rows[0]["build"] = {"seconds_this_run": build_s, "recorded": entry["build_seconds"], "inductor_configs": entry["inductor_configs"]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["ois-tiny", "ois-s-1024"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    EXPORTS.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    result = {
        "benchmark": "CPU decoder latency, aoti (AOTInductor) vs ONNX Runtime FP32 vs PyTorch eager, interleaved, median ms",
        "date": now_utc(),
        "machine": {**machine_info(), "cpu_isa_flags": cpu_isa_flags()},
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))},  # OpenMP waiting
        "versions": tool_versions(),
        "results": [row for preset in args.presets for row in bench(preset, args.rounds, args.threads)],
    }
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}  # other processes on the machine
    out = args.out or RESULTS / f"aoti_cpu_{result['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["results"]:
        print(f"{r['preset']:11} {r['backend']:5}  encoder {r['encoder_ms']:9.1f} ms  decoder "
              + "  ".join(f"{r[f'decoder_ms_{n}_clicks']:8.1f} ms ({n} clicks, x{r[f'decoder_vs_ort_{n}_clicks']:.2f} of ORT)"
                          for n in CLICKS))
    print(f"load average before/after: {load_before} / {result['load_average']['after']}")
    print(f"written {out}")


if __name__ == "__main__":
    run_script(main)
