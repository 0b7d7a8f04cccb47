"""Checkpoints: building a model from a preset and/or a weights file, and saving ours.

Formats, detected from the content (never from the file name):
- "ois-safetensors": our default. safetensors with the config JSON in its metadata.
- "ois-torch": a torch file {"state_dict": ..., "config": ...}, loaded with weights_only=True.
- "dav2-vits" / "dav2-vitb" / "dav2-vitl": an official Depth Anything V2 state_dict (torch or
  safetensors). It fills encoder and depth head strictly; the decoder keeps its init.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..io import temp_file_beside, usual_permissions
from ..presets import DEFAULT_PRESET_FOR_VARIANT, OISConfig, get_preset
from .ois import OIS

FORMAT_TAG = "ois-deploy/1"
RANDOM_SEED = 0
RANDOM_WEIGHTS = "random"  # the checkpoint value that asks for random init even where defaults exist
# Weights shipped in the package, used when no checkpoint is given (how they were made: docs/model-card-ois-tiny.md).
BUNDLED_CHECKPOINTS = {"ois-tiny": Path(__file__).parents[1] / "assets" / "ois-tiny.safetensors"}
DAV2_PREFIXES = ("pretrained.", "depth_head.")
DAV2_EMBED_DIMS = {384: "vits", 768: "vitb", 1024: "vitl"}
DAV2_LICENCES = {
    "vits": "Apache-2.0",
    "vitb": "CC-BY-NC-4.0 (non-commercial use only)",
    "vitl": "CC-BY-NC-4.0 (non-commercial use only)",
}


@dataclass
class WeightsReport:
    path: str | None
    format: str  # random | ois-safetensors | ois-torch | dav2-vits | dav2-vitb | dav2-vitl
    loaded_keys: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    decoder: str = "loaded"  # or how the decoder was initialised when the file lacks it
    licence: str | None = None
    bundled: bool = False  # the preset's default weights, shipped in the package

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    def to_dict(self) -> dict:
        return asdict(self)

    def mismatch_summary(self) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", self.wrong_shape)):
            if keys:
                shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
                parts.append(f"{len(keys)} {label} ({shown})")
        return "; ".join(parts)


class CheckpointMismatch(UserError):
    def __init__(self, report: WeightsReport):
        super().__init__(f"checkpoint {report.path} does not fit the model: {report.mismatch_summary()}")
        self.report = report


@dataclass
class LoadedFile:
    format: str
    state_dict: dict[str, torch.Tensor]
    config: OISConfig | None = None
    variant: str | None = None  # Depth Anything V2 family of a dav2 file
    training: dict | None = None  # how `train` made an ois-safetensors file (save_checkpoint)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"


def _dav2_variant(state_dict: dict) -> str | None:
    if not state_dict or not all(k.startswith(DAV2_PREFIXES) for k in state_dict):
        return None
    cls = state_dict.get("pretrained.cls_token")
    return DAV2_EMBED_DIMS.get(int(cls.shape[-1])) if cls is not None else None


def check_values(state: dict, path) -> None:
    """Every tensor floating point and finite: int, bool or NaN weights would load into the float
    parameters and give empty or full masks without a word. The error names the first bad ones."""
    def listed(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    not_float = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise UserError(f"checkpoint {path} has tensors that are not floating point: {listed(not_float)}")
    nonfinite = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise UserError(f"checkpoint {path} has NaN or infinite values in: {listed(nonfinite)}")


def read_checkpoint(path: str | os.PathLike) -> LoadedFile:
    """Read a weights file safely and tell its format from the content; its config and its
    values are checked (schema, floating point, finite)."""
    loaded = _read_checkpoint(Path(path))
    check_values(loaded.state_dict, path)
    return loaded


def _read_checkpoint(path: Path) -> LoadedFile:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if _is_safetensors(path):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            config = meta.get("ois_config")
            if meta.get("format") == FORMAT_TAG and config:
                training = json.loads(meta["training"]) if "training" in meta else None
                return LoadedFile("ois-safetensors", state, OISConfig.from_dict(json.loads(config)), training=training)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and isinstance(obj.get("config"), dict):
                if not all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values()):
                    raise UserError(f"checkpoint {path} is not a state_dict of tensors")
                return LoadedFile("ois-torch", obj["state_dict"], OISConfig.from_dict(obj["config"]))
            state = obj if isinstance(obj, dict) else {}
    except UserError:
        raise
    except Exception as e:  # corrupt or foreign file: the libraries' messages vary
        raise UserError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} is not a state_dict of tensors")
    variant = _dav2_variant(state)
    if variant is None:
        raise UserError(
            f"checkpoint {path} is neither an ois-deploy checkpoint nor an official Depth Anything V2 state_dict"
        )
    return LoadedFile(f"dav2-{variant}", state, variant=variant)


def compare_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], report: WeightsReport) -> None:
    report.missing = sorted(expected.keys() - given.keys())
    report.unexpected = sorted(given.keys() - expected.keys())
    report.wrong_shape = sorted(
        f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected.keys() & given.keys()
        if tuple(given[k].shape) != tuple(expected[k].shape)
    )
    report.loaded_keys = len(expected.keys() & given.keys()) - len(report.wrong_shape)


def _new_model(cfg: OISConfig, device: str | torch.device) -> OIS:
    """Random init with a fixed seed, so that an unweighted model is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        with torch.device(device):
            return OIS(cfg)


def _resolve_config(preset: str | None, loaded: LoadedFile | None) -> OISConfig:
    if loaded is not None and loaded.config is not None:
        if preset is not None and preset != loaded.config.name:
            raise UserError(f"checkpoint was saved for preset {loaded.config.name!r}, not {preset!r}")
        return loaded.config
    if loaded is not None and loaded.variant is not None:
        cfg = get_preset(preset or DEFAULT_PRESET_FOR_VARIANT[loaded.variant])
        if cfg.encoder.variant != loaded.variant:
            raise UserError(
                f"checkpoint holds Depth Anything V2 {loaded.variant} weights but preset {cfg.name!r} uses "
                f"{cfg.encoder.variant}; use preset {DEFAULT_PRESET_FOR_VARIANT[loaded.variant]!r}"
            )
        return cfg
    return get_preset(preset or "ois-tiny")


def resolve_checkpoint(preset: str | None, checkpoint: str | os.PathLike | None) -> Path | None:
    """The file to load: the one given; else the preset's bundled weights if it has some;
    None for random init (no file, or checkpoint "random")."""
    if checkpoint is not None:
        return None if str(checkpoint) == RANDOM_WEIGHTS else Path(checkpoint)
    bundled = BUNDLED_CHECKPOINTS.get(preset or "ois-tiny")
    return bundled if bundled is not None and bundled.is_file() else None


def load_model(
    preset: str | None = None, checkpoint: str | os.PathLike | None = None, device: str = "cpu"
) -> tuple[OIS, WeightsReport]:
    """Build a model (eval mode) from a preset and/or checkpoint; without a checkpoint, the
    preset's bundled weights (ois-tiny) or random init; checkpoint "random" forces random init.
    Raises UserError on bad input, CheckpointMismatch (with the report) when keys or shapes do
    not fit."""
    path = resolve_checkpoint(preset, checkpoint)
    bundled = checkpoint is None and path is not None
    loaded = read_checkpoint(path) if path is not None else None
    cfg = _resolve_config(preset, loaded)
    meta = "meta" if str(device) == "meta" else "cpu"
    model = _new_model(cfg, meta)
    if loaded is None:
        report = WeightsReport(None, "random", decoder=f"random init (seed {RANDOM_SEED})")
    else:
        report = WeightsReport(str(path), loaded.format, bundled=bundled)
        expected = model.state_dict()
        if loaded.variant is not None:  # DAv2 fills encoder + depth head only
            expected = {k: v for k, v in expected.items() if k.startswith(DAV2_PREFIXES)}
            report.decoder = f"random init (seed {RANDOM_SEED}), mask head copied from the depth head"
            report.licence = DAV2_LICENCES[loaded.variant]
        compare_keys(expected, loaded.state_dict, report)
        if not report.ok:
            raise CheckpointMismatch(report)
        model.load_state_dict(loaded.state_dict, strict=loaded.variant is None)
        if loaded.variant is not None:
            model.init_mask_head_from_depth_head()
    model.pretrained.refresh_pos_embed()  # float32 resize of the loaded 37x37 grid, once
    return model.to(device).eval(), report


def save_checkpoint(model: OIS, path: str | os.PathLike, training: dict | None = None) -> None:
    """Our default format: safetensors with the config (and how it was trained, if given) in
    the metadata. Written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_TAG, "ois_config": json.dumps(model.cfg.to_dict())}
    if training is not None:
        meta["training"] = json.dumps(training)
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        usual_permissions(tmp)  # safetensors writes its file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_provenance(report: WeightsReport) -> dict:
    """How a model's weights came about, as an export manifest records it."""
    from ..provenance import sha256_file

    return {
        "format": report.format,
        "path": report.path,
        "bundled": report.bundled,
        "seed": RANDOM_SEED if report.format == "random" else None,
        "sha256": sha256_file(report.path) if report.path else None,
    }


def describe_weights(report: WeightsReport) -> list[str]:
    """Human notes printed by every command: random weights and non-commercial licences."""
    notes = []
    if report.format == "random":
        notes.append(f"weights: none given, random init (seed {RANDOM_SEED}): outputs are meaningless")
    else:
        kind = "bundled default, " if report.bundled else ""
        notes.append(f"weights: {report.path} ({kind}{report.format}, {report.loaded_keys} keys)")
    if report.licence:
        notes.append(f"note: these Depth Anything V2 weights are licensed {report.licence}")
    if report.format.startswith("dav2-"):
        notes.append(f"warning: the checkpoint has no OIS decoder; decoder is {report.decoder}")
    return notes


def print_notes(report: WeightsReport) -> None:
    for line in describe_weights(report):
        print(line, file=sys.stderr)


def state_dict_hash(model: OIS) -> str:
    """Identity of the weights a graph was exported from (float32 bytes, sorted keys)."""
    import hashlib

    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def reference_model(manifest: dict, checkpoint: str | None = None) -> OIS:
    """The PyTorch FP32 model an export folder's graphs were made from; refuses one that is not."""
    weights = manifest.get("weights", {})
    if checkpoint:  # the weights given are checked, whatever the manifest says they were
        if str(checkpoint) != RANDOM_WEIGHTS and not Path(checkpoint).is_file():
            raise UserError(f"checkpoint not found: {checkpoint}")
        model, _ = load_model(manifest["preset"] if str(checkpoint) == RANDOM_WEIGHTS else None, checkpoint)
        if state_dict_hash(model) != manifest["model_hash"]:
            raise UserError(f"checkpoint {checkpoint}: its weights differ from those the export was made from "
                            f"(model hash {state_dict_hash(model)}, the export's {manifest['model_hash']})")
        return model
    if weights.get("format") == "random":
        model, _ = load_model(manifest["preset"], RANDOM_WEIGHTS)
    elif weights.get("bundled"):  # this install's copy; the hash below checks it
        model, _ = load_model(manifest["preset"])
    else:
        path = weights.get("path")
        if not path or not Path(path).is_file():
            raise UserError(f"the reference checkpoint {path} is not here: pass --checkpoint")
        model, _ = load_model(None, path)
    if state_dict_hash(model) != manifest["model_hash"]:
        raise UserError("the reference model's weights differ from those the graphs were exported from")
    return model
