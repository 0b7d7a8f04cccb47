"""Facts recorded beside results and artifacts: machine, tool versions, date, file hashes."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path

TOOLS = ("ois-deploy", "torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "onnxslim", "polygraphy", "tensorrt",
         "openvino", "nncf",
         "fastapi", "uvicorn", "httpx", "prometheus-client", "ray")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide which kernels the runtimes pick (recorded beside CPU figures).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8")


def cpu_features() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo ('flags' on x86, 'Features' on ARM; empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith(("flags", "Features"))), set())


def cpu_flags() -> dict:
    """{"model": the CPU's name, flag: present} for CPU_FLAGS (all False where unknown)."""
    flags = cpu_features()
    return {"model": cpu_name(), **{f: f in flags for f in CPU_FLAGS}}


def machine_info() -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["compute_capability"] = f"{props.major}.{props.minor}"
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
