"""The `ois-deploy` command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import json as jsonlib
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserError, exit_with
from .io import atomic_write_bytes, encode_image, write_json
from .model import count_parameters
from .model.presets import PRESETS, get_preset
from .training import TrainSettings  # its defaults are the train command's
from .weights import CheckpointMismatch, load_model, print_notes, resolve_checkpoint

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Deploy OIS interactive segmentation."
)

PAPER_PARAMS = {"ois-b-1024": 107_880_000, "ois-b-2048": 107_880_000}

PresetOpt = typer.Option(None, "--preset", "-p", help=f"One of: {', '.join(PRESETS)}.")
CheckpointOpt = typer.Option(
    None, "--checkpoint", "-c",
    help="Weights: ois-deploy or Depth Anything V2 file, or 'random' (default: the preset's bundled weights, if any).",
)
JsonOpt = typer.Option(None, "--json", help="Write results as JSON to PATH; '-' for stdout.")


def console_for(json_path: Optional[str], stderr: bool = False) -> Console:
    """Human output goes to stderr when JSON goes to stdout. Logs and pipes get wide tables."""
    to_stderr = stderr or json_path == "-"
    tty = (sys.stderr if to_stderr else sys.stdout).isatty()
    return Console(stderr=to_stderr, highlight=False, width=None if tty else 120)


@app.command()
def info(preset: Optional[str] = PresetOpt, checkpoint: Optional[str] = CheckpointOpt, json: Optional[str] = JsonOpt):
    """Show a model's configuration, parameter split and weights."""
    out = console_for(json)
    try:
        # Without weights, the meta device gives shapes and counts without allocating memory.
        needs_data = resolve_checkpoint(preset, checkpoint) is not None
        model, report = load_model(preset, checkpoint, device="cpu" if needs_data else "meta")
    except CheckpointMismatch as e:
        if json:
            write_json({"weights": e.report.to_dict()}, json)
        raise
    print_notes(report)
    cfg = model.cfg
    params = count_parameters(model)
    result = {
        "preset": cfg.name,
        "input_size": cfg.input_size,
        "grid": cfg.grid,
        "mask_size": cfg.mask_size,
        "max_clicks": cfg.decoder.max_clicks,
        "params": params,
        "weights": report.to_dict(),
        "config": cfg.to_dict(),
    }
    if cfg.name in PAPER_PARAMS:
        result["paper_params_total"] = PAPER_PARAMS[cfg.name]
    table = Table(title=f"{cfg.name}: input {cfg.input_size}x{cfg.input_size}, tokens {cfg.grid}x{cfg.grid}, "
                  f"mask {cfg.mask_size}x{cfg.mask_size}")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for part, n in params.items():
        table.add_row(part, f"{n:,}")
    if cfg.name in PAPER_PARAMS:
        table.add_row("paper (OIS-B)", f"{PAPER_PARAMS[cfg.name]:,}")
    out.print(table)
    out.print(f"weights: {report.format}" + (f" from {report.path}" if report.path else ""))
    if json:
        write_json(result, json)


def parse_click(text: str) -> tuple[float, float, bool]:
    """'X,Y,+' or 'X,Y,-' (X column, Y row, in image pixels)."""
    parts = [p.strip() for p in text.split(",")]
    signs = {"+": True, "1": True, "pos": True, "-": False, "0": False, "neg": False}
    try:
        if len(parts) != 3 or parts[2] not in signs:
            raise ValueError
        return float(parts[0]), float(parts[1]), signs[parts[2]]
    except ValueError:
        raise UserError(f"bad click {text!r}: write X,Y,+ or X,Y,- (X column, Y row)") from None


def overlay_image(image: np.ndarray, mask: np.ndarray, clicks: list[tuple[float, float, bool]]) -> np.ndarray:
    """Mask tinted over the image, its outline, and the clicks (green +, red -)."""
    import cv2

    out = image.astype(np.float32)
    tint = np.array([30, 144, 255], np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * tint
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, min(image.shape[:2]) // 300))
    radius = max(3, min(image.shape[:2]) // 80)
    for x, y, positive in clicks:
        centre = (int(round(x)), int(round(y)))
        cv2.circle(out, centre, radius + 2, (255, 255, 255), -1)
        cv2.circle(out, centre, radius, (40, 200, 60) if positive else (230, 40, 40), -1)
    return out


@app.command()
def predict(
    image: str = typer.Option(..., "--image", "-i", help="Image file."),
    click: list[str] = typer.Option(..., "--click", help="X,Y,+ or X,Y,- in image pixels; repeat, in order."),
    out: str = typer.Option(..., "--out", "-o", help="Mask PNG (0/255) at the image's size."),
    overlay: Optional[str] = typer.Option(None, "--overlay", help="Also write the mask and clicks over the image."),
    preset: Optional[str] = PresetOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    backend: str = typer.Option("torch", "--backend", help="torch, torch-cuda (PyTorch model) or ort (exported graphs)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Export folder, for --backend ort."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16."),
    device: Optional[str] = typer.Option(None, "--device", help="torch: cpu (default) or cuda; ort: auto (default), cpu, cuda or tensorrt."),
):
    """Segment the object under the clicks; each click sees the mask of the clicks before it."""
    from .predictor import Predictor
    from .preprocess import read_image

    clicks = [parse_click(c) for c in click]
    rgb = read_image(image)
    predictor = Predictor(preset, checkpoint, backend=backend, device=device, export_dir=model, precision=precision)
    for note in predictor.notes:
        print(note, file=sys.stderr)
    if len(clicks) > predictor.max_clicks:
        raise UserError(f"at most {predictor.max_clicks} clicks per object, got {len(clicks)}")
    predictor.set_image(rgb)
    for x, y, _ in clicks:  # check all before running any
        predictor.frame.check_click(x, y)
    for x, y, positive in clicks:
        result = predictor.click(x, y, positive)
    files = {out: encode_image(out, result.mask.astype(np.uint8) * 255)}
    if overlay:
        files[overlay] = encode_image(overlay, overlay_image(rgb, result.mask, clicks))
    for path, data in files.items():
        atomic_write_bytes(path, data)
    area = 100.0 * result.mask.mean()
    print(f"mask: {out} ({rgb.shape[1]}x{rgb.shape[0]}, {area:.1f}% of the image, {len(clicks)} clicks)", file=sys.stderr)


def progress_steps(console: Console):
    """A spinner with elapsed time for long, step-wise work; returns (context, step callback)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True)
    state = {"task": None}

    def step(text: str) -> None:
        if state["task"] is not None:
            bar.update(state["task"], completed=1, total=1)
        state["task"] = bar.add_task(text, total=None)

    def finish() -> None:
        if state["task"] is not None:
            bar.update(state["task"], completed=1, total=1)

    return bar, step, finish


def parse_precisions(text: str) -> tuple[str, ...]:
    choices = {"fp32": ("fp32",), "fp16": ("fp16",), "both": ("fp32", "fp16")}
    if text not in choices:
        raise UserError(f"precision must be fp32, fp16 or both, not {text!r}")
    return choices[text]


def print_lint(console: Console, reports) -> bool:
    ok = True
    for r in reports:
        console.print(f"lint {r.graph}: " + ("ok" if r.ok else f"{len(r.problems)} problem(s)"))
        for problem in r.problems:
            console.print(f"  - {problem}")
        for note in r.notes:
            console.print(f"  note: {note}")
        ok &= r.ok
    return ok


@app.command()
def export(
    out: str = typer.Option(..., "--out", "-o", help="Folder for the graphs and manifest.json."),
    preset: Optional[str] = PresetOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    precision: str = typer.Option("both", "--precision", help="fp32, fp16 or both."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default 18; 23 with --attention fused)."),
    attention: str = typer.Option("matmul", "--attention", help="matmul (MatMul-Add-Softmax-MatMul) or fused (ONNX Attention)."),
):
    """Export the encoder and decoder graphs (FP32 and/or FP16), then lint them."""
    from .exporters.lint import lint_export
    from .exporters.onnx_export import ExportRequest, export_model
    from .weights import weights_provenance

    target = Path(out)
    request = ExportRequest(target, parse_precisions(precision), opset or (23 if attention == "fused" else 18), attention)
    precisions = request.precisions
    model, report = load_model(preset, checkpoint)
    print_notes(report)
    weights = weights_provenance(report)
    console = console_for(None, stderr=True)
    bar, step, finish = progress_steps(console)
    with bar:
        manifest = export_model(model, weights, request, progress=step)
        step("lint")
        reports = lint_export(target, precisions)
        finish()
    if not print_lint(console, reports):
        raise UserError(f"exported graphs in {out} failed lint (listed above)")
    console.print(f"exported {', '.join(manifest['graphs'])} and manifest.json to {out}")


@app.command()
def build(
    folder: str = typer.Argument(..., help="Export folder (ois-deploy export --out DIR)."),
    precision: str = typer.Option("fp16", "--precision", help="Which graphs to build from: fp16 or fp32."),
    max_clicks: Optional[int] = typer.Option(None, "--max-clicks", help="Interactive profile: N up to this (default: the preset's)."),
    max_prompts: int = typer.Option(256, "--max-prompts", help="SAT profile: P up to this."),
    timing_cache: Optional[str] = typer.Option(None, "--timing-cache", help="Timing cache file, reused and updated."),
    workspace: Optional[float] = typer.Option(None, "--workspace", help="Builder workspace limit, GiB."),
    opt_level: Optional[int] = typer.Option(None, "--opt-level", help="Builder optimisation level 0-5."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build even if the recorded engines fit this machine."),
):
    """Build TensorRT engines (strongly typed) from the exported graphs; record them in the manifest."""
    from .engines.tensorrt import build_engines

    if precision not in ("fp16", "fp32"):
        raise UserError(f"precision must be fp16 or fp32, not {precision!r}")
    console = console_for(None, stderr=True)
    bar, step, finish = progress_steps(console)
    with bar:
        manifest = build_engines(folder, precision, max_clicks, max_prompts, timing_cache, workspace, opt_level, rebuild,
                                 progress=step)
        finish()
    e = manifest["engines"]
    console.print(f"engines in {folder}: {', '.join(e['files'])} ({e['precision']}, TensorRT {e['tensorrt']}, {e['gpu']})")


@app.command()
def lint(folder: str = typer.Argument(..., help="Export folder.")):
    """Check exported graphs: onnx checker, TensorRT-parsable ops, forbidden patterns, FP32 islands, dynamic axes."""
    from .exporters.lint import lint_export

    console = console_for(None)
    if not print_lint(console, lint_export(folder)):
        raise UserError(f"graphs in {folder} failed lint (listed above)")


@app.command()
def verify(
    folder: str = typer.Argument(..., help="Export folder."),
    backend: str = typer.Option("ort", "--backend", help="Backend to check against PyTorch FP32."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16 or both (default: what was exported)."),
    images: Optional[str] = typer.Option(None, "--images", help="Folder of real images (default: bundled ones)."),
    checkpoint: Optional[str] = CheckpointOpt,
    rel_l2_fp32: Optional[float] = typer.Option(None, "--rel-l2-fp32", help="Tolerance override."),
    rel_l2_fp16: Optional[float] = typer.Option(None, "--rel-l2-fp16", help="Tolerance override."),
    iou_mean: Optional[float] = typer.Option(None, "--iou-mean", help="Minimum mean mask IoU override."),
    json: Optional[str] = JsonOpt,
):
    """Compare a backend with the PyTorch FP32 model; exit 1 above tolerance."""
    from .parity import verify as run_verify

    tolerances: dict = {"fp32": {}, "fp16": {}}
    if rel_l2_fp32 is not None:
        tolerances["fp32"]["rel_l2"] = rel_l2_fp32
    if rel_l2_fp16 is not None:
        tolerances["fp16"]["rel_l2"] = rel_l2_fp16
    if iou_mean is not None:
        for p in tolerances:
            tolerances[p]["mask_iou_mean"] = iou_mean
    console = console_for(json)
    bar, step, finish = progress_steps(console_for(None, stderr=True))
    with bar:
        result = run_verify(folder, backend, parse_precisions(precision) if precision else None, images, checkpoint,
                            tolerances, progress=step)
        finish()
    table = Table(title=f"parity: {result['backend']} ({', '.join(result['providers'])}) vs PyTorch FP32, {result['preset']}")
    for col in ("precision", "output", "max abs", "rel L2", "non-finite", "IoU mean", "IoU min"):
        table.add_column(col, justify="left" if col in ("precision", "output") else "right")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in result["results"]:
        table.add_row(r["precision"], r["output"], fmt(r["max_abs"], ".2e"), fmt(r["rel_l2"], ".2e"), str(r["nonfinite"]),
                      fmt(r["mask_iou_mean"], ".4f"), fmt(r["mask_iou_min"], ".4f"))
    console.print(table)
    console.print("PASSED" if result["passed"] else "FAILED: " + "; ".join(result["failures"]))
    if json:
        write_json(result, json)
    if not result["passed"]:
        raise typer.Exit(1)


def object_progress(console: Console, total: int, what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console)
    return bar, bar.add_task(what, total=total)


def train_with_progress(preset, settings, out: str, log_path: str, console: Console) -> dict:
    """training.train with a progress bar showing running means of loss and IoU; returns its record."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .training import train

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    task = bar.add_task("train", total=settings.steps, stats="")
    recent: list[dict] = []

    def progress(step: int, record: dict) -> None:
        recent.append(record)
        del recent[:-50]  # running means over the last 50 steps: single batches are noisy
        mean = lambda k: sum(r[k] for r in recent) / len(recent)  # noqa: E731
        bar.update(task, advance=1, stats=f"loss {mean('loss'):.3f} iou {mean('iou'):.3f}")

    with bar:
        return train(preset, settings, out, log_path, progress)


def run_eval(predictor, samples, max_clicks: int, console: Console, label: str):
    from .evaluation import run_object

    results = []
    bar, task = object_progress(console, len(samples), f"eval {label}")
    with bar:
        for sample in samples:
            image, gt = sample.load()
            results.append(run_object(predictor, image, gt, sample.name, max_clicks))
            bar.advance(task)
    return results


@app.command(name="eval")
def evaluate(
    model: str = typer.Argument(..., help="A preset name (PyTorch) or an export folder."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="DAVIS, HQSeg44K-val or images/+masks/ folder."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch, torch-cuda or ort (default: torch for a preset, ort for a folder)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16."),
    checkpoint: Optional[str] = CheckpointOpt,
    device: Optional[str] = typer.Option(None, "--device", help="torch: cpu/cuda; ort: auto/cpu/cuda/tensorrt."),
    max_clicks: int = typer.Option(20, "--max-clicks", min=1, max=24),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N objects only."),
    json: Optional[str] = JsonOpt,
    save_clicks: Optional[str] = typer.Option(None, "--save-clicks", help="Write the clicks and IoUs as JSON lines."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write the mIoU-vs-clicks curve as PNG."),
    compare_backend: Optional[str] = typer.Option(None, "--compare-backend", help="Also run this backend; report task-level parity."),
    compare_precision: str = typer.Option("fp32", "--compare-precision", help="Precision of the --compare-backend run (the reference: fp32)."),
    order_attention: Optional[str] = typer.Option(None, "--order-attention",
                                                  help="Override the model's order-aware attention: bias, mask or off (ablation; torch backends)."),
):
    """NoC@85/90/95, NoF, mIoU@k and seconds per click with simulated clicks (SegNext protocol)."""
    from .datasets import load_dataset
    from .evaluation import summarise
    from .predictor import predictor_for
    from .provenance import machine_info, now_utc, tool_versions

    layout, samples = load_dataset(dataset)
    samples = samples[:limit] if limit else samples
    for path in (json, save_clicks, plot):  # fail before the long run, not after it
        if path and path != "-" and not Path(path).parent.is_dir():
            raise UserError(f"output folder does not exist: {Path(path).parent}")
    predictor = predictor_for(model, backend, checkpoint, precision, device, order_attention)
    for note in predictor.notes:
        print(note, file=sys.stderr)
    backend_name = predictor.backend
    err = console_for(None, stderr=True)
    results = run_eval(predictor, samples, max_clicks, err, backend_name)
    summary = summarise(results, max_clicks)
    report = {"summary": summary, "backend": backend_name, "precision": precision, "model": model,
              "checkpoint": checkpoint, "order_attention": predictor.cfg.decoder.order_attention,
              "dataset": str(dataset), "layout": layout, "objects": len(results),
              "machine": machine_info(), "versions": tool_versions(), "date": now_utc()}

    if compare_backend:
        other = predictor_for(model, compare_backend, checkpoint, compare_precision, device, order_attention)
        others = run_eval(other, samples, max_clicks, err, compare_backend)
        same = [[(c.x, c.y, c.positive) for c in a.clicks] == [(c.x, c.y, c.positive) for c in b.clicks]
                for a, b in zip(results, others)]
        report["compare"] = {
            "backend": compare_backend,
            "precision": compare_precision,
            "identical_click_sequences": int(sum(same)),
            "objects": len(same),
            "max_iou_difference": float(max(abs(x - y) for a, b in zip(results, others) for x, y in zip(a.ious, b.ious))),
            "NoC@90": {backend_name: summary["NoC@90"], compare_backend: summarise(others, max_clicks)["NoC@90"]},
        }

    out = console_for(json)
    table = Table(title=f"{model} on {dataset} ({layout}, {len(results)} objects), {backend_name} {precision}")
    for col in ("NoC@85", "NoC@90", "NoC@95", "NoF@85", "NoF@90", "NoF@95", "mIoU@1", "mIoU@5", "SPC ms"):
        table.add_column(col, justify="right")
    m = summary["mIoU@k"]
    table.add_row(*(f"{summary[k]:.2f}" for k in ("NoC@85", "NoC@90", "NoC@95")),
                  *(str(summary[k]) for k in ("NoF@85", "NoF@90", "NoF@95")),
                  f"{m[0]:.4f}", f"{m[min(4, len(m) - 1)]:.4f}", f"{summary['spc_ms']:.1f}")
    out.print(table)
    if "compare" in report:
        c = report["compare"]
        out.print(f"task parity vs {c['backend']} {c['precision']}: {c['identical_click_sequences']}/{c['objects']} identical click "
                  f"sequences, max per-click IoU difference {c['max_iou_difference']:.4f}, NoC@90 {c['NoC@90']}")
    if save_clicks:
        atomic_write_bytes(save_clicks, "".join(jsonlib.dumps(r.to_json()) + "\n" for r in results).encode())
    if plot:
        write_curve(plot, summary["mIoU@k"], f"{model} ({backend_name} {precision})")
    if json:
        write_json(report, json)


def write_curve(path: str, miou: list[float], label: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(miou) + 1), miou, marker="o", markersize=3, label=label)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="A preset name (PyTorch) or an export folder."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch, torch-cuda or ort."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16."),
    checkpoint: Optional[str] = CheckpointOpt,
    device: Optional[str] = typer.Option(None, "--device", help="torch: cpu/cuda; ort: auto/cpu/cuda/tensorrt."),
    image: Optional[str] = typer.Option(None, "--image", help="Image to time on (default: the bundled demo image)."),
    clicks: int = typer.Option(20, "--clicks", min=1, max=24),
    repeats: int = typer.Option(5, "--repeats", min=1),
    sat: bool = typer.Option(True, "--sat/--no-sat", help="Also time the 16x16 Segment-Anything-Task."),
    sat_chunk: Optional[int] = typer.Option(None, "--sat-chunk", min=1, max=256,
                                            help="Prompt sets per decoder call in batched SAT (default 256 on a GPU, 32 on a CPU)."),
    results_dir: str = typer.Option("benchmarks/results", "--results-dir", help="Where results are appended."),
    report: bool = typer.Option(False, "--report", help="Render the performance table and chart from the results."),
    readme: Optional[str] = typer.Option(None, "--readme", help="With --report: also write the table into this README's report block."),
    json: Optional[str] = JsonOpt,
):
    """Encoder and per-click decoder latency, seconds per click, and SAT latency (batched, sequential)."""
    from .bench import (
        REPORT_END,
        REPORT_START,
        append_result,
        bench_record,
        load_results,
        report_chart,
        report_table,
        run_bench,
        update_readme,
    )
    from .predictor import predictor_for
    from .preprocess import read_image

    out = console_for(json)
    results = Path(results_dir)
    if report:
        records = load_results(results)
        if not records:
            raise UserError(f"no benchmark results in {results} (run ois-deploy bench MODEL first)")
        table = report_table(records)
        report_chart(records, results / "report.png")
        (results / "report.md").write_text(table + "\n")
        updated = bool(readme) and update_readme(Path(readme), table)
        if readme and not updated:
            raise UserError(f"{readme} has no report block ({REPORT_START} ... {REPORT_END})")
        out.print(table)
        print(f"wrote {results / 'report.md'}, {results / 'report.png'}" + (f", {readme}" if updated else ""), file=sys.stderr)
        return
    if model is None:
        raise UserError("give a MODEL (preset name or export folder), or --report")
    rgb = read_image(image or Path(__file__).parent / "assets" / "demo.png")
    predictor = predictor_for(model, backend, checkpoint, precision, device)
    for note in predictor.notes:
        print(note, file=sys.stderr)
    backend_name = predictor.backend
    bar, step, finish = progress_steps(console_for(None, stderr=True))
    with bar:
        result = run_bench(predictor, rgb, clicks, repeats, sat, sat_chunk, progress=step)
        finish()
    record = bench_record(predictor, backend_name, precision, result)
    path = append_result(record, results)
    out.print(report_table([record]))
    if "sat_batched_speedup" in record:
        out.print(f"SAT batched is {record['sat_batched_speedup']:.2f}x faster than sequential")
    print(f"appended to {path}", file=sys.stderr)
    if json:
        write_json(record, json)


@app.command()
def train(
    out: str = typer.Option(..., "--out", "-o", help="Checkpoint to write (ois-deploy safetensors)."),
    steps: int = typer.Option(..., "--steps", min=1, help="Optimiser steps (one batch of fresh scenes each)."),
    preset: str = typer.Option("ois-tiny", "--preset", "-p", help="Model to train from scratch (ois-tiny fits a CPU)."),
    seed: int = typer.Option(TrainSettings.seed, "--seed", help="Seeds the init and every generated scene and click."),
    batch_size: int = typer.Option(TrainSettings.batch_size, "--batch-size", min=1, help="Scenes per step."),
    objects_per_scene: int = typer.Option(TrainSettings.objects_per_scene, "--objects-per-scene", min=1,
                                          help="Objects prompted per scene (one encoder pass)."),
    lr: float = typer.Option(TrainSettings.lr, "--lr", help="Peak learning rate (AdamW, warm-up then cosine)."),
    max_extra_clicks: int = typer.Option(TrainSettings.max_extra_clicks, "--max-extra-clicks", min=0,
                                         help="Most simulated corrective clicks (no gradient) before the trained one."),
    order_attention: str = typer.Option(TrainSettings.order_attention, "--order-attention",
                                        help="bias (OIS) or off (trains the ablation)."),
    log: Optional[str] = typer.Option(None, "--log", help="Loss log, JSON lines (default: OUT + .log.jsonl)."),
):
    """Train OIS on generated depth-ordered scenes (RITM/SegNext iterative protocol, mask and
    depth losses); writes the checkpoint and a loss log."""
    from .model.presets import ORDER_ATTENTION_MODES

    get_preset(preset)
    if order_attention not in ORDER_ATTENTION_MODES:
        raise UserError(f"--order-attention must be one of {', '.join(ORDER_ATTENTION_MODES)}")
    settings = TrainSettings(
        steps=steps, seed=seed, batch_size=batch_size, objects_per_scene=objects_per_scene, lr=lr,
        max_extra_clicks=max_extra_clicks, order_attention=order_attention,
    )
    log_path = log or out + ".log.jsonl"
    console = console_for(None, stderr=True)
    summary = train_with_progress(preset, settings, out, log_path, console)
    console.print(f"wrote {out} and {log_path} ({summary['seconds']:.0f} s, {steps} steps, seed {seed})")


@app.command()
def scenes(
    out: str = typer.Option(..., "--out", "-o", help="New folder for the dataset (DAVIS layout: img/ + gt/)."),
    count: int = typer.Option(100, "--count", min=1, help="Scenes to generate (one sample per visible object)."),
    seed: int = typer.Option(0, "--seed", help="Held-out stream seed: never seen in training."),
):
    """Write held-out generated scenes as an evaluation set in the DAVIS layout."""
    import shutil

    from .io import staging_dir_beside
    from .synthetic import write_davis

    target = Path(out)
    if target.exists():
        raise UserError(f"{target} already exists: give a new folder")
    if not target.parent.is_dir():
        raise UserError(f"output folder does not exist: {target.parent}")
    staging = staging_dir_beside(target)  # nothing half-written
    try:
        console = console_for(None, stderr=True)
        bar, task = object_progress(console, count, "scenes")
        with bar:
            written = write_davis(staging, count, seed, progress=lambda: bar.advance(task))
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    console.print(f"wrote {written} objects from {count} scenes to {target}")


@app.command()
def version():
    """Print the ois-deploy version."""
    print(__version__)


def main(argv: Optional[list[str]] = None) -> None:
    try:
        code = app(args=argv, standalone_mode=False, prog_name="ois-deploy")
    except UserError as e:
        exit_with(e)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # Usage errors of typer's (vendored) click: one line, their exit code (2).
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            print(f"error: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)
