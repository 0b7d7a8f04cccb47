"""AOTInductor packages of the reference model: `torch.export` of the encoder and the decoder
(click count N and prompt batch P dynamic), compiled by `aoti_compile_and_package` into
aoti/<device>-<precision>/{encoder,decoder}.pt2 in the export folder, and recorded in its manifest
with what they are tied to (runtime.aoti_backend.runtime_facts). The graph wrappers are
model.graphs', shared with the ONNX export and the backend's torch.compile fallback.

A freshly compiled package is loaded and run once in a child process before it is kept: on a GPU
a package has been seen to compile and then kill the process that loads it, silently. A build
whose probe dies, times out or diverges from the reference fails with one line, and leaves the
folder as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..contract import MAX_PROMPTS, read_manifest, write_manifest
from ..errors import UserError, first_line
from ..io import folder_lock, staged_folder
from ..model import ImageState
from ..model.graphs import DecoderGraph, EncoderGraph, reference_for
from ..provenance import now_utc, sha256_file
from ..runtime.aoti_backend import PACKAGE_FILES, PACKAGES_DIR, package_dir, package_key, package_mismatches, runtime_facts

# Inductor settings for the packages. freezing: weights become constants, so convolutions and
# linears get prepacked oneDNN kernels on a CPU (ois-tiny decoder: 16-34% faster in three runs here).
INDUCTOR_CONFIGS = {"freezing": True}
PROBE_TIMEOUT_S = 600


def example_inputs(cfg, device: str, seed: int = 0, prompts: int = 2, clicks: int = 3) -> dict:
    """Random image and clicks (first positive, then mixed with padding) on `device`."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.input_size
    labels = torch.randint(-1, 2, (prompts, clicks), generator=g, dtype=torch.int32)
    labels[:, 0] = 1
    return {
        "image": (torch.rand(1, 3, s, s, generator=g) * 255).to(device),
        "point_coords": (torch.rand(prompts, clicks, 2, generator=g) * (s - 1)).to(device),
        "point_labels": labels.to(device),
        "prev_mask": torch.rand(prompts, 1, s, s, generator=g).to(device),
    }


def export_graphs(model, device: str, max_clicks: int, max_prompts: int) -> dict:
    """torch.export of both graphs: encoder at batch 1, decoder with P in 1..max_prompts and N in
    1..max_clicks."""
    inputs = example_inputs(model.cfg, device)
    with torch.no_grad():
        state = model.encode(inputs["image"])
        encoder = torch.export.export(EncoderGraph(model), (inputs["image"],))
        p = torch.export.Dim("P", min=1, max=max_prompts)
        n = torch.export.Dim("N", min=1, max=max_clicks)
        shapes = {**{name: None for name in ImageState._fields},
                  "point_coords": {0: p, 1: n}, "point_labels": {0: p, 1: n}, "prev_mask": {0: p}}
        clicks = (inputs["point_coords"], inputs["point_labels"], inputs["prev_mask"])
        decoder = torch.export.export(DecoderGraph(model), (*state, *clicks), dynamic_shapes=shapes)
    return {"encoder": encoder, "decoder": decoder}


def compile_package(exported, path: Path) -> None:
    from torch._inductor import aoti_compile_and_package

    # Inductor freezes weights only with grad off: without no_grad, INDUCTOR_CONFIGS' freezing is ignored.
    with warnings.catch_warnings(), torch.no_grad():  # and torch's own deprecation notices while it compiles
        warnings.simplefilter("ignore", FutureWarning)
        try:
            aoti_compile_and_package(exported, package_path=str(path), inductor_configs=dict(INDUCTOR_CONFIGS))  # it adds keys to the dict
        except Exception as e:  # noqa: BLE001 - a compiler error is the build's verdict
            raise UserError(f"AOTInductor could not compile {path.name}: {first_line(e)}") from None


# --- the probe: load and run a fresh package in a child process --------------------------------

def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    return float((got - ref).norm() / ref.norm().clamp(min=1e-30))


def describe_exit(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def probe_package(path: Path, inputs: tuple, reference, device: str, tolerance: float, timeout: float) -> float:
    """Run the package at `path` on `inputs` in a child process; its outputs' worst relative L2
    error against `reference` (a tensor or tuple), or UserError if it dies, hangs or diverges."""
    refs = reference if isinstance(reference, tuple) else (reference,)
    with tempfile.TemporaryDirectory(prefix="ois-aoti-probe.") as tmp:
        feed, out = Path(tmp) / "inputs.pt", Path(tmp) / "outputs.pt"
        torch.save([t.cpu() for t in inputs], feed)
        command = [sys.executable, "-m", __name__, str(path), device, str(feed), str(out)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        except subprocess.TimeoutExpired:
            raise UserError(f"{path.name}: the load-and-run probe did not finish in {timeout:.0f} s; nothing kept") from None
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or [""])[-1]
            raise UserError(f"{path.name}: the load-and-run probe process {describe_exit(done.returncode)}"
                            + (f" ({last})" if last else "") + "; nothing kept")
        got = torch.load(out, weights_only=True)
    errors = [rel_l2(g, r) for g, r in zip(got, refs)]
    worst = max(errors)
    if len(got) != len(refs) or not worst <= tolerance:
        raise UserError(f"{path.name}: the probe's outputs differ from the reference model's "
                        f"(relative L2 {worst:.2e} > {tolerance:.0e}); nothing kept")
    return worst


def _probe_child(path: str, device: str, feed: str, out: str) -> None:
    """In the child: load the package, run it once on the saved inputs, save its outputs."""
    from torch._inductor import aoti_load_package

    inputs = [t.to(device) for t in torch.load(feed, weights_only=True)]
    model = aoti_load_package(path, device_index=torch.cuda.current_device() if device == "cuda" else -1)
    with torch.inference_mode():
        outputs = model(*inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    torch.save([t.cpu() for t in outputs], out)


# --- the build ------------------------------------------------------------------------------------

def build_packages(
    export_dir: str | Path,
    device: str = "cpu",
    precision: str = "fp32",
    max_clicks: int | None = None,
    max_prompts: int = MAX_PROMPTS,
    checkpoint: str | None = None,
    rebuild: bool = False,
    progress=None,
    probe_timeout: float = PROBE_TIMEOUT_S,
) -> dict:
    """Compile, probe and record aoti/<device>-<precision>/{encoder,decoder}.pt2; returns the manifest."""
    from ..verify import TOLERANCES

    export_dir = Path(export_dir)
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, not {device!r}")
    if precision not in ("fp32", "fp16"):
        raise UserError(f"precision must be fp32 or fp16, not {precision!r}")
    step = progress or (lambda text: None)
    with folder_lock(export_dir):  # the manifest is read, then rewritten; an export may not swap the folder meanwhile
        manifest = read_manifest(export_dir)
        max_clicks = max_clicks or manifest["config"]["decoder"]["max_clicks"]
        if not 1 <= max_clicks <= manifest["config"]["decoder"]["max_clicks"]:
            raise UserError(f"--max-clicks must be 1..{manifest['config']['decoder']['max_clicks']} (the model's maximum)")
        if not 1 <= max_prompts <= MAX_PROMPTS:
            raise UserError(f"--max-prompts must be 1..{MAX_PROMPTS}")
        facts = runtime_facts(device)
        key = package_key(device, precision)
        old = manifest.get("aoti", {}).get(key)
        if (old and not rebuild and not package_mismatches(old, facts, manifest["model_hash"])
                and (old["max_clicks"], old["max_prompts"]) == (max_clicks, max_prompts)
                and all((package_dir(export_dir, device, precision) / f).is_file() for f in PACKAGE_FILES.values())):
            return manifest  # up to date

        step(f"load the reference model ({precision})")
        model = reference_for(manifest, precision, checkpoint).to(device)
        step(f"torch.export encoder and decoder (P 1..{max_prompts}, N 1..{max_clicks})")
        exported = export_graphs(model, device, max_clicks, max_prompts)
        probe = example_inputs(model.cfg, device, seed=1, prompts=3, clicks=max(1, max_clicks // 2))
        with torch.no_grad():
            state = model.encode(probe["image"])
            clicks = (probe["point_coords"], probe["point_labels"], probe["prev_mask"])
            expected = {"encoder": ((probe["image"],), tuple(state)),
                        "decoder": ((*state, *clicks), model.decode(state, *clicks))}
        tolerance = TOLERANCES[precision]["rel_l2"]
        (export_dir / PACKAGES_DIR).mkdir(exist_ok=True)
        files, seconds, errors = {}, {}, {}
        with staged_folder(package_dir(export_dir, device, precision)) as staging:
            for role, name in PACKAGE_FILES.items():
                step(f"compile {name} with AOTInductor for {device} (about 30 s per graph on a CPU)")
                start = time.perf_counter()
                compile_package(exported[role], staging / name)
                seconds[role] = round(time.perf_counter() - start, 1)
                step(f"load and run {name} once in a child process")
                errors[role] = probe_package(staging / name, *expected[role], device, tolerance, probe_timeout)
                files[name] = sha256_file(staging / name)
        manifest.setdefault("aoti", {})[key] = {
            **facts,
            "precision": precision,
            "model_hash": manifest["model_hash"],
            "files": files,
            "max_clicks": max_clicks,
            "max_prompts": max_prompts,
            "inductor_configs": INDUCTOR_CONFIGS,
            "probe_rel_l2": errors,
            "build_seconds": seconds,
            "date": now_utc(),
        }
        write_manifest(export_dir, manifest)
    return manifest


if __name__ == "__main__":  # the probe's child process: PACKAGE DEVICE INPUTS OUTPUTS
    _probe_child(*sys.argv[1:5])
