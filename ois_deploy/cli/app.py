"""The typer app that every command module registers on, and the options they share."""

from __future__ import annotations

import typer

from ..presets import PRESETS

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Deploy OIS interactive segmentation."
)

PresetOpt = typer.Option(None, "--preset", "-p", help=f"One of: {', '.join(PRESETS)}.")
CheckpointOpt = typer.Option(
    None, "--checkpoint", "-c",
    help="Weights: ois-deploy or Depth Anything V2 file, or 'random' (default: the preset's bundled weights, if any).",
)
JsonOpt = typer.Option(None, "--json", help="Write results as JSON to PATH; '-' for stdout.")
BackendOpt = typer.Option(None, "--backend",
                          help="torch, torch-cuda (PyTorch), ort, ort-cuda, ort-trt, trt, aoti or openvino (export folder). "
                               "Default: torch for a preset, ort for an export folder.")
DeviceOpt = typer.Option(None, "--device", help="torch: cpu (default) or cuda; aoti: cpu or cuda (default: cuda where its packages were built and a GPU is seen); ort: auto (default), cpu, cuda or tensorrt.")
PrecisionOpt = typer.Option("fp32", "--precision", help="fp32, fp16, int8 or bf16 (which of them: the backend's; see `backends`).")
Int8DecoderOpt = typer.Option("qdq", "--int8-decoder",
                              help="openvino --precision int8: qdq (the export's QDQ decoder) or nncf (OpenVINO's own, NNCF-quantised at export).")
MaxImagePixelsOpt = typer.Option(100_000_000, "--max-image-pixels", min=1,
                                 help="Refuse images with more pixels than this (read from the file's header before decoding).")


def check_json(path: str | None, inputs=()) -> None:
    """--json PATH is checked before any work; '-' is stdout."""
    from ..io import check_output_file

    if path is not None and path != "-":
        check_output_file(path, "--json", inputs=inputs)
