"""Output files: written whole or not at all (temp file + rename), JSON to a path or stdout."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from .errors import UserError


def usual_permissions(path: str | Path) -> None:
    """Give a temp file or folder, about to be renamed onto an output, the mode a plain open() or
    mkdir() would: mkstemp and mkdtemp (and safetensors) make them private (0600, 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A temp file in path's folder, to be renamed onto path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    usual_permissions(tmp)
    return fd, tmp


def staging_dir_beside(path: Path) -> Path:
    """A temp folder in path's folder, to be renamed onto path."""
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    usual_permissions(staging)
    return staging


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output folder does not exist: {path.parent}")
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_image(path: str | Path, rgb_or_gray: np.ndarray) -> bytes:
    """Encode an image for `path` by its extension (checked before any work is written)."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"):
        raise UserError(f"cannot write image {path}: use a .png, .jpg, .bmp, .tif or .webp name")
    img = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(suffix, img)
    if not ok:
        raise UserError(f"cannot encode image for {path}")
    return buf.tobytes()


def write_json(obj, path: str) -> None:
    """`-` writes to stdout (and callers then keep everything else off stdout)."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_bytes(path, text.encode())
