"""Commands that measure a model: eval (the interactive protocol) and bench (latency)."""

from __future__ import annotations

import json as jsonlib
import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ..io import atomic_write_bytes, check_output_file, check_output_folder, check_outputs, write_json
from .app import BackendOpt, CheckpointOpt, DeviceOpt, Int8DecoderOpt, JsonOpt, MaxImagePixelsOpt, PrecisionOpt, app, check_json
from .console import console_for, counted_progress, note, progress_steps, table

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def run_eval(predictor, samples, max_clicks: int, console, label: str, max_image_pixels: int = 100_000_000,
             skipped: list | None = None):
    """The evaluation's sessions under a progress bar; names of objects with an empty ground
    truth go to `skipped`."""
    from ..evaluate.metrics import evaluate_samples

    bar, task = counted_progress(console, len(samples), f"eval {label}")
    with bar:
        return evaluate_samples(predictor, samples, max_clicks, progress=lambda: bar.advance(task),
                                max_image_pixels=max_image_pixels, skipped=skipped)


@app.command(name="eval")
def evaluate(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="A preset name (PyTorch) or an export folder."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="DAVIS, HQSeg44K-val or images/+masks/ folder."),
    backend: Optional[str] = BackendOpt,
    precision: str = PrecisionOpt,
    int8_decoder: str = Int8DecoderOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    device: Optional[str] = DeviceOpt,
    max_clicks: int = typer.Option(20, "--max-clicks", min=1, max=24),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N objects only."),
    json: Optional[str] = JsonOpt,
    save_clicks: Optional[str] = typer.Option(None, "--save-clicks", help="Write the clicks and IoUs as JSON lines."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write the mIoU-vs-clicks curve as PNG."),
    compare_backend: Optional[str] = typer.Option(None, "--compare-backend", help="Also run this backend; report task-level parity."),
    compare_precision: str = typer.Option("fp32", "--compare-precision", help="Precision of the --compare-backend run (the reference: fp32)."),
    order_attention: Optional[str] = typer.Option(None, "--order-attention",
                                                  help="Override the model's order-aware attention: bias, mask or off (ablation; torch backends)."),
    max_image_pixels: int = MaxImagePixelsOpt,
):
    """NoC@85/90/95, NoF, mIoU@k and seconds per click with simulated clicks (SegNext protocol)."""
    from ..evaluate.datasets import load_dataset
    from ..evaluate.metrics import summarise, task_parity
    from ..provenance import cpu_flags, machine_info, now_utc, tool_versions
    from ..runtime.predictor import Predictor

    # Every output is checked before the long run, not after it.
    check_outputs(json, save_clicks, plot)
    check_json(json, inputs=[dataset])
    if save_clicks is not None:
        check_output_file(save_clicks, "--save-clicks", inputs=[dataset])
    if plot is not None:
        check_output_file(plot, "--plot", inputs=[dataset], image=True)
    layout, samples = load_dataset(dataset)
    samples = samples[:limit] if limit else samples
    predictor = Predictor.open(model, backend, precision, checkpoint, device, order_attention=order_attention,
                               int8_decoder=int8_decoder)
    note(*predictor.notes)
    backend_name = predictor.backend
    err = console_for(None, stderr=True)
    skipped: list[str] = []
    load_before = os.getloadavg()  # a shared machine's other work shows in the timings (spc_ms)
    results = run_eval(predictor, samples, max_clicks, err, backend_name, max_image_pixels, skipped)
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        note(f"skipped {len(skipped)} object(s) with an empty ground-truth mask: {shown}")
    if not results:
        raise UserError(f"no object in {dataset} has a non-empty ground-truth mask")
    summary = summarise(results, max_clicks)
    report = {"summary": summary, "backend": backend_name, "precision": precision, "model": model,
              "checkpoint": checkpoint, "order_attention": predictor.cfg.decoder.order_attention,
              "dataset": str(dataset), "layout": layout, "objects": len(results), "skipped_empty_gt": len(skipped),
              "machine": {**machine_info(), "cpu_flags": cpu_flags()}, "versions": tool_versions(), "date": now_utc(),
              "command": (ctx.obj or {}).get("command")}
    if precision == "int8":
        report["int8_decoder"] = int8_decoder

    if compare_backend:
        other = Predictor.open(model, compare_backend, compare_precision, checkpoint, device, order_attention=order_attention)
        reference = run_eval(other, samples, max_clicks, err, compare_backend, max_image_pixels)
        parity = task_parity(results, reference, max_clicks)
        noc_here, noc_there = parity.pop("NoC@90")
        # labelled by backend and precision: `--backend ort --precision int8 --compare-backend ort` is one backend
        here, there = f"{backend_name} {precision}", f"{compare_backend} {compare_precision}"
        report["compare"] = {"backend": compare_backend, "precision": compare_precision, **parity,
                             "NoC@90": {here: noc_here, there: noc_there}, "summary": summarise(reference, max_clicks)}

    report["load_average"] = {"before": [round(v, 2) for v in load_before],
                              "after": [round(v, 2) for v in os.getloadavg()]}
    out = console_for(json)
    m = summary["mIoU@k"]
    row = [*(f"{summary[k]:.2f}" for k in ("NoC@85", "NoC@90", "NoC@95")),
           *(str(summary[k]) for k in ("NoF@85", "NoF@90", "NoF@95")),
           f"{m[0]:.4f}", f"{m[min(4, len(m) - 1)]:.4f}", f"{summary['spc_ms']:.1f}"]
    out.print(table(f"{model} on {dataset} ({layout}, {len(results)} objects), {backend_name} {precision}",
                    ["NoC@85", "NoC@90", "NoC@95", "NoF@85", "NoF@90", "NoF@95", "mIoU@1", "mIoU@5", "SPC ms"], [row], left=0))
    if "compare" in report:
        c = report["compare"]
        ref = c["summary"]["mIoU@k"]
        out.print(f"task parity vs {c['backend']} {c['precision']}: {c['identical_click_sequences']}/{c['objects']} identical click "
                  f"sequences, max per-click IoU difference {c['max_iou_difference']:.4f}, NoC@90 {c['NoC@90']}, "
                  f"mIoU@5 {m[min(4, len(m) - 1)]:.4f} vs {ref[min(4, len(ref) - 1)]:.4f}")
    if save_clicks:
        atomic_write_bytes(save_clicks, "".join(jsonlib.dumps(r.to_json()) + "\n" for r in results).encode())
    if plot:
        from ..evaluate.plots import write_curve

        write_curve(plot, summary["mIoU@k"], f"{model} ({backend_name} {precision})")
    if json:
        write_json(report, json)


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="A preset name (PyTorch) or an export folder."),
    backend: Optional[str] = BackendOpt,
    precision: str = PrecisionOpt,
    int8_decoder: str = Int8DecoderOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    device: Optional[str] = DeviceOpt,
    image: Optional[str] = typer.Option(None, "--image", help="Image to time on (default: the bundled demo image)."),
    clicks: int = typer.Option(20, "--clicks", min=1, max=24),
    repeats: int = typer.Option(5, "--repeats", min=1),
    sat: bool = typer.Option(True, "--sat/--no-sat", help="Also time the 16x16 Segment-Anything-Task."),
    sat_chunk: Optional[int] = typer.Option(None, "--sat-chunk", min=1, max=256,
                                            help="Prompt sets per decoder call in batched SAT (default 256 on a GPU; on a CPU the fastest per prompt of 1, 4, 8, 16, 32, measured)."),
    results_dir: Optional[str] = typer.Option(None, "--results-dir",
                                              help="Append the record to DIR/bench.jsonl (default: print only); --report reads it."),
    report: bool = typer.Option(False, "--report", help="Render the performance table and chart from --results-dir."),
    profile: bool = typer.Option(False, "--profile", help="Also profile a click's decoder call by node type with the runtime's own counters (openvino, ort); in the record's `profile`."),
    readme: Optional[str] = typer.Option(None, "--readme", help="With --report: also write the table into this README's report block."),
    json: Optional[str] = JsonOpt,
    max_image_pixels: int = MaxImagePixelsOpt,
):
    """Encoder and per-click decoder latency, seconds per click, and SAT latency (batched, sequential)."""
    from ..evaluate.bench import REPORT_END, REPORT_START, append_result, bench_record, load_results, report_table, run_bench
    from ..runtime.predictor import Predictor
    from ..runtime.preprocess import read_image

    check_json(json, inputs=[image])
    results = check_output_folder(results_dir, "--results-dir") if results_dir is not None else None
    if report and results is not None:
        check_outputs(json, str(results / "report.md"), str(results / "report.png"), readme)
    out = console_for(json)
    if report:
        from ..evaluate.plots import report_chart

        if results is None:
            raise UserError("--report needs --results-dir DIR (the folder holding bench.jsonl)")
        records = load_results(results)
        if not records:
            raise UserError(f"no benchmark results in {results} (run ois-deploy bench MODEL --results-dir {results} first)")
        text = report_table(records)
        report_chart(records, results / "report.png")
        atomic_write_bytes(results / "report.md", (text + "\n").encode())
        updated = bool(readme) and update_readme_or_fail(readme, text, REPORT_START, REPORT_END)
        out.print(text)
        note(f"wrote {results / 'report.md'}, {results / 'report.png'}" + (f", {readme}" if updated else ""))
        return
    if model is None:
        raise UserError("give a MODEL (preset name or export folder), or --report")
    rgb = read_image(image or ASSETS / "demo.png", max_image_pixels)
    predictor = Predictor.open(model, backend, precision, checkpoint, device, profile=profile, int8_decoder=int8_decoder)
    note(*predictor.notes)
    backend_name = predictor.backend
    bar, step, finish = progress_steps(console_for(None, stderr=True))
    with bar:
        result = run_bench(predictor, rgb, clicks, repeats, sat, sat_chunk, progress=step, profile=profile)
        finish()
    record = bench_record(predictor, backend_name, precision, result)
    out.print(report_table([record]))
    if "profile" in record:
        out.print(profile_table(record["profile"]))
    if "sat_batched_speedup" in record:
        chosen = " (measured: the fastest per prompt)" if "sat_chunk_ms_per_prompt" in record else ""
        if record["sat_chunk"] == 1:  # batching did not pay: "batched" ran one prompt set per call too
            out.print(f"SAT: one prompt set per call was the fastest{chosen}; batching does not pay here")
        else:
            out.print(f"SAT batched, {record['sat_chunk']} prompt sets per call{chosen}, is "
                      f"{record['sat_batched_speedup']:.2f}x faster than sequential")
    if results is not None:
        note(f"appended to {append_result(record, results)}")
    if json:
        write_json(record, json)


def profile_table(profile: dict, rows: int = 12):
    title = (f"{profile['runtime']}: decoder call {profile['call_ms']:.1f} ms, nodes {profile['nodes_ms']:.1f} ms "
             f"(mean of {profile['calls']} calls)")
    return table(title, ["node type", "nodes", "ms", "share"],
                 [[r["type"], str(r["nodes"]), f"{r['ms']:.2f}", f"{100 * r['share']:.1f}%"] for r in profile["by_type"][:rows]])


def update_readme_or_fail(readme: str, text: str, start: str, end: str) -> bool:
    from ..evaluate.bench import update_readme

    if not update_readme(Path(readme), text):
        raise UserError(f"{readme} has no report block ({start} ... {end})")
    return True
