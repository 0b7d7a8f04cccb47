"""GPU evidence in one run, within a time budget (docs/design.md §6): machine facts, the GPU tests,
then for ois-b-1024 and ois-s-1024 at FP16 and FP32: `bench` and `verify` for torch-cuda and for
AOTInductor packages (`build --engine aoti`), Predictor.click and set_image end to end, SAT by
chunk size; where TensorRT and/or onnxruntime-gpu are importable, `build` + verify + bench +
Predictor for trt, ort-cuda and ort-trt beside them (else the JSON says why not, per backend);
and the peers in the same process: SAM ViT-B and ViT-H (segment-anything), SAM 2.1
hiera-t and hiera-b+ (sam2), random weights, FP16 autocast: encoder, one click to logits at the
image's full size, SAT (256 single points in one call). Run it through benchmarks/gpu_engines.sh,
which carries the wheels the GPU machine lacks.

    python benchmarks/gpu_engines.py [--out DIR] [--budget-s 570] [--cpu-smoke]

Steps run in priority order and are skipped, with a note, when the budget would be exceeded;
the JSON (OUT/gpu_engines.json: device, versions, date, every step's result or why it did not
run) is rewritten after each step, so a run cut short still leaves its evidence. --cpu-smoke runs
the same steps on the CPU with ois-tiny and one repetition, skipping the GPU-only ones (the GPU
tests, the large peers): what CI checks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from ois_deploy.evaluate.bench import run_sat, sat_clicks, session_target
from ois_deploy.evaluate.clicker import PRED_THRESHOLD, Clicker
from ois_deploy.io import atomic_write_bytes
from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.runtime.predictor import Predictor
from ois_deploy.runtime.preprocess import read_image, to_input

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "ois_deploy" / "assets" / "demo.png"
PEER_IMAGE = (1536, 2048)  # (H, W) of the image whose full-size logits one click produces


def cli(*args: str, timeout: float) -> str:
    """`ois-deploy ARGS` in a subprocess; its output's tail, or an error with that tail."""
    proc = subprocess.run([sys.executable, "-m", "ois_deploy", *args], capture_output=True, text=True,
                          timeout=max(1.0, timeout), cwd=ROOT)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
    if proc.returncode != 0:
        raise RuntimeError(f"ois-deploy {' '.join(args)} exited {proc.returncode}: {tail}")
    return tail


class Run:
    """The record and the clock: each step adds its result (or why not) and rewrites the JSON."""

    def __init__(self, out: Path, budget_s: float, smoke: bool):
        self.out, self.smoke = out, smoke
        self.deadline = time.monotonic() + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.record = {"date": now_utc(), "mode": "cpu-smoke" if smoke else "gpu", "budget_s": budget_s,
                       "machine": machine_info(), "versions": tool_versions(), "steps": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, fn, estimate_s: float = 10, gpu_only: bool = False, requires: str | None = None) -> object:
        if gpu_only and self.smoke:
            return self._done(name, {"status": "skipped", "why": "GPU-only step (--cpu-smoke)"})
        if requires and importlib.util.find_spec(requires) is None:
            return self._done(name, {"status": "skipped", "why": f"{requires} is not installed (gpu_engines.sh prepare carries it)"})
        if self.left() < estimate_s:
            return self._done(name, {"status": "skipped", "why": f"time budget: {self.left():.0f} s left, needs ~{estimate_s:.0f} s"})
        print(f"[{self.left():5.0f} s left] {name}", flush=True)
        start = time.monotonic()
        try:
            result = {"status": "ok", "result": fn()}
        except Exception as e:  # one failed step must not lose the others' evidence
            result = {"status": "failed", "why": f"{type(e).__name__}: {e}"[:2000],
                      "where": traceback.format_exc().splitlines()[-3:]}
        result["seconds"] = round(time.monotonic() - start, 1)
        return self._done(name, result)

    def _done(self, name: str, result: dict) -> object:
        self.record["steps"][name] = result
        atomic_write_bytes(self.out / "gpu_engines.json", (json.dumps(self.record, indent=1) + "\n").encode())
        if result["status"] != "ok":
            print(f"  {name}: {result['status']}: {result['why'][:300]}", flush=True)
        return result.get("result")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return {"p50": statistics.median(times), "min": min(times), "n": repeats}


# -- OIS through the product ---------------------------------------------------------------------
def predictor_session(model: str, backend: str, precision: str, device: str | None, clicks: int) -> dict:
    """set_image and Predictor.click end to end (the mask and full-size logits on the host, and the
    mask only) over simulated sessions on the bundled demo image."""
    image = read_image(DEMO)
    predictor = Predictor.open(model, backend=backend, precision=precision, device=device)
    target = session_target(*image.shape[:2])
    set_image, click, mask_only = [], [], []
    for run in range(3):
        start = time.perf_counter()
        predictor.set_image(image)
        sync()
        set_image.append((time.perf_counter() - start) * 1000)
        clicker, pred = Clicker(target), np.zeros(target.shape, bool)
        for _ in range(clicks):
            c = clicker.next_click(pred)
            with_logits = run != 1  # one session of mask-only clicks (what serve and eval ask for)
            start = time.perf_counter()
            prediction = predictor.click(c.x, c.y, c.positive, threshold=PRED_THRESHOLD, with_logits=with_logits)
            sync()
            (click if with_logits else mask_only).append((time.perf_counter() - start) * 1000)
            pred = prediction.mask
    warm = set_image[1:]
    return {"image": f"{image.shape[1]}x{image.shape[0]}", "clicks_per_session": clicks,
            "set_image_ms_p50": statistics.median(warm), "click_ms_p50": statistics.median(click[clicks:]),
            "click_mask_only_ms_p50": statistics.median(mask_only), "backend": predictor.backend,
            "runner": repr(predictor.runner)}


def sat_sweep(model: str, backend: str, precision: str, device: str | None, chunks: list[int], repeats: int,
              prompts: int) -> dict:
    """SAT (single clicks on a 16x16 grid) at several prompt sets per decoder call: 1 is sequential."""
    predictor = Predictor.open(model, backend=backend, precision=precision, device=device)
    image, frame = to_input(read_image(DEMO), predictor.cfg.input_size)
    coords = sat_clicks(frame)[:prompts]
    labels = np.ones((len(coords), 1), np.int32)
    runner = predictor.runner
    return {"prompts": prompts} | {f"chunk_{c}_ms": timed_ms(lambda: run_sat(runner, image, coords, labels, c), repeats)["p50"] for c in chunks}


# -- peers: random weights, FP16 autocast, the same protocol -------------------------------------
def peer_protocol(encode, click, sat, repeats: int, clicks: int, prompts: int) -> dict:
    """FP16 autocast on a GPU (FP32 on a CPU); the first encode is the encoder's warm-up."""
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        state = encode()
        return {"encoder_ms": timed_ms(encode, repeats, warmup=0)["p50"],
                "click_to_full_logits_ms": timed_ms(lambda: click(state), clicks, warmup=3)["p50"],
                "sat_ms": timed_ms(lambda: sat(state), repeats)["p50"], "sat_prompts": prompts}


def sam_peer(kind: str, repeats: int, clicks: int, prompts: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peer_sam import import_sam

    build, _ = import_sam()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    sam = build.sam_model_registry[kind](checkpoint=None).to(device).eval()
    image = torch.randn(1, 3, 1024, 1024, device=device)
    h, w = PEER_IMAGE
    input_size = (1024 * h // w, 1024)
    pe = sam.prompt_encoder.get_dense_pe()
    grid = torch.rand(prompts, 1, 2, device=device) * 1000
    one = (torch.tensor([[[500.0, 400.0]]], device=device), torch.ones(1, 1, device=device))

    def decode(embedding, points, labels):
        sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        return sam.mask_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                                dense_prompt_embeddings=dense, multimask_output=False)[0]

    return {"model": f"SAM {kind}", **peer_protocol(
        lambda: sam.image_encoder(image),
        lambda emb: sam.postprocess_masks(decode(emb, *one), input_size, PEER_IMAGE),
        lambda emb: decode(emb, grid, torch.ones(prompts, 1, device=device)), repeats, clicks, prompts)}


def sam2_peer(config: str, repeats: int, clicks: int, prompts: int) -> dict:
    from sam2.build_sam import build_sam2

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_sam2(f"configs/sam2.1/{config}.yaml", ckpt_path=None, device=device, mode="eval")
    image = torch.randn(1, 3, 1024, 1024, device=device)
    sizes = [(256, 256), (128, 128), (64, 64)]  # backbone feature sizes at 1024 (SAM2ImagePredictor)
    grid = torch.rand(prompts, 1, 2, device=device) * 1000
    one = (torch.tensor([[[500.0, 400.0]]], device=device), torch.ones(1, 1, device=device, dtype=torch.int))

    def encode():  # as SAM2ImagePredictor.set_image
        _, feats, _, _ = model._prepare_backbone_features(model.forward_image(image))
        feats[-1] = feats[-1] + model.no_mem_embed
        maps = [f.permute(1, 2, 0).view(1, -1, *s) for f, s in zip(feats[::-1], sizes[::-1])][::-1]
        return maps[-1], maps[:-1]

    def decode(state, points, labels):  # as SAM2ImagePredictor._predict
        sparse, dense = model.sam_prompt_encoder(points=(points, labels), boxes=None, masks=None)
        return model.sam_mask_decoder(image_embeddings=state[0], image_pe=model.sam_prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False, repeat_image=points.shape[0] > 1,
                                      high_res_features=state[1])[0]

    full = lambda low: torch.nn.functional.interpolate(low.float(), PEER_IMAGE, mode="bilinear", align_corners=False)  # noqa: E731
    return {"model": f"SAM 2.1 {config}", **peer_protocol(
        encode, lambda s: full(decode(s, *one)),
        lambda s: decode(s, grid, torch.ones(prompts, 1, device=device, dtype=torch.int)), repeats, clicks, prompts)}


def ois_probe(preset: str, precision: str, repeats: int, clicks: int, prompts: int) -> dict:
    """OIS under the peers' protocol: the runner's own encode, one click through the device loop
    to full-size logits (brought to the host, unlike the peers'), SAT through decode_prompts."""
    predictor = Predictor.open(preset, backend="torch-cuda" if torch.cuda.is_available() else "torch", precision=precision)
    runner = predictor.runner
    from ois_deploy.runtime.preprocess import Frame

    frame = Frame(*PEER_IMAGE, runner.cfg.input_size)
    image = np.random.default_rng(0).uniform(0, 255, (1, 3, frame.size, frame.size)).astype(np.float32)
    coords = frame.to_input(np.array([[[1000.0, 800.0]]], np.float32))
    grid = sat_clicks(frame)[:prompts]
    with torch.inference_mode():
        state = runner.encode(image)
        return {"model": f"OIS {preset} {precision}", "encoder_ms": timed_ms(lambda: runner.encode(image), repeats)["p50"],
                "click_to_full_logits_ms": timed_ms(lambda: runner.decode_to_image(
                    state, frame, coords, np.ones((1, 1), np.int32), runner.empty_prev()), clicks, warmup=3)["p50"],
                "sat_ms": timed_ms(lambda: runner.decode_prompts(state, grid, np.ones((len(grid), 1), np.int32)),
                                   repeats)["p50"], "sat_prompts": len(grid)}


def facts() -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1))
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip()
    for module in ("tensorrt", "onnxruntime", "triton", "segment_anything", "sam2", "polygraphy", "onnxslim"):
        try:  # segment_anything's own __init__ needs torchvision, which its model code does not
            info[module] = "present" if importlib.util.find_spec(module) else "absent"
        except Exception as e:  # present but broken: say how
            info[module] = f"not importable ({type(e).__name__})"
    info["aoti_build"] = aoti_available()
    info["gpu_backends"] = {name: why or "available" for name, why in gpu_backends().items()}
    return info


def gpu_backends() -> dict[str, str | None]:
    """trt, ort-cuda, ort-trt -> None where they can run here, else why not. ONNX Runtime lists
    the providers it was compiled with, so the TensorRT one also needs tensorrt's own libraries."""
    if not torch.cuda.is_available():
        return dict.fromkeys(("trt", "ort-cuda", "ort-trt"), "no CUDA GPU here")
    has_trt = importlib.util.find_spec("tensorrt") is not None
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    no_trt = "tensorrt is not importable here (pip install 'ois-deploy[gpu]'; too large for .whl/)"
    listed = f"onnxruntime here lists {', '.join(providers) or 'nothing'}: onnxruntime-gpu is not installed"
    return {"trt": None if has_trt else no_trt,
            "ort-cuda": None if "CUDAExecutionProvider" in providers else listed,
            "ort-trt": (no_trt if not has_trt else None) if "TensorrtExecutionProvider" in providers else listed}


def aoti_available() -> bool:
    """Whether this checkout's `build` has the AOTInductor engine (issue 32's other half)."""
    help_text = subprocess.run([sys.executable, "-m", "ois_deploy", "build", "--help"], capture_output=True, text=True,
                               cwd=ROOT, env={**os.environ, "COLUMNS": "200"}).stdout
    return "--engine" in help_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_engines")
    parser.add_argument("--budget-s", type=float, default=570, help="stop starting steps after this (the run's limit is 600 s)")
    parser.add_argument("--cpu-smoke", action="store_true", help="on a CPU: ois-tiny, one repetition, GPU-only steps skipped")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --cpu-smoke for the CPU check of this script")
    run = Run(args.out, args.budget_s, smoke)
    device, cuda = ("cpu", "torch") if smoke else ("cuda", "torch-cuda")
    presets = ["ois-tiny"] if smoke else ["ois-b-1024", "ois-s-1024"]
    precisions = ["fp32"] if smoke else ["fp16", "fp32"]
    reps, clicks, prompts = (1, 3, 16) if smoke else (10, 20, 256)  # SAT: single clicks on a 16x16 grid (smoke: 16)
    bench_args = ["--clicks", "2", "--repeats", "1", "--no-sat"] if smoke else []  # SAT: the sweep below
    work = Path(os.environ.get("OIS_GPU_WORK", "/tmp/ois-gpu-engines"))

    aoti = run.step("facts", facts, estimate_s=5)
    aoti = bool(aoti and aoti.get("aoti_build"))
    run.step("pytest -m gpu", lambda: subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
         "--continue-on-collection-errors", "tests/"], capture_output=True,
        text=True, cwd=ROOT, timeout=max(1.0, run.left())).stdout.strip().splitlines()[-1:], estimate_s=60, gpu_only=True)

    def bench(model: str, backend: str, precision: str) -> dict:
        path = args.out / f"bench-{Path(model).name}-{backend}-{precision}.json"
        cli("bench", model, "--backend", backend, "--precision", precision, "--results-dir", str(args.out),
            "--json", str(path), *bench_args, *(["--device", device] if backend.startswith("torch") else []), timeout=run.left())
        record = json.loads(path.read_text())
        return {k: record.get(k) for k in ("encoder_ms", "decoder_ms", "spc_ms", "sat_batched_ms", "sat_sequential_ms", "sat_chunk")}

    def export(preset: str) -> Path:
        folder = work / preset
        if not (folder / "manifest.json").is_file():
            work.mkdir(parents=True, exist_ok=True)
            cli("export", "--preset", preset, "--precision", "fp32", "--out", str(folder), timeout=run.left())
        return folder

    def verify(folder: Path, backend: str, precision: str) -> dict:
        path = args.out / f"verify-{folder.name}-{backend}-{precision}.json"
        cli("verify", str(folder), "--backend", backend, "--precision", precision, "--json", str(path), timeout=run.left())
        report = json.loads(path.read_text())
        return {k: report.get(k) for k in ("passed", "failures")}

    peers = [("SAM 2.1 hiera-t", "sam2", lambda: sam2_peer("sam2.1_hiera_t", reps, clicks * 2, prompts), False),
             ("SAM vit_b", "segment_anything", lambda: sam_peer("vit_b", reps, clicks * 2, prompts), True),  # a minute on 2 CPU cores
             ("SAM 2.1 hiera-b+", "sam2", lambda: sam2_peer("sam2.1_hiera_b+", reps, clicks * 2, prompts), True),
             ("SAM vit_h", "segment_anything", lambda: sam_peer("vit_h", reps, clicks * 2, prompts), True)]
    for i, preset in enumerate(presets):
        for precision in precisions:
            tag = f"{preset} {precision}"
            run.step(f"bench {tag} {cuda}", lambda: bench(preset, cuda, precision), estimate_s=30 if smoke else 40)
            run.step(f"Predictor {tag} {cuda}", lambda: predictor_session(preset, cuda, precision, device, clicks), estimate_s=20)
            run.step(f"SAT chunks {tag} {cuda}", lambda: sat_sweep(preset, cuda, precision, device,
                                                                  [1, 16] if smoke else [1, 16, 64, 256], reps, prompts), estimate_s=20)
        if i == 0:  # the peers beside the first preset's figures, before the longer builds
            run.step(f"peer OIS {preset}", lambda: ois_probe(preset, precisions[0], reps, clicks * 2, prompts), estimate_s=20)
            for name, package, fn, large in peers:
                run.step(f"peer {name}", fn, estimate_s=40, gpu_only=large, requires=package)
        folder = run.step(f"export {preset}", lambda: str(export(preset)), estimate_s=60)
        if folder is None:
            continue
        run.step(f"verify {preset} {cuda}", lambda: verify(Path(folder), cuda, "both" if not smoke else "fp32"), estimate_s=40)
        for precision in precisions:
            tag = f"{preset} {precision}"
            if not aoti:
                run._done(f"aoti {tag}", {"status": "skipped", "why": "`ois-deploy build` has no --engine here (aoti not in this checkout)"})
                continue
            built = run.step(f"build aoti {tag}", lambda: cli("build", folder, "--engine", "aoti", "--device", device,
                                                               "--precision", precision, timeout=run.left()), estimate_s=120)
            if built is None:
                continue
            run.step(f"verify {tag} aoti", lambda: verify(Path(folder), "aoti", precision), estimate_s=30)
            run.step(f"bench {tag} aoti", lambda: bench(folder, "aoti", precision), estimate_s=40)
            run.step(f"Predictor {tag} aoti", lambda: predictor_session(folder, "aoti", precision, None, clicks), estimate_s=20)
            run.step(f"SAT chunks {tag} aoti", lambda: sat_sweep(folder, "aoti", precision, None,
                                                                [1, 16] if smoke else [1, 16, 64, 256], reps, prompts), estimate_s=20)
        for backend, why in gpu_backends().items():  # TensorRT and ONNX Runtime's GPU providers
            for precision in precisions:
                tag = f"{preset} {precision}"
                if why:
                    run._done(f"{backend} {tag}", {"status": "skipped", "why": why})
                    continue
                if backend == "trt" and run.step(f"build trt {tag}", lambda: cli(
                        "build", folder, "--precision", precision, "--timing-cache", str(work / "trt.cache"),
                        timeout=run.left()), estimate_s=300) is None:
                    continue  # engines hold one precision: each is built, then checked and measured
                run.step(f"verify {tag} {backend}", lambda: verify(Path(folder), backend, precision), estimate_s=60)
                run.step(f"bench {tag} {backend}", lambda: bench(folder, backend, precision), estimate_s=40)
                run.step(f"Predictor {tag} {backend}", lambda: predictor_session(folder, backend, precision, None, clicks),
                         estimate_s=20)
    steps = run.record["steps"]
    print(json.dumps({k: v["status"] for k, v in steps.items()}, indent=1))
    print(f"wrote {args.out / 'gpu_engines.json'}")
    sys.exit(1 if any(v["status"] == "failed" for v in steps.values()) else 0)


if __name__ == "__main__":
    main()
