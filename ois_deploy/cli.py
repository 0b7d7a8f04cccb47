"""The `ois-deploy` command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserError
from .io import atomic_write_bytes, encode_image, write_json
from .model import count_parameters
from .model.presets import PRESETS
from .weights import CheckpointMismatch, load_model, print_notes

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Deploy OIS interactive segmentation."
)

PAPER_PARAMS = {"ois-b-1024": 107_880_000, "ois-b-2048": 107_880_000}

PresetOpt = typer.Option(None, "--preset", "-p", help=f"One of: {', '.join(PRESETS)}.")
CheckpointOpt = typer.Option(None, "--checkpoint", "-c", help="Weights: ois-deploy or Depth Anything V2 file.")
JsonOpt = typer.Option(None, "--json", help="Write results as JSON to PATH; '-' for stdout.")


def console_for(json_path: Optional[str]) -> Console:
    """Human output goes to stderr when JSON goes to stdout."""
    return Console(stderr=json_path == "-", highlight=False)


@app.command()
def info(preset: Optional[str] = PresetOpt, checkpoint: Optional[str] = CheckpointOpt, json: Optional[str] = JsonOpt):
    """Show a model's configuration, parameter split and weights."""
    out = console_for(json)
    try:
        # Without weights, the meta device gives shapes and counts without allocating memory.
        model, report = load_model(preset, checkpoint, device="cpu" if checkpoint else "meta")
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
    backend: str = typer.Option("torch", "--backend", help="Inference backend."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
):
    """Segment the object under the clicks; each click sees the mask of the clicks before it."""
    from .predictor import Predictor
    from .preprocess import read_image

    clicks = [parse_click(c) for c in click]
    rgb = read_image(image)
    predictor = Predictor(preset, checkpoint, backend=backend, device=device)
    print_notes(predictor.weights)
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


@app.command()
def version():
    """Print the ois-deploy version."""
    print(__version__)


def main(argv: Optional[list[str]] = None) -> None:
    try:
        code = app(args=argv, standalone_mode=False, prog_name="ois-deploy")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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
