"""TensorRT engines of the exported graphs, built through Polygraphy's backend API.

Networks are strongly typed: precision comes from the graph, so the FP32 islands of the fp16
graphs survive, and one code path serves TensorRT 10 and 11 (11 has no FP16 builder flag).
The decoder engine has two optimisation profiles: interactive (P = 1, N = 1..max clicks) and
SAT (P = 1..max prompts, N = 1); the runner (ois_deploy.runtime.trt_backend) picks one per call.
Graphs exported with --attention fused (ONNX Attention, opset 23) need a TensorRT whose parser
imports that op (10.14 and later) and are refused with one line before. tensorrt is imported only
when an engine is built.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..contract import check_graph, graph_file, manifest_config, read_manifest, write_manifest
from ..errors import UserError, first_line
from ..io import atomic_write_bytes
from ..provenance import now_utc, sha256_file
from ..runtime.profiles import decoder_profiles, encoder_profile
from ..runtime.trt_backend import ENGINE_FILES, engine_mismatches, import_tensorrt, runtime_info


FUSED_ATTENTION_SINCE = (10, 14)  # TensorRT's CHANGELOG, 10.14 GA: "Parsers: Added support for the Attention operator"


def version_tuple(text: str) -> tuple[int, ...]:
    """'10.9.0.34' -> (10, 9, 0, 34); stops at the first part that is not a number ('11.0.0rc1' -> (11, 0))."""
    parts = []
    for part in str(text).split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def check_attention(manifest: dict, tensorrt_version: str, export_dir: Path) -> None:
    """Fused-attention graphs only where TensorRT's ONNX parser imports the Attention op."""
    if manifest.get("attention") == "fused" and version_tuple(tensorrt_version) < FUSED_ATTENTION_SINCE:
        raise UserError(f"{export_dir} has fused attention (ONNX Attention, opset 23), which TensorRT parses from 10.14 "
                        f"on; this is TensorRT {tensorrt_version}: export with --attention matmul for it")


def parse_onnx(trt, path: Path):
    """(builder, network, parser) of a strongly typed network parsed from path. A parse failure
    names the parser's own first error (Polygraphy's loader logs them and raises a generic line)."""
    from polygraphy.backend.trt import CreateNetwork

    builder, network = CreateNetwork(strongly_typed=True)()
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.WARNING))
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT could not parse {path.name}: {errors[0] if errors else 'not a readable ONNX model'}")
    return builder, network, parser


def build_engines(
    export_dir: str | Path,
    precision: str = "fp16",
    max_clicks: int | None = None,
    max_prompts: int = 256,
    timing_cache: str | None = None,
    workspace_gib: float | None = None,
    opt_level: int | None = None,
    rebuild: bool = False,
    progress=None,
) -> dict:
    """Build encoder.plan and decoder.plan from the precision's graphs; record them in the manifest."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    cfg = manifest_config(manifest)
    max_clicks = max_clicks or cfg.decoder.max_clicks
    profiles = {"encoder": [encoder_profile(cfg)], "decoder": decoder_profiles(cfg, max_clicks, max_prompts)}
    if precision not in manifest["precisions"]:
        raise UserError(f"{export_dir} has no {precision} graphs: export with --precision {precision} or both")
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise UserError("--opt-level must be 0..5")
    trt = import_tensorrt()
    runtime = runtime_info()
    check_attention(manifest, runtime["tensorrt"], export_dir)
    graphs = {role: export_dir / graph_file(role, precision) for role in ENGINE_FILES}
    for path in graphs.values():
        check_graph(path, manifest)
    hashes = {path.name: manifest["graphs"][path.name]["sha256"] for path in graphs.values()}
    old = manifest.get("engines")
    if old and not rebuild and old.get("precision") == precision and not engine_mismatches(old, runtime, hashes):
        return manifest  # up to date

    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile

    step = progress or (lambda text: None)
    files, seconds = {}, {}
    for role, path in graphs.items():
        step(f"build {ENGINE_FILES[role]} from {path.name}")
        trt_profiles = []
        for shapes in profiles[role]:
            profile = Profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.add(name, min=lo, opt=opt, max=hi)
            trt_profiles.append(profile)
        options = {"profiles": trt_profiles, "load_timing_cache": timing_cache}
        if workspace_gib:
            options["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_gib * 1024**3)}
        if opt_level is not None:
            options["builder_optimization_level"] = opt_level
        start = time.perf_counter()
        network = parse_onnx(trt, path)
        try:
            data = EngineBytesFromNetwork(network, CreateConfig(**options), save_timing_cache=timing_cache)()
        except Exception as e:
            raise UserError(f"TensorRT could not build {path.name}: {first_line(e)}") from None
        seconds[role] = round(time.perf_counter() - start, 1)
        target = export_dir / ENGINE_FILES[role]
        atomic_write_bytes(target, bytes(data))
        files[target.name] = sha256_file(target)
    manifest["engines"] = {
        **runtime,
        "precision": precision,
        "graphs": hashes,
        "files": files,
        "profiles": {role: [{k: [list(s) for s in v] for k, v in p.items()} for p in ps] for role, ps in profiles.items()},
        "max_clicks": max_clicks,
        "max_prompts": max_prompts,
        "flags": {"strongly_typed": True, "workspace_gib": workspace_gib, "opt_level": opt_level,
                  "timing_cache": timing_cache},
        "build_seconds": seconds,
        "date": now_utc(),
    }
    write_manifest(export_dir, manifest)
    return manifest
