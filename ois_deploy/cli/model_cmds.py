"""Commands about one model: info, predict, version."""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import typer

from .. import __version__
from ..errors import UserError
from ..io import atomic_write_bytes, check_output_file, check_outputs, encode_image, write_json
from .app import (BackendOpt, CheckpointOpt, DeviceOpt, Int8DecoderOpt, JsonOpt, MaxImagePixelsOpt, PrecisionOpt, PresetOpt, app,
                  check_json)
from .console import console_for, note, table

PAPER_PARAMS = {"ois-b-1024": 107_880_000, "ois-b-2048": 107_880_000}


@app.command()
def info(preset: Optional[str] = PresetOpt, checkpoint: Optional[str] = CheckpointOpt, json: Optional[str] = JsonOpt):
    """Show a model's configuration, parameter split and weights."""
    from ..model import count_parameters
    from ..model.weights import CheckpointMismatch, load_model, print_notes, resolve_checkpoint

    check_json(json)
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
    rows = [[part, f"{n:,}"] for part, n in params.items()]
    if cfg.name in PAPER_PARAMS:
        result["paper_params_total"] = PAPER_PARAMS[cfg.name]
        rows.append(["paper (OIS-B)", f"{PAPER_PARAMS[cfg.name]:,}"])
    out.print(table(f"{cfg.name}: input {cfg.input_size}x{cfg.input_size}, tokens {cfg.grid}x{cfg.grid}, "
                    f"mask {cfg.mask_size}x{cfg.mask_size}", ["part", "parameters"], rows))
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
    backend: Optional[str] = BackendOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Export folder (for the ort and trt backends)."),
    precision: str = PrecisionOpt,
    int8_decoder: str = Int8DecoderOpt,
    device: Optional[str] = DeviceOpt,
    max_image_pixels: int = MaxImagePixelsOpt,
):
    """Segment the object under the clicks; each click sees the mask of the clicks before it."""
    from ..runtime.predictor import Predictor
    from ..runtime.preprocess import read_image

    check_outputs(out, overlay)
    check_output_file(out, "--out", inputs=[image], image=True)
    if overlay is not None:
        check_output_file(overlay, "--overlay", inputs=[image], image=True)
    clicks = [parse_click(c) for c in click]
    rgb = read_image(image, max_image_pixels)
    predictor = Predictor.open(model or preset or "ois-tiny", backend or ("ort" if model else "torch"), precision,
                               checkpoint, device, int8_decoder=int8_decoder)
    note(*predictor.notes)
    if len(clicks) > predictor.max_clicks:
        raise UserError(f"at most {predictor.max_clicks} clicks per object, got {len(clicks)}")
    predictor.set_image(rgb)
    for x, y, _ in clicks:  # check all before running any
        predictor.frame.check_click(x, y)
    for x, y, positive in clicks:
        result = predictor.click(x, y, positive, with_logits=False)
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
