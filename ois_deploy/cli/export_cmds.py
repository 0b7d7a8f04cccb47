"""Commands from a model to checked graphs and engines: export, lint, build, verify."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import UserError
from ..io import write_json
from .app import CheckpointOpt, Int8DecoderOpt, JsonOpt, MaxImagePixelsOpt, PresetOpt, app, check_json
from .console import console_for, progress_steps, table


PRECISION_NAMES = ("fp32", "fp16", "int8")
RUNTIME_PRECISIONS = (*PRECISION_NAMES, "bf16")  # bf16: a runtime setting on the fp32 graphs (openvino)


def parse_precisions(text: str, export: bool = False) -> tuple[str, ...]:
    """fp32, fp16, int8, both (fp32 and fp16), all, or a comma list such as fp32,int8 (outside
    an export also bf16). For an export, int8 brings fp32: the int8 graphs are quantized from
    the fp32 ones."""
    allowed = PRECISION_NAMES if export else RUNTIME_PRECISIONS
    names = {"both": ["fp32", "fp16"], "all": list(PRECISION_NAMES)}.get(text) or [p.strip() for p in text.split(",")]
    if not all(p in allowed for p in names):
        raise UserError(f"precision must be {', '.join(allowed)}, both, all or a comma list of them, not {text!r}"
                        + (" (bf16 runs the fp32 graphs: export fp32)" if "bf16" in names else ""))
    if export and "int8" in names:
        names.append("fp32")
    return tuple(p for p in RUNTIME_PRECISIONS if p in names)


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
    precision: str = typer.Option("both", "--precision", help="fp32, fp16, int8 (with fp32), both (fp32+fp16), all, or a list: fp32,int8."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default 18; 23 with --attention fused)."),
    attention: str = typer.Option("matmul", "--attention", help="matmul (MatMul-Add-Softmax-MatMul) or fused (ONNX Attention)."),
):
    """Export the encoder and decoder graphs (FP32 and/or FP16), then lint them."""
    from ..export.lint import lint_export
    from ..export.onnx import ExportRequest, export_model
    from ..model.weights import load_model, print_notes, weights_provenance

    from ..contract import MANIFEST
    from ..io import check_output_folder, folder_lock

    target = check_output_folder(out, "--out", replace=MANIFEST)  # before any work; "" is refused
    request = ExportRequest(target, parse_precisions(precision, export=True), opset or (23 if attention == "fused" else 18), attention)
    precisions = request.precisions
    console = console_for(None, stderr=True)
    reports = []

    def lint_staged(staging: Path) -> None:  # a folder that fails lint does not replace the old one
        step("lint")
        reports.extend(lint_export(staging, precisions))
        if not print_lint(console, reports):
            raise UserError(f"exported graphs for {out} failed lint (listed above); {out} is unchanged")

    with folder_lock(target):  # a second export to the same folder is refused now, not after loading
        model, report = load_model(preset, checkpoint)
        print_notes(report)
        weights = weights_provenance(report)
        bar, step, finish = progress_steps(console)
        with bar:
            manifest = export_model(model, weights, request, progress=step, check=lint_staged)
            finish()
    console.print(f"exported {', '.join(manifest['graphs'])} and manifest.json to {out}")


@app.command()
def build(
    folder: str = typer.Argument(..., help="Export folder (ois-deploy export --out DIR)."),
    engine: str = typer.Option("trt", "--engine", help="trt (TensorRT engines) or aoti (AOTInductor packages)."),
    device: Optional[str] = typer.Option(None, "--device", help="aoti: cpu or cuda (default: cuda if a GPU is seen); trt: cuda."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp16 or fp32 (default: fp16; fp32 for aoti on a CPU)."),
    max_clicks: Optional[int] = typer.Option(None, "--max-clicks", help="Interactive profile: N up to this (default: the preset's)."),
    max_prompts: int = typer.Option(256, "--max-prompts", help="SAT profile: P up to this."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", help="aoti: the export's weights, where they are not found."),
    timing_cache: Optional[str] = typer.Option(None, "--timing-cache", help="trt: timing cache file, reused and updated."),
    workspace: Optional[float] = typer.Option(None, "--workspace", help="trt: builder workspace limit, GiB."),
    opt_level: Optional[int] = typer.Option(None, "--opt-level", help="trt: builder optimisation level 0-5."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build even if the recorded engines or packages fit this machine."),
):
    """Build TensorRT engines (strongly typed) or AOTInductor packages from an export; record them in the manifest."""
    if engine not in ("trt", "aoti"):
        raise UserError(f"--engine must be trt or aoti, not {engine!r}")
    if device is None:
        device = "cuda"
        if engine == "aoti":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = precision or ("fp32" if device == "cpu" else "fp16")
    if precision not in ("fp16", "fp32"):
        raise UserError(f"precision must be fp16 or fp32, not {precision!r}")
    console = console_for(None, stderr=True)
    bar, step, finish = progress_steps(console)
    if engine == "aoti":
        from ..export.aoti import build_packages

        trt_only = {"--timing-cache": timing_cache, "--workspace": workspace, "--opt-level": opt_level}
        given = [name for name, value in trt_only.items() if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} apply to --engine trt only")
        with bar:
            manifest = build_packages(folder, device, precision, max_clicks, max_prompts, checkpoint, rebuild, progress=step)
            finish()
        p = manifest["aoti"][f"{device}-{precision}"]
        console.print(f"AOTInductor packages in {folder}/aoti/{device}-{precision}: {', '.join(p['files'])} "
                      f"({precision}, torch {p['torch']}, {p.get('gpu') or p.get('cpu')})")
        return
    from ..export.tensorrt import build_engines

    if device != "cuda":
        raise UserError("TensorRT engines are built for a CUDA GPU: --device cuda (or --engine aoti for a CPU)")
    if checkpoint is not None:
        raise UserError("--checkpoint applies to --engine aoti only (engines are built from the exported graphs)")
    with bar:
        manifest = build_engines(folder, precision, max_clicks, max_prompts, timing_cache, workspace, opt_level, rebuild,
                                 progress=step)
        finish()
    e = manifest["engines"]
    console.print(f"engines in {folder}: {', '.join(e['files'])} ({e['precision']}, TensorRT {e['tensorrt']}, {e['gpu']})")


@app.command()
def lint(folder: str = typer.Argument(..., help="Export folder.")):
    """Check exported graphs: onnx checker, TensorRT-parsable ops, forbidden patterns, FP32 islands, dynamic axes."""
    from ..export.lint import lint_export

    console = console_for(None)
    if not print_lint(console, lint_export(folder)):
        raise UserError(f"graphs in {folder} failed lint (listed above)")


@app.command()
def verify(
    folder: str = typer.Argument(..., help="Export folder."),
    backend: str = typer.Option("ort", "--backend", help="Backend to check against PyTorch FP32."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16, int8, bf16 (openvino), both, all or a list (default: what was exported and the backend runs)."),
    int8_decoder: str = Int8DecoderOpt,
    images: Optional[str] = typer.Option(None, "--images", help="Folder of real images (default: bundled ones)."),
    checkpoint: Optional[str] = CheckpointOpt,
    rel_l2_fp32: Optional[float] = typer.Option(None, "--rel-l2-fp32", help="Tolerance override."),
    rel_l2_fp16: Optional[float] = typer.Option(None, "--rel-l2-fp16", help="Tolerance override."),
    iou_mean: Optional[float] = typer.Option(None, "--iou-mean", help="Minimum mean mask IoU override."),
    json: Optional[str] = JsonOpt,
    max_image_pixels: int = MaxImagePixelsOpt,
):
    """Compare a backend with the PyTorch FP32 model; exit 1 above tolerance."""
    from ..verify import verify as run_verify

    check_json(json, inputs=[folder])

    tolerances: dict = {"fp32": {}, "fp16": {}, "int8": {}, "bf16": {}}
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
                            tolerances, progress=step, max_image_pixels=max_image_pixels, int8_decoder=int8_decoder)
        finish()
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows = [[r["precision"], r["output"], fmt(r["max_abs"], ".2e"), fmt(r["rel_l2"], ".2e"), str(r["nonfinite"]),
             fmt(r["mask_iou_mean"], ".4f"), fmt(r["mask_iou_min"], ".4f")] for r in result["results"]]
    console.print(table(f"parity: {result['backend']} ({', '.join(result['providers'])}) vs PyTorch FP32, {result['preset']}",
                        ["precision", "output", "max abs", "rel L2", "non-finite", "IoU mean", "IoU min"], rows, left=2))
    console.print("PASSED" if result["passed"] else "FAILED: " + "; ".join(result["failures"]))
    if json:
        write_json(result, json)
    if not result["passed"]:
        raise typer.Exit(1)
