"""CPU latency side by side with SAM ViT-B, both sides on both CPU runtimes, in one process.

    pip install "ois-deploy[cpu,openvino,peer]"   # segment-anything: SAM's model and ONNX wrapper
    python benchmarks/peer_sam.py --presets ois-tiny ois-s-1024 --threads 2
    python benchmarks/peer_sam.py --presets ois-b-1024 --threads 2    # a separate process: memory
    python benchmarks/peer_sam.py --report benchmarks/results/peer_sam_*.json --readme README.md

SAM ViT-B (random weights: latency does not depend on them) is built from the segment-anything
package's modeling code; its decoder is exported with the package's own ONNX wrapper
(SamOnnxModel: prompt encoder, mask decoder, mask upscaled to 1024x1024 and cropped to the image
in the graph), its image encoder as a plain ONNX graph. Our graphs, FP32 and INT8, come from
artifacts/bench/<preset> (bench_cpu.ensure_export: exported once, reused).

Every graph runs under ONNX Runtime's CPU provider (the fp32 graphs; our int8 QDQ graphs) and
under OpenVINO's CPU plugin (fp32 forced, bf16 where the CPU has AVX512-BF16 or AMX-BF16, our int8
graphs), with the same thread count, one call per graph per round, rounds interleaved so that
load from elsewhere on the machine spreads over all of them; the median is reported. Decoders run
on the FP32 encoder's state. "click" is a whole click through `Predictor` (host pre- and
post-processing included) on each runtime's fastest decoder, for its ratio to the bare decoder
and to the decoder call inside the same click (decoder_in_click_ms: the host share alone).

One click: OIS P=1, N=1 with a previous mask; SAM one point plus its padding point, with a
previous low-res mask (has_mask_input=1), image 1024x1024.
Writes benchmarks/results/peer_sam_<date>_<presets>.json with machine, CPU flags, versions and date;
--report renders the README's CPU table from such files.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

from ois_deploy.errors import UserError, run_script
from ois_deploy.model.weights import load_model
from ois_deploy.evaluate.bench import update_readme
from ois_deploy.provenance import cpu_flags, machine_info, now_utc, tool_versions
from ois_deploy.runtime.openvino_backend import compile_settings, import_openvino, missing_units
from ois_deploy.runtime.ort_backend import OrtRunner
from ois_deploy.runtime.openvino_backend import OpenVinoRunner
from ois_deploy.runtime.predictor import Predictor

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import ensure_export  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SAM_DIR = Path("artifacts/bench/sam-vit-b")
SAM_IMAGE = 1024
REPORT_START, REPORT_END = "<!-- peer-report:start -->", "<!-- peer-report:end -->"
# ms of the decoder call inside each Predictor click, by (preset, runtime, precision): the click's
# host share without comparing two calls that load elsewhere on the machine may slow unequally
CLICK_DECODER_MS: dict[tuple, list[float]] = {}
# (runtime, precision) columns of the table, in order; bf16 and int8 where the CPU has the units
COLUMNS = (("ort", "fp32"), ("ort", "int8"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"))


def import_sam():
    """segment_anything.modeling and .utils.onnx without the package's __init__, which imports
    the predictor and through it torchvision (not needed by the model or its ONNX wrapper)."""
    try:
        spec = importlib.util.find_spec("segment_anything")
    except ImportError:
        spec = None
    if spec is None:
        raise UserError("segment-anything is not installed: pip install segment-anything")
    if "segment_anything" not in sys.modules:
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    build = importlib.import_module("segment_anything.build_sam")
    onnx_wrapper = importlib.import_module("segment_anything.utils.onnx")
    return build, onnx_wrapper


def export_sam(out: Path) -> dict[str, Path]:
    """SAM ViT-B's decoder (SamOnnxModel) and image encoder as ONNX, once (cached)."""
    import torch

    paths = {"decoder": out / "decoder.onnx", "encoder": out / "encoder.onnx"}
    if all(p.is_file() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    build, wrapper = import_sam()
    torch.manual_seed(0)
    sam = build.build_sam_vit_b(checkpoint=None).eval()
    onnx_model = wrapper.SamOnnxModel(sam, return_single_mask=True)
    dims = sam.prompt_encoder.image_embedding_size
    dummy = {
        "image_embeddings": torch.randn(1, sam.prompt_encoder.embed_dim, *dims),
        "point_coords": torch.randint(0, 1024, (1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(0, 4, (1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, 4 * dims[0], 4 * dims[1]),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    print("exporting SAM ViT-B decoder (SamOnnxModel) ...", flush=True)
    with torch.no_grad():  # as segment-anything's scripts/export_onnx_model.py does
        torch.onnx.export(onnx_model, tuple(dummy.values()), str(paths["decoder"]), dynamo=False,
                          input_names=list(dummy), output_names=["masks", "iou_predictions", "low_res_masks"],
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                          opset_version=17, do_constant_folding=True)
        print("exporting SAM ViT-B image encoder ...", flush=True)
        torch.onnx.export(sam.image_encoder, (torch.randn(1, 3, SAM_IMAGE, SAM_IMAGE),), str(paths["encoder"]),
                          dynamo=False, input_names=["image"], output_names=["image_embeddings"], opset_version=17)
    return paths


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # a 1024 px encoder's arena, kept per session, adds up over many graphs
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def openvino_graph(path: Path, precision: str, threads: int):
    ov = import_openvino()
    compiled = ov.Core().compile_model(str(path), "CPU", compile_settings(precision, threads))
    request = compiled.create_infer_request()
    return lambda feed: request.infer(feed)


def openvino_precisions() -> list[str]:
    return [p for p in ("fp32", "bf16", "int8") if not missing_units(p)]


def sam_calls(paths: dict[str, Path], threads: int, rng, graphs_wanted: set[str]) -> dict:
    image = rng.standard_normal((1, 3, SAM_IMAGE, SAM_IMAGE)).astype(np.float32)
    graphs = {("ort", "fp32"): lambda path: ort_session(path, threads)}
    for precision in openvino_precisions():
        if precision != "int8":  # SAM ships no INT8 graph
            graphs[("openvino", precision)] = lambda path, p=precision: openvino_graph(path, p, threads)
    embedding = graphs[("ort", "fp32")](paths["encoder"])({"image": image})[0]
    feed = {
        "image_embeddings": embedding,
        "point_coords": np.array([[[400.0, 500.0], [0.0, 0.0]]], np.float32),
        "point_labels": np.array([[1.0, -1.0]], np.float32),
        "mask_input": rng.standard_normal((1, 1, 256, 256)).astype(np.float32),
        "has_mask_input": np.array([1.0], np.float32),
        "orig_im_size": np.array([SAM_IMAGE, SAM_IMAGE], np.float32),
    }
    calls = {}
    for (runtime, precision), make in graphs.items():
        if "encoder" in graphs_wanted:
            encoder = make(paths["encoder"])
            calls[("sam-vit-b", runtime, precision, "encoder")] = lambda e=encoder: e({"image": image})
        if "decoder" in graphs_wanted:
            decoder = make(paths["decoder"])
            calls[("sam-vit-b", runtime, precision, "decoder")] = lambda d=decoder: d(feed)
    return calls


def ois_calls(preset: str, threads: int, rng, graphs_wanted: set[str], int8: bool = True) -> dict:
    model, report = load_model(preset)
    folder = ensure_export(preset, model, report, ("fp32", "int8") if int8 else ("fp32",))
    del model
    size = read_size(folder)
    image = (rng.random((1, 3, size, size)) * 255).astype(np.float32)
    coords = (rng.random((1, 1, 2)) * (size - 1)).astype(np.float32)
    labels = np.ones((1, 1), np.int32)
    prev = rng.random((1, 1, size, size)).astype(np.float32)
    precisions = [p for p in openvino_precisions() if int8 or p != "int8"]
    runners = {("ort", p): OrtRunner(folder, p, providers="cpu", threads=threads) for p in ("fp32", "int8") if p in precisions}
    runners.update({("openvino", p): OpenVinoRunner(folder, p, threads=threads) for p in precisions})
    state = runners[("ort", "fp32")].encode(image)  # every decoder decodes the same FP32 state
    calls = {}
    for (runtime, precision), runner in runners.items():
        if "encoder" in graphs_wanted:
            calls[(preset, runtime, precision, "encoder")] = lambda r=runner: r.encode(image)
        if "decoder" in graphs_wanted:
            handed = runner.state_from_numpy(state)
            calls[(preset, runtime, precision, "decoder")] = lambda r=runner, s=handed: r.decode(s, coords, labels, prev)
    if "decoder" not in graphs_wanted:
        return calls
    # a whole click through the Predictor on each runtime's fastest precision (by the table: bf16 on
    # OpenVINO where the CPU has it; int8 on ONNX Runtime)
    photo = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    fastest = {"ort": "int8" if int8 else "fp32", "openvino": "bf16" if "bf16" in precisions else precisions[-1]}
    for runtime, precision in fastest.items():
        predictor = Predictor(runners[(runtime, precision)])
        predictor.set_image(photo)

        def click(p=predictor, inside=CLICK_DECODER_MS.setdefault((preset, runtime, precision), [])):
            p.reset()
            p.click(size / 2, size / 2, True)
            inside.append(p.runner.last_ms["decode"])  # the decoder call of this very click

        calls[(preset, runtime, precision, "click")] = click
    # Each click right after its own bare decoder: the first OpenVINO call after an ONNX Runtime
    # call ran slower (ONNX Runtime's workers spinning on, presumably). After the ONNX Runtime
    # click, the ois-s-1024 BF16 click came out 1.17-1.23x its decoder; after its own decoder, 1.02x
    # (host work 4.5 ms); a bare decoder call on the click's own inputs took the bare decoder's time.
    order = [k for k in calls if k[3] != "click"]
    for k in [k for k in order if k[3] == "decoder" and k[:3] + ("click",) in calls]:
        order.insert(order.index(k) + 1, k[:3] + ("click",))
    return {k: calls[k] for k in order}


def read_size(folder: Path) -> int:
    from ois_deploy.contract import read_manifest

    return int(read_manifest(folder)["input_size"])


def run_rounds(calls: dict, rounds: int, encoder_rounds: int) -> dict:
    """Median ms per call, rounds interleaved over all graphs (one warm-up call each first)."""
    times = {key: [] for key in calls}
    for fn in calls.values():
        fn()
    for r in range(rounds):
        for key, fn in calls.items():
            if key[3] == "encoder" and r >= encoder_rounds:
                continue
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1000)
        print(f"round {r + 1}/{rounds}", flush=True)
    return {key: (statistics.median(v), len(v)) for key, v in times.items()}


def result_rows(medians: dict) -> list[dict]:
    """One row per (model, runtime, precision, graph); decoders and encoders with their ratio to
    SAM's fastest, clicks with their ratio to the same runner's bare decoder and to their own decoder call."""
    sam_best: dict[str, float] = {}
    for (model, _, _, graph), (ms, _) in medians.items():
        if model == "sam-vit-b":
            sam_best[graph] = min(ms, sam_best.get(graph, ms))
    rows = []
    for (model, runtime, precision, graph), (ms, n) in medians.items():
        row = {"model": model, "runtime": runtime, "precision": precision, "graph": graph, "median_ms": round(ms, 2), "calls": n}
        if graph in sam_best:
            row["vs_sam_best"] = round(ms / sam_best[graph], 2)
        else:
            row["vs_decoder"] = round(ms / medians[(model, runtime, precision, "decoder")][0], 2)
            inside = CLICK_DECODER_MS.get((model, runtime, precision), [])[1:]  # not the warm-up call
            if inside:
                row["decoder_in_click_ms"] = round(statistics.median(inside), 2)
                row["vs_decoder_in_click"] = round(ms / row["decoder_in_click_ms"], 2)
        rows.append(row)
    return rows


def report_table(files: list[Path]) -> str:
    """Markdown: per model and graph, median ms per runtime and precision, and the fastest's ratio
    to SAM's fastest (clicks: to the bare decoder). A (model, graph) row comes from the newest
    run that has it, with that run's SAM row above it."""
    files = sorted(files, key=lambda path: json.loads(path.read_text())["date"], reverse=True)
    header = "| model | graph | " + " | ".join(f"{r} {p}" for r, p in COLUMNS) + " | fastest vs SAM's fastest |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    dates, flags = set(), set()
    seen = set()
    for path in files:
        data = json.loads(path.read_text())
        dates.add(data["date"][:10])
        flags.add(", ".join(f for f, v in data["cpu_flags"].items() if v is True))
        cells: dict = {}
        for r in data["results"]:
            cells.setdefault((r["model"], r["graph"]), {})[(r["runtime"], r["precision"])] = r
        # ratios are to SAM in the same run: a run's SAM row is shown for the graphs it has new OIS rows of
        fresh = {graph for (model, graph) in cells if model != "sam-vit-b" and (f"`{model}`", graph) not in seen}
        for (model, graph), by_column in cells.items():
            if model == "sam-vit-b" and graph not in fresh:
                continue
            label = f"`{model}`" if model != "sam-vit-b" or not seen else f"`{model}` (run {path.stem[len('peer_sam_'):]})"
            if (label, graph) in seen:
                continue
            seen.add((label, graph))
            fastest = min(by_column.values(), key=lambda r: r["median_ms"])
            ratio = f"{fastest['vs_sam_best']:.2f}x" if "vs_sam_best" in fastest else f"{fastest['vs_decoder']:.2f}x its decoder"
            values = " | ".join(f"{by_column[c]['median_ms']:,.1f}" if c in by_column else "-" for c in COLUMNS)
            lines.append(f"| {label} | {graph} | {values} | {ratio} ({fastest['runtime']} {fastest['precision']}) |")
    lines.append("")
    amx = "AMX" if any(v is True for f, v in data["cpu_flags"].items() if f.startswith("amx")) else "no AMX"
    loads = ", ".join("-".join(map(str, json.loads(p.read_text()).get("load_average", ["?"]))) for p in files)
    lines.append(f"Median ms, {data['threads']} threads, {data['machine']['cpu']} ({data['machine']['cores']} cores, "
                 f"load average before-after each run: {loads}); flags: {' / '.join(sorted(flags))}; {amx}. "
                 f"{', '.join(sorted(dates))}; files: {', '.join(p.name for p in files)}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["ois-tiny", "ois-s-1024"])
    parser.add_argument("--rounds", type=int, default=7, help="decoder calls per graph")
    parser.add_argument("--encoder-rounds", type=int, default=3, help="encoder calls per graph")
    parser.add_argument("--threads", type=int, default=2, help="threads per call, both runtimes")
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 graphs (calibrating a 1024 px preset is slow)")
    parser.add_argument("--graphs", nargs="+", choices=("decoder", "encoder"), default=["decoder", "encoder"],
                        help="what to time (decoder: with Predictor clicks); encoders in a process of their own use less memory")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report", nargs="+", type=Path, help="render the table from these result files")
    parser.add_argument("--readme", type=Path, help="with --report: write it between the README's peer-report markers")
    args = parser.parse_args()
    if args.report:
        table = report_table(args.report)
        print(table)
        if args.readme and not update_readme(args.readme, table, REPORT_START, REPORT_END):
            raise UserError(f"{args.readme} has no peer report block ({REPORT_START} ... {REPORT_END})")
        return
    rng = np.random.default_rng(0)
    graphs = set(args.graphs)
    calls = sam_calls(export_sam(SAM_DIR), args.threads, rng, graphs)
    for preset in args.presets:
        calls.update(ois_calls(preset, args.threads, rng, graphs, int8=not args.no_int8))
    load_before = os.getloadavg()[0]
    rows = result_rows(run_rounds(calls, args.rounds, args.encoder_rounds))
    result = {
        "benchmark": "per-click decoder, encoder and Predictor click on CPU runtimes, OIS vs SAM ViT-B, median ms",
        "command": "python benchmarks/peer_sam.py " + " ".join(sys.argv[1:]),
        "one_click": "OIS P=1 N=1 with a previous mask; SAM 1 point + padding point, has_mask_input=1, image 1024x1024",
        "weights": "ois-tiny bundled; ois-s-1024, ois-b-1024 and SAM ViT-B random init",
        "threads": args.threads, "rounds": args.rounds, "encoder_rounds": args.encoder_rounds,
        "openvino_settings": "PERFORMANCE_HINT LATENCY, streams: the hint's choice (1); bf16: INFERENCE_PRECISION_HINT bf16",
        "cpu_flags": cpu_flags(), "machine": machine_info(), "versions": tool_versions(), "date": now_utc(),
        # the machine may be shared: 1-minute load average before and after the rounds
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "results": rows,
    }
    try:
        from importlib.metadata import version

        result["versions"]["segment-anything"] = version("segment-anything")
    except Exception:
        pass
    out = args.out or RESULTS / f"peer_sam_{result['date'][:10]}_{'_'.join(args.graphs)}_{'_'.join(args.presets)}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        ratio = f"  x{r['vs_sam_best']:.2f} SAM's best" if "vs_sam_best" in r else f"  x{r['vs_decoder']:.2f} decoder"
        if "vs_decoder_in_click" in r:
            ratio += f", x{r['vs_decoder_in_click']:.2f} its own decoder call ({r['decoder_in_click_ms']:.1f} ms)"
        print(f"{r['model']:11} {r['runtime']:9} {r['precision']:5} {r['graph']:8} {r['median_ms']:9.1f} ms{ratio}")
    print(f"written {out}")


if __name__ == "__main__":
    run_script(main)
