"""PyTorch eager latency on this machine's CPU: encode once, then per-click decode.

    python benchmarks/bench_torch_cpu.py [--presets ois-tiny ois-s-1024] [--repeats 5]

Writes benchmarks/results/torch_cpu_<date>.json with machine, versions and date.
Random weights: latency does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.weights import load_model

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: allocator and kernel selection stay out of the numbers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def bench(preset: str, repeats: int) -> dict:
    model, _ = load_model(preset)
    s = model.cfg.input_size
    image = torch.rand(1, 3, s, s) * 255
    with torch.inference_mode():
        state = model.encode(image)
        encode_ms = timed(lambda: model.encode(image), max(1, repeats // 2))
        rows = {}
        for clicks in (1, 5, 20):
            coords = torch.rand(1, clicks, 2) * (s - 1)
            labels = (torch.arange(clicks) % 3 != 2).int()[None]
            prev = torch.rand(1, 1, s, s)
            rows[str(clicks)] = statistics.median(timed(lambda: model.decode(state, coords, labels, prev), repeats))
    return {
        "preset": preset,
        "input_size": s,
        "encoder_ms": statistics.median(encode_ms),
        "decoder_ms_by_clicks": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["ois-tiny", "ois-s-1024"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {
        "benchmark": "torch eager CPU: encoder and per-click decoder latency (median ms)",
        "date": now_utc(),
        "machine": machine_info(),
        "versions": tool_versions(),
        "results": [bench(p, args.repeats) for p in args.presets],
    }
    out = args.out or RESULTS / f"torch_cpu_{result['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["results"], indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
