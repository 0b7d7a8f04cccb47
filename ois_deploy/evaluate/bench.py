"""Latency harness (docs/design.md §6): encoder, decoder per click, seconds per click over a
simulated session, and Segment-Anything-Task (SAT) latency on a 16x16 grid of single positive
clicks.

Warm-up runs are excluded; device work is synchronised before clocks are read
(Runner.synchronize), and per-call times come from the runner's timing hook.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np

from ..errors import UserError
from ..io import atomic_write_bytes
from ..provenance import cpu_flags, machine_info, now_utc, tool_versions
from ..runtime.preprocess import to_input
from .clicker import PRED_THRESHOLD, Clicker

SAT_GRID = 16
# Prompt sets per decoder call in batched SAT: all 256 on a GPU. On a CPU the best chunk depends
# on the model, runtime and caches (256 at once spilled them and ran slower than sequential calls
# on ois-tiny), so bench measures these once per run and takes the fastest per prompt.
SAT_CHUNK_GPU = 256
SAT_CHUNK_CANDIDATES = (1, 4, 8, 16, 32)
RESULTS_FILE = "bench.jsonl"
REPORT_START, REPORT_END = "<!-- bench-report:start -->", "<!-- bench-report:end -->"


def _timed(runner, fn, *args, **kwargs):
    """(fn's result, its wall time in ms with the runner's device work finished)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    runner.synchronize()
    return out, (time.perf_counter() - start) * 1000


def _ms(runner, fn) -> float:
    return _timed(runner, fn)[1]


def session_target(height: int, width: int) -> np.ndarray:
    """The object the simulated user segments in `bench`: a centred ellipse (any image works)."""
    target = np.zeros((height, width), np.uint8)
    cv2.ellipse(target, (width // 2, height // 2), (max(1, width // 4), max(1, height // 3)), 0, 0, 360, 1, -1)
    return target.astype(bool)


def sat_clicks(frame) -> np.ndarray:
    """[256, 1, 2] single positive clicks at the centres of a 16x16 grid, in the SxS frame."""
    xs = (np.arange(SAT_GRID) + 0.5) * frame.width / SAT_GRID
    ys = (np.arange(SAT_GRID) + 0.5) * frame.height / SAT_GRID
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 1, 2)
    return frame.to_input(grid)


def run_sat(runner, image: np.ndarray, coords: np.ndarray, labels: np.ndarray, chunk: int) -> None:
    """SAT: encode the image, then decode the prompt sets `chunk` at a time, each without a previous
    mask. Runner.decode_prompts makes that empty mask where the decoder runs and leaves the logits
    there (the PyTorch family: nothing of size P x S x S on the host; a host backend: chunk x S x S)."""
    state = runner.encode(image)
    for i in range(0, len(coords), chunk):
        runner.decode_prompts(state, coords[i : i + chunk], labels[i : i + chunk])


def profile_click(runner, tensor: np.ndarray, frame, calls: int) -> dict:
    """The runtime's per-node profile (Runner.profile_decode) of a first click's decoder call:
    P = N = 1, a positive click at the image's centre, no previous mask."""
    state = runner.encode(tensor)
    coords = frame.to_input(np.array([[[frame.width / 2, frame.height / 2]]], np.float32))
    return runner.profile_decode(state, coords, np.ones((1, 1), np.int32), runner.empty_prev(), calls)


def measure_sat_chunk(runner, tensor: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """ms per prompt set of one decoder call of each candidate chunk (after a warm-up call)."""
    state = runner.encode(tensor)
    per_prompt = {}
    for chunk in SAT_CHUNK_CANDIDATES:
        runner.decode_prompts(state, coords[:chunk], labels[:chunk])
        per_prompt[chunk] = _ms(runner, lambda: runner.decode_prompts(state, coords[:chunk], labels[:chunk])) / chunk
    return per_prompt


def run_bench(predictor, image: np.ndarray, clicks: int = 20, repeats: int = 5, sat: bool = True,
              sat_chunk: int | None = None, progress=None, profile: bool = False) -> dict:
    """profile: also the runtime's per-node profile of a click (the runner opened with
    profile=True; OpenVINO's counters stay on for the timings too)."""
    runner, cfg = predictor.runner, predictor.cfg
    size = cfg.input_size
    step = progress or (lambda text: None)
    tensor, frame = to_input(image, size)
    node_profile = None
    if profile:  # first: a backend without a profiler says so before the timings
        step("decoder profile")
        node_profile = profile_click(runner, tensor, frame, max(3, repeats))

    step("encoder")
    runner.encode(tensor)
    encoder = [_ms(runner, lambda: runner.encode(tensor)) for _ in range(repeats)]

    step(f"{clicks}-click sessions")
    decode_times: list[float] = []

    def record_decode(kind: str, ms: float) -> None:
        if kind == "decode":
            decode_times.append(ms)

    target = session_target(*image.shape[:2])

    def session() -> float:
        """One simulated session; returns the model's time in ms (encoder and clicks, pre- and
        post-processing included), not the simulated user's next-click search."""
        _, total = _timed(runner, predictor.set_image, image)
        clicker, pred = Clicker(target), np.zeros(target.shape, bool)
        for _ in range(clicks):
            c = clicker.next_click(pred)
            prediction, ms = _timed(runner, predictor.click, c.x, c.y, c.positive, threshold=PRED_THRESHOLD,
                                    with_logits=False)
            pred, total = prediction.mask, total + ms
        return total

    session()  # warm-up
    remove_hook = runner.add_timing_hook(record_decode)
    try:
        spc = [session() / clicks for _ in range(max(1, repeats // 2))]
    finally:
        remove_hook()
    result = {
        "encoder_ms": float(np.median(encoder)),
        "decoder_ms": {"p50": float(np.percentile(decode_times, 50)), "p90": float(np.percentile(decode_times, 90))},
        "spc_ms": float(np.median(spc)),
        "clicks": clicks,
        "repeats": repeats,
    }
    if node_profile is not None:
        result["profile"] = node_profile
    if sat:
        coords = sat_clicks(frame)
        labels = np.ones((len(coords), 1), np.int32)
        sat_runs = max(1, repeats // 3)  # median of a few runs: single runs were noisy on CPUs
        if sat_chunk is None and runner.on_gpu:
            sat_chunk = SAT_CHUNK_GPU
        elif sat_chunk is None:
            step("SAT chunk")
            sweep = measure_sat_chunk(runner, tensor, coords, labels)
            sat_chunk = min(sweep, key=sweep.get)
            result["sat_chunk_ms_per_prompt"] = {str(c): ms for c, ms in sweep.items()}
        for name, chunk in (("batched", sat_chunk), ("sequential", 1)):
            step(f"SAT {name} (chunks of {chunk})" if chunk > 1 else "SAT sequential (256 decoder calls)")
            run_sat(runner, tensor, coords, labels, chunk)
            result[f"sat_{name}_ms"] = float(np.median([_ms(runner, lambda: run_sat(runner, tensor, coords, labels, chunk))
                                                         for _ in range(sat_runs)]))
        result["sat_chunk"] = sat_chunk
        result["sat_batched_speedup"] = result["sat_sequential_ms"] / result["sat_batched_ms"]
    return result


def bench_record(predictor, backend: str, precision: str, result: dict) -> dict:
    runner = predictor.runner
    device = getattr(runner, "providers", None) or runner.device
    machine = machine_info()
    return {
        "backend": backend,
        "precision": precision,
        "preset": predictor.cfg.name,
        "device": machine.get("gpu") if "cuda" in str(device).lower() else machine["cpu"],
        "runtime_device": device if isinstance(device, str) else ",".join(device),
        # which units the runtime could use (OpenVINO: its capabilities and chosen precision), so a
        # CPU figure can be read without the machine
        "runtime_isa": getattr(runner, "runtime_info", None) or ({} if runner.on_gpu else {"cpu_flags": cpu_flags()}),
        "machine": machine,
        "versions": tool_versions(),
        "date": now_utc(),
        **result,
    }


def append_result(record: dict, results_dir: Path) -> Path:
    if results_dir.exists() and not results_dir.is_dir():
        raise UserError(f"--results-dir {results_dir} exists and is not a folder")
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / RESULTS_FILE
    old = path.read_bytes() if path.is_file() else b""
    atomic_write_bytes(path, old + (json.dumps(record) + "\n").encode())  # never a half line
    return path


def load_results(results_dir: Path) -> list[dict]:
    path = results_dir / RESULTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report_table(records: list[dict]) -> str:
    """Markdown table of the newest record per (preset, backend, precision, device)."""
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[(r["preset"], r["backend"], r["precision"], r["device"])] = r
    fmt = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
    lines = [
        "| preset | backend | precision | device | encoder ms | decoder ms p50 / p90 | SPC ms | SAT batched ms | SAT sequential ms | date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (preset, backend, precision, device), r in sorted(latest.items()):
        lines.append(
            f"| `{preset}` | {backend} | {precision} | {device} | {fmt(r['encoder_ms'])} | "
            f"{fmt(r['decoder_ms']['p50'])} / {fmt(r['decoder_ms']['p90'])} | {fmt(r['spc_ms'])} | "
            f"{fmt(r.get('sat_batched_ms'))} | {fmt(r.get('sat_sequential_ms'))} | {r['date'][:10]} |"
        )
    return "\n".join(lines)


def update_readme(readme: Path, table: str, start: str = REPORT_START, end: str = REPORT_END) -> bool:
    """Replace the text between a pair of report markers of the README, if it has them."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_bytes(readme, f"{head}{start}\n{table}\n{end}{tail}".encode())
    return True
