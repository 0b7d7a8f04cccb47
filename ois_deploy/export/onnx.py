"""Split ONNX export: an image+depth encoder graph (once per image) and a click decoder graph
(once per click), FP32 and FP16, with the contract of ois_deploy.contract (docs/design.md §3).

Uses the torch.onnx dynamo exporter. Example sizes are >= 2 and distinct (B=2, P=3, N=5):
an example size of 1 can be silently specialised into the graph.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..contract import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    FORMAT,
    MANIFEST,
    ENCODER_OUTPUTS,
    MAX_PROMPTS,
    NORMALISATION,
    PRECISIONS,
    dynamic_axes,
    graph_file,
    state_shapes,
    write_manifest,
)
from ..errors import UserError, first_line
from ..io import check_output_folder, raise_if_interrupted, staged_folder
from ..model import OIS, ImageState
from ..model.attention import set_attention_impl
from ..model.graphs import DecoderGraph, EncoderGraph
from ..model.precision import to_fp16
from ..model.weights import state_dict_hash
from ..provenance import now_utc, sha256_file, tool_versions

assert ImageState._fields == ENCODER_OUTPUTS, "the model's image state and the graph contract disagree"
TWO_GB = 2 * 1024**3


def example_inputs(variant: OIS) -> tuple[tuple, tuple]:
    """(encoder args, decoder args) with B=2, P=3, N=5; the decoder's image state has batch 1.
    Tracing needs shapes and dtypes only, so nothing is encoded here (float16 is slow on CPUs)."""
    cfg = variant.cfg
    s = cfg.input_size
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, s, s, generator=g) * 255
    state = [
        torch.rand(shape, generator=g).to(torch.float32 if name == "depth" else variant.dtype)
        for name, shape in state_shapes(cfg).items()
    ]
    p, n = 3, 5
    coords = torch.rand(p, n, 2, generator=g) * (s - 1)
    labels = torch.tensor([[1, 0, 1, -1, -1]] * p, dtype=torch.int32)
    prev = torch.rand(p, 1, s, s, generator=g)
    return (image,), (*state, coords, labels, prev)


@contextlib.contextmanager
def _quiet_exporter():
    """The torch.onnx exporter warns at length about things that do not concern these graphs."""
    torch_logger = logging.getLogger("torch")
    previous = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(previous)


def _export(module: nn.Module, args: tuple, names_in, names_out, dynamic, opset: int):
    from torch.export import Dim

    dims = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in dynamic["dims"].items()}
    shapes = {k: ({axis: dims[d] for axis, d in v.items()} if v else None) for k, v in dynamic["inputs"].items()}
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=list(names_in),
                output_names=list(names_out),
                dynamic_shapes=shapes,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter's own errors are long; keep the first line
        raise UserError(f"ONNX export failed: {first_line(e)}") from e
    return program.model_proto


def _simplify(proto):
    import onnxslim

    return onnxslim.slim(proto)


def _set_metadata(proto, facts: dict) -> None:
    del proto.metadata_props[:]
    for key, value in facts.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def _save(proto, path: Path) -> None:
    import onnx

    tmp = path.with_name(f".{path.name}.tmp")
    external = proto.ByteSize() > TWO_GB - 64 * 1024**2
    onnx.save_model(
        proto,
        str(tmp),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
    )
    os.replace(tmp, path)


@dataclass
class ExportRequest:
    out_dir: Path
    precisions: tuple[str, ...] = PRECISIONS
    opset: int = 18
    attention: str = "matmul"  # matmul: MatMul-Add-Softmax-MatMul; fused: ONNX Attention (opset 23)

    def __post_init__(self):
        if self.attention not in ("matmul", "fused"):
            raise UserError(f"attention must be matmul or fused, not {self.attention!r}")
        if self.attention == "fused" and self.opset < 23:
            raise UserError("--attention fused needs the ONNX Attention op: use --opset 23 or above")
        if not 17 <= self.opset <= 23:
            raise UserError(f"opset {self.opset} is not supported: use 17 to 23")
        check_output_folder(str(self.out_dir), "export --out", replace=MANIFEST)


def export_model(model: OIS, weights: dict, request: ExportRequest, progress=None, check=None) -> dict:
    """Export the graphs of `model` into request.out_dir and write manifest.json. Returns the manifest.

    weights: how the model's weights came about (path, format, sha256), recorded in the manifest.
    The folder is written whole: staged beside out_dir, checked by `check(staging)` if given
    (lint), then swapped in, replacing an old export only then; a lock refuses a second export
    to the same folder meanwhile (io.staged_folder).
    """
    with staged_folder(request.out_dir) as staging:
        manifest = _write_export(model, weights, request, staging, progress)
        if check is not None:
            check(staging)
    return manifest


def _write_export(model: OIS, weights: dict, request: ExportRequest, out: Path, progress=None) -> dict:
    cfg = model.cfg
    model = copy.deepcopy(model).float().eval()
    set_attention_impl(model, request.attention)  # matmul or fused: the forms named as the option
    model_hash = state_dict_hash(model)
    dynamic = dynamic_axes(cfg)
    graphs = {}
    step = progress or (lambda text: None)
    for precision in (p for p in request.precisions if p != "int8"):  # int8 is made from fp32, below
        variant = model if precision == "fp32" else to_fp16(model)
        enc_args, dec_args = example_inputs(variant)
        for role, module, args, names_in, names_out in (
            ("encoder", EncoderGraph(variant).eval(), enc_args, ENCODER_INPUTS, ENCODER_OUTPUTS),
            ("decoder", DecoderGraph(variant).eval(), dec_args, DECODER_INPUTS, DECODER_OUTPUTS),
        ):
            name = graph_file(role, precision)
            raise_if_interrupted()  # a Ctrl-C swallowed inside the previous graph's export stops here
            step(f"export {name}")
            with torch.no_grad():
                proto = _export(module, args, names_in, names_out, dynamic[role], request.opset)
            step(f"simplify {name}")
            proto = _simplify(proto)
            _set_metadata(
                proto,
                {
                    "ois.role": role,
                    "ois.preset": cfg.name,
                    "ois.input_size": cfg.input_size,
                    "ois.patch_size": cfg.encoder.patch_size,
                    "ois.mask_size": cfg.mask_size,
                    "ois.normalisation": NORMALISATION,
                    "ois.max_clicks": cfg.decoder.max_clicks,
                    "ois.max_prompts": MAX_PROMPTS,
                    "ois.precision": precision,
                    "ois.attention": request.attention,
                    "ois.model_hash": model_hash,
                    "ois.exporter_version": __version__,
                    "ois.opset": request.opset,
                },
            )
            _save(proto, out / name)
            graphs[name] = {"role": role, "precision": precision, "sha256": sha256_file(out / name)}
    manifest = {
        "format": FORMAT,
        "preset": cfg.name,
        "input_size": cfg.input_size,
        "mask_size": cfg.mask_size,
        "opset": request.opset,
        "attention": request.attention,
        "precisions": list(request.precisions),
        "model_hash": model_hash,
        "weights": weights,
        "graphs": graphs,
        "dynamic_axes": {k: list(v) for role in dynamic.values() for k, v in role["dims"].items()},
        "config": cfg.to_dict(),
        "versions": tool_versions(),
        "date": now_utc(),
    }
    if "int8" in request.precisions:  # quantize the fp32 graphs just written (export/quantize.py)
        from .quantize import quantize_export

        manifest["int8"] = quantize_export(model, out, graphs, progress=step)
    write_manifest(out, manifest)
    return manifest
