"""AOTInductor backend (aoti): the encoder and decoder packages `ois-deploy build --engine aoti`
compiled into the export folder, run through TorchRunner, so the per-click CUDA graphs (one per
click count) and everything else TorchRunner does apply unchanged.

A package is native code for one device, one torch build and one set of weights: its manifest
entry is checked before it is loaded, and a mismatch is refused with one line, as TensorRT engines
are. A package that fits but cannot be loaded here falls back to torch.compile of the reference
model, with a note.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..contract import manifest_config, read_manifest
from ..errors import UserError, first_line
from ..model import ImageState
from ..model.graphs import DecoderGraph, EncoderGraph, reference_for
from ..provenance import cpu_features, sha256_file
from .torch_backend import TorchRunner

PACKAGE_FILES = {"encoder": "encoder.pt2", "decoder": "decoder.pt2"}
PACKAGES_DIR = "aoti"  # in the export folder: aoti/<device>-<precision>/{encoder,decoder}.pt2
# CPU ISA extensions a package compiled with -march=native (inductor's default) may use.
ISA_FLAG = re.compile(r"^(sse|ssse|avx|fma|f16c|bmi|adx|amx|vaes|vpclmul|gfni|sha_ni|popcnt|movbe|asimd|sve|fp16|bf16|i8mm)")


def package_key(device: str, precision: str) -> str:
    return f"{device}-{precision}"


def package_dir(export_dir: Path, device: str, precision: str) -> Path:
    return Path(export_dir) / PACKAGES_DIR / package_key(device, precision)


def cpu_isa_flags() -> list[str]:
    """The CPU's instruction-set extensions a package may have been compiled for."""
    return sorted(f for f in cpu_features() if ISA_FLAG.match(f))


def runtime_facts(device: str) -> dict:
    """What a package is tied to on this machine: torch, and the GPU or the CPU's ISA."""
    facts = {"device": device, "torch": torch.__version__}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device cuda requested but PyTorch sees no CUDA GPU")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        facts.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        from ..provenance import cpu_name

        facts.update(cpu=cpu_name(), cpu_flags=cpu_isa_flags())
    return facts


def package_mismatches(entry: dict, facts: dict, model_hash: str) -> list[str]:
    """Why recorded packages cannot run here; empty if they can."""
    keys = ("device", "torch") + (("gpu", "compute_capability", "cuda") if facts["device"] == "cuda" else ())
    problems = [f"{key} is {facts.get(key)!r} here but the packages were built for {entry.get(key)!r}"
                for key in keys if entry.get(key) != facts.get(key)]
    if facts["device"] == "cpu":
        missing = sorted(set(entry.get("cpu_flags", [])) - set(facts["cpu_flags"]))
        if missing:
            problems.append(f"this CPU lacks {', '.join(missing)}, which the packages were compiled for")
    if entry.get("model_hash") != model_hash:
        problems.append(f"the packages hold weights {entry.get('model_hash')!r}, the export {model_hash!r}")
    return problems


def check_packages(manifest: dict, export_dir: Path, device: str, precision: str) -> dict:
    """The manifest entry of the packages for device and precision, if they fit here and their
    files are the ones recorded; else UserError."""
    rebuild = f"ois-deploy build {export_dir} --engine aoti --device {device} --precision {precision}"
    entry = manifest.get("aoti", {}).get(package_key(device, precision))
    if not entry:
        raise UserError(f"no {precision} AOTInductor packages for {device} in {export_dir}: run {rebuild}")
    problems = package_mismatches(entry, runtime_facts(device), manifest["model_hash"])
    if problems:
        raise UserError(f"AOTInductor packages in {export_dir} do not fit: {problems[0]}; run {rebuild} --rebuild")
    folder = package_dir(export_dir, device, precision)
    for name in PACKAGE_FILES.values():
        path = folder / name
        if not path.is_file() or sha256_file(path) != entry["files"].get(name):
            raise UserError(f"{path} is missing or does not match the manifest; run {rebuild} --rebuild")
    return entry


class AotiModel:
    """The surface TorchRunner uses of the reference model (encode, decode, cfg, dtype, to,
    eval) over two callables: the loaded packages, or torch.compile'd graphs as the fallback."""

    def __init__(self, cfg, dtype: torch.dtype, encoder, decoder, device: str):
        self.cfg, self.dtype = cfg, dtype
        self.encoder, self.decoder = encoder, decoder
        self.device = torch.device(device)

    # A package reads its inputs' memory as laid out at export (contiguous) without checking
    # strides, and the encoder package returns channels-last tensors: made contiguous here.
    def encode(self, image: torch.Tensor) -> ImageState:
        return ImageState(*(t.contiguous() for t in self.encoder(image.float().contiguous())))

    def decode(self, state: ImageState, point_coords, point_labels, prev_mask) -> torch.Tensor:
        clicks = (point_coords.float(), point_labels.int(), prev_mask.float())
        return self.decoder(*(t.contiguous() for t in (*state, *clicks)))

    def to(self, device) -> "AotiModel":
        if torch.device(device).type != self.device.type:  # compiled for one device
            raise UserError(f"AOTInductor packages for {self.device.type} cannot run on {device}")
        return self

    def eval(self) -> "AotiModel":
        return self


def load_package(path: Path, device: str):
    from torch._inductor import aoti_load_package

    index = torch.cuda.current_device() if device == "cuda" else -1
    return aoti_load_package(str(path), device_index=index)


def compiled_reference(manifest: dict, precision: str, device: str, checkpoint: str | None) -> AotiModel:
    """The fallback: the export's reference model through torch.compile, compiled on first use."""
    model = reference_for(manifest, precision, checkpoint).to(device)
    return AotiModel(model.cfg, model.dtype, torch.compile(EncoderGraph(model)),
                     torch.compile(DecoderGraph(model), dynamic=True), device)


def default_device(manifest: dict, precision: str) -> str:
    """cuda where a GPU is visible and CUDA packages of this precision were built, else cpu."""
    built = manifest.get("aoti", {})
    return "cuda" if torch.cuda.is_available() and package_key("cuda", precision) in built else "cpu"


def open_runner(spec) -> TorchRunner:
    export_dir = spec.export_dir
    manifest = read_manifest(export_dir)
    device = spec.device or default_device(manifest, spec.precision)
    if device not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda for the aoti backend, not {device!r}")
    entry = check_packages(manifest, export_dir, device, spec.precision)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    folder = package_dir(export_dir, device, spec.precision)
    try:
        encoder, decoder = (load_package(folder / PACKAGE_FILES[role], device) for role in ("encoder", "decoder"))
        dtype = torch.float16 if spec.precision == "fp16" else torch.float32
        model = AotiModel(manifest_config(manifest), dtype, encoder, decoder, device)
        notes = [f"packages: {spec.precision} AOTInductor, torch {entry['torch']}, {entry.get('gpu') or entry.get('cpu')}"]
    except Exception as e:  # noqa: BLE001 - any load failure: run the same graphs compiled here
        reason = first_line(e)
        model = compiled_reference(manifest, spec.precision, device, spec.checkpoint)
        notes = [f"note: AOTInductor packages did not load here ({reason}); running torch.compile of the reference model"]
    runner = TorchRunner(model, device, notes=notes)
    runner.name = "aoti"
    return runner
