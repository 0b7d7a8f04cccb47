"""The graph contract shared by the exporter and every runtime (docs/design.md §3), without torch.

An export folder holds an encoder graph (once per image) and a click decoder graph (once per
click) per precision, and manifest.json recording the preset's config, the weights' identity and
a SHA-256 per file. Runtimes read the folder through this module only: names, shapes, dynamic
axes and file names are defined here once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UserError
from .io import atomic_write_bytes
from .presets import OISConfig
from .provenance import sha256_file
from .schema import Field, SchemaError, check

MANIFEST = "manifest.json"
FORMAT = "ois-deploy-export/1"
ENCODER_INPUTS = ("image",)
# The image state: encoder outputs, and the decoder's first inputs (model.ImageState's fields).
ENCODER_OUTPUTS = ("image_embed", "pyramid_l1", "pyramid_l2", "pyramid_l3", "depth")
CLICK_INPUTS = ("point_coords", "point_labels", "prev_mask")
DECODER_INPUTS = ENCODER_OUTPUTS + CLICK_INPUTS
DECODER_OUTPUTS = ("mask_logits",)
PRECISIONS = ("fp32", "fp16")
MAX_BATCH = 16
MAX_PROMPTS = 256  # a 16x16 Segment-Anything-Task grid in one decoder call
NORMALISATION = "RGB 0..255 in; ImageNet mean/std applied inside the encoder"


# OpenVINO's own INT8 decoder (NNCF post-training quantization of decoder.onnx, made by `export
# --precision int8` where nncf is installed): an OpenVINO IR, recorded under manifest["int8"]
# ["openvino"]["files"] with a SHA-256 per file, not in "graphs" (which holds ONNX graphs only).
# Same inputs and outputs as decoder.onnx.
OPENVINO_INT8_DECODER = ("decoder.openvino-int8.xml", "decoder.openvino-int8.bin")


def graph_file(role: str, precision: str) -> str:
    return f"{role}.onnx" if precision == "fp32" else f"{role}.{precision}.onnx"


def state_shapes(cfg: OISConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one image's encoder outputs (batch 1), the decoder's image-state inputs."""
    g, s = cfg.grid, cfg.input_size
    f = cfg.depth_head.features
    return {
        "image_embed": (1, cfg.decoder.width, g, g),
        "pyramid_l1": (1, f, 4 * g, 4 * g),
        "pyramid_l2": (1, f, 2 * g, 2 * g),
        "pyramid_l3": (1, f, g, g),
        "depth": (1, 1, s, s),
    }


def dynamic_axes(cfg: OISConfig) -> dict:
    """Per graph: the named dynamic dimensions with their (min, max), and which input axes use them."""
    return {
        "encoder": {"dims": {"B": (1, MAX_BATCH)}, "inputs": {"image": {0: "B"}}},
        "decoder": {
            "dims": {"P": (1, MAX_PROMPTS), "N": (1, cfg.decoder.max_clicks)},
            "inputs": {
                **{name: None for name in ENCODER_OUTPUTS},
                "point_coords": {0: "P", 1: "N"},
                "point_labels": {0: "P", 1: "N"},
                "prev_mask": {0: "P"},
            },
        },
    }


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(out_dir) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / MANIFEST
    if not Path(out_dir).is_dir():
        raise UserError(f"export folder not found: {out_dir}")
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {out_dir}: not an ois-deploy export folder")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not an ois-deploy export manifest")
    validate_manifest(manifest, path)
    return manifest


# What every runtime and tool reads from manifest.json; other keys (engines, versions, ...) may
# be present. The config is checked by its own schema (presets.CONFIG_SCHEMA).
MANIFEST_SCHEMA = {
    "format": Field(str, choices=(FORMAT,)),
    "preset": Field(str),
    "input_size": Field(int, min=1),
    "mask_size": Field(int, min=1),
    "opset": Field(int, min=1),
    "attention": Field(str, choices=("matmul", "fused")),
    "precisions": Field(list),
    "model_hash": Field(str),
    "weights": Field(dict),
    "graphs": Field(dict),
    "config": Field(dict),
}
GRAPH_SCHEMA = {"role": Field(str, choices=("encoder", "decoder")), "precision": Field(str), "sha256": Field(str)}


def validate_manifest(manifest: dict, path) -> None:
    """Required keys, types, the config's own schema, and agreement between them; errors name
    the field."""
    def fail(message: str):
        raise UserError(f"invalid manifest {path}: {message}")

    try:
        check(manifest, MANIFEST_SCHEMA, unknown=True)
        for name, entry in manifest["graphs"].items():
            check(entry, GRAPH_SCHEMA, where=f"graphs.{name}", unknown=True)
    except SchemaError as e:
        fail(str(e))
    precisions = manifest["precisions"]
    if not precisions or not all(isinstance(p, str) for p in precisions):
        fail("precisions: expected a non-empty list of names")
    cfg = OISConfig.from_dict(manifest["config"], source=f"manifest {path}")
    for key, value in (("preset", cfg.name), ("input_size", cfg.input_size), ("mask_size", cfg.mask_size)):
        if manifest[key] != value:
            fail(f"{key}: {manifest[key]!r} but config says {value!r}")
    for precision in precisions:
        for role in ("encoder", "decoder"):
            entry = manifest["graphs"].get(graph_file(role, precision))
            if entry is None or (entry["role"], entry["precision"]) != (role, precision):
                fail(f"graphs: no {role} graph {graph_file(role, precision)} for precision {precision}")


def is_export_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def manifest_config(manifest: dict) -> OISConfig:
    return OISConfig.from_dict(manifest["config"], source="manifest")


def check_graph(path: Path, manifest: dict) -> None:
    """Refuse a graph that is not the one the manifest recorded (edited, swapped, corrupted)."""
    if not path.is_file():
        raise UserError(f"graph missing: {path}")
    recorded = manifest["graphs"].get(path.name, {}).get("sha256")
    if recorded is None:
        raise UserError(f"{path.name} is not listed in {path.parent}/{MANIFEST}")
    if sha256_file(path) != recorded:
        raise UserError(f"{path} does not match its manifest (hash differs): re-export the folder")


def metadata_problems(path: Path, meta: dict, manifest: dict, role: str, precision: str) -> list[str]:
    """Where a graph's own metadata (metadata_props) disagrees with the manifest: role,
    precision, preset, weights, and the sizes of the manifest's config."""
    cfg = manifest_config(manifest)
    expected = {"ois.role": role, "ois.precision": precision, "ois.preset": manifest["preset"],
                "ois.model_hash": manifest["model_hash"], "ois.input_size": str(cfg.input_size),
                "ois.patch_size": str(cfg.encoder.patch_size), "ois.mask_size": str(cfg.mask_size),
                "ois.max_clicks": str(cfg.decoder.max_clicks)}
    return [f"{path.name} has {key}={meta.get(key)!r} but the manifest says {want!r}"
            for key, want in expected.items() if meta.get(key) != want]


def check_metadata(path: Path, meta: dict, manifest: dict, role: str, precision: str) -> None:
    """A graph must say it is this role and precision of this preset, these weights and sizes."""
    problems = metadata_problems(path, meta, manifest, role, precision)
    if problems:
        raise UserError(f"{problems[0]}: mixed exports or an edited manifest")


def weights_notes(manifest: dict) -> list[str]:
    w = manifest.get("weights", {})
    if w.get("format") == "random":
        return [f"weights: graphs exported from random init (seed {w.get('seed', 0)}): outputs are meaningless"]
    return [f"weights: graphs exported from {w.get('path')} ({w.get('format')})"]
