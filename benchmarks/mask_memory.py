"""Host memory of one mask at a large image's size (docs/design.md §2.2): the transient peak of
decode_clicks for one click on a 6000x6000 image, with and without full-size logits, through the
host loop (what ONNX Runtime, OpenVINO and TensorRT runners run) and the torch loop on the CPU.

    python benchmarks/mask_memory.py [--side 6000] [--out benchmarks/results/mask_memory_DATE.json]

tracemalloc counts numpy's and OpenCV's arrays (the host loop); torch's CPU allocations are not
Python's, so the torch loop is also measured as the growth of the process's peak RSS
(/proc/self/status VmHWM, reset through /proc/self/clear_refs before each call).
"""

from __future__ import annotations

import argparse
import json
import tracemalloc
from pathlib import Path

import numpy as np

from ois_deploy.io import atomic_write_bytes
from ois_deploy.model.weights import load_model
from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.runtime.base import Runner
from ois_deploy.runtime.predictor import decode_clicks, encode_image
from ois_deploy.runtime.torch_backend import TorchRunner

MIB = 2**20


class HostLoop(TorchRunner):
    """The ois-tiny model with the base class's (host) click loop."""

    encode_frame, empty_prev, decode_to_image = Runner.encode_frame, Runner.empty_prev, Runner.decode_to_image


def rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def one_click(runner, encoded, side: int, with_logits: bool) -> dict:
    decode_clicks(runner, encoded, [(side / 2, side / 2, True)], runner.empty_prev(), with_logits=with_logits)  # warm
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_peak()
    tracemalloc.start()
    prediction, _ = decode_clicks(runner, encoded, [(side / 2, side / 2, True)], runner.empty_prev(), with_logits=with_logits)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"with_logits": with_logits, "tracemalloc_peak_mib": round(traced / MIB, 1),
            "rss_peak_growth_mib": round((rss_peak() - before) / MIB, 1), "mask_area": int(prediction.mask.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = load_model("ois-tiny")[0]
    image = np.zeros((args.side, args.side, 3), np.uint8)
    image[args.side // 4: 3 * args.side // 4, args.side // 4: 3 * args.side // 4] = 200
    runs = {}
    for name, runner in (("host loop", HostLoop(model)), ("torch loop (CPU)", TorchRunner(model))):
        encoded = encode_image(runner, image)
        runs[name] = [one_click(runner, encoded, args.side, w) for w in (True, False)]
    record = {"date": now_utc(), "machine": machine_info(), "versions": tool_versions(), "image": f"{args.side}x{args.side}",
              "mask_mib": round(args.side * args.side / MIB, 1), "float_at_image_size_mib": round(4 * args.side**2 / MIB, 1),
              "runs": runs}
    out = args.out or Path(__file__).parent / "results" / f"mask_memory_{record['date'][:10]}.json"
    atomic_write_bytes(out, (json.dumps(record, indent=1) + "\n").encode())
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
