"""Output files: written whole or not at all (temp file + rename), JSON to a path or stdout."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
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
    if suffix not in IMAGE_SUFFIXES:
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


# --- Output paths, checked before any work (every command calls check_outputs first) ---

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _writable_folder(folder: Path) -> bool:
    """os.access, then a real probe: access() trusts mode bits that ACLs, read-only mounts or
    dropped capabilities may overrule."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ois-deploy-probe.")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _check_parent(path: Path, what: str) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{what}: output folder does not exist: {parent}")
    if not _writable_folder(parent):
        raise UserError(f"{what}: cannot write in {parent} (permission denied)")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return (a.exists() and b.exists() and os.path.samefile(a, b)) or a.resolve() == b.resolve()
    except OSError:
        return False


def check_output_file(path: str, what: str = "output", inputs=(), image: bool = False) -> Path:
    """An output file: not empty, not a folder, in an existing writable folder, not an input.
    `-` (stdout) is for --json only and is left to the caller."""
    if not str(path).strip():
        raise UserError(f"{what}: the output path is empty")
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what}: {p} is a folder, not a file")
    if image and p.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{what}: cannot write image {p}: use a .png, .jpg, .bmp, .tif or .webp name")
    _check_parent(p, what)
    for source in inputs:
        if source is None or not str(source).strip():
            continue
        if _same_file(p, Path(source)):
            raise UserError(f"{what}: {p} is also an input; give another output path")
        if Path(source).is_dir() and Path(source).resolve() in p.resolve().parents:
            raise UserError(f"{what}: {p} is inside the input folder {source}; give another output path")
    return p


def check_output_folder(path: str, what: str = "output folder", replace: str | None = None) -> Path:
    """An output folder: an existing writable folder, or one that can be made in an existing
    writable folder. replace: a folder that is replaced as a whole must be empty or hold
    `replace` (the marker file of what is written there, e.g. manifest.json)."""
    if not str(path).strip():
        raise UserError(f"{what}: the output path is empty")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what}: {p} exists and is not a folder")
    if p.is_dir() and replace is not None and any(p.iterdir()) and not (p / replace).is_file():
        raise UserError(f"{what}: {p} is a folder that holds other files (no {replace}); refusing to replace it")
    if p.is_dir() and replace is None:
        if not _writable_folder(p):
            raise UserError(f"{what}: cannot write in {p} (permission denied)")
    else:
        _check_parent(p, what)
    return p


def check_outputs(*paths: str | None) -> None:
    """No two outputs of one command may be the same path."""
    seen = {}
    for path in paths:
        if path is None or path == "-":
            continue
        key = os.path.abspath(path)
        if key in seen:
            raise UserError(f"{path} is given as two outputs")
        seen[key] = path


# --- Folders written whole: staged beside the target, swapped in when complete, locked ---

_HELD_LOCKS: set[tuple[str, int]] = set()  # (lock file, thread) held by this process


@contextlib.contextmanager
def folder_lock(target: Path):
    """An exclusive lock on `target` (flock on a sibling .NAME.lock), refused at once if another
    process (or thread) holds it; re-entrant within one thread."""
    import fcntl
    import threading

    target = Path(target)
    lock_path = target.parent / f".{target.name}.lock"
    key = (os.path.abspath(lock_path), threading.get_ident())
    if key in _HELD_LOCKS:
        yield
        return
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another process is writing {target} (lock {lock_path} is held); try again when it ends") from None
        # The holder before us may have removed the file after we opened it: lock the current one.
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _HELD_LOCKS.add(key)
    try:
        with _signals_as_interrupt():  # so that SIGINT and SIGTERM go through the clean-ups below
            yield
    finally:
        _HELD_LOCKS.discard(key)
        Path(lock_path).unlink(missing_ok=True)  # while still locked, so no one else holds it
        os.close(fd)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM during a few renames, so that Ctrl-C cannot land between them."""
    signals = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_received: set[int] = set()  # SIGINT/SIGTERM received while a folder lock is held (main thread)


def _interrupt(signum, frame):
    _received.add(signum)
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _signals_as_interrupt():
    """SIGINT and SIGTERM end the process through the clean-ups (main thread only). A library
    that swallows the KeyboardInterrupt (a bare except in an exporter) does not swallow the
    signal: it is remembered, and raise_if_interrupted raises it again before a folder is
    replaced."""
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is _interrupt:
        yield
        return
    _received.clear()
    # a signal the process was started to ignore (nohup, a background job's SIGINT) stays ignored
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a signal came since the folder lock was taken."""
    if _received:
        raise KeyboardInterrupt(f"signal {min(_received)}")


def replace_folder(staging: Path, target: Path) -> None:
    """Move the complete `staging` onto `target`: an old target is renamed aside, the new one
    renamed in, then the old one removed. Signals are held meanwhile."""
    with _signals_deferred():
        if target.exists():
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.rename(target, aside)  # onto the empty folder mkdtemp made
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(aside, target)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(staging, target)


def _remove_stale_staging(target: Path) -> None:
    """Folders a killed writer (SIGKILL, power loss) left beside `target`: with the lock held,
    no one else is writing them. Killed between the two renames of replace_folder, the old
    folder is aside and `target` missing: it is put back first."""
    made_here = re.compile(rf"\.{re.escape(target.name)}\.(old\.)?[a-z0-9_]{{8}}")  # mkdtemp's names
    leftovers = [p for p in target.parent.iterdir() if made_here.fullmatch(p.name) and p.is_dir()]
    aside = [p for p in leftovers if p.name.startswith(f".{target.name}.old.")]
    if aside and not target.exists():
        os.rename(aside[0], target)
        leftovers.remove(aside[0])
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: str | Path):
    """Yield a temp folder beside `target` to write into; on success it replaces `target`
    whole. On an error, Ctrl-C or SIGTERM the staging folder is removed and `target` is left as
    it was. Holds folder_lock(target) throughout."""
    target = Path(target)
    with folder_lock(target):
        _remove_stale_staging(target)
        staging = staging_dir_beside(target)
        try:
            yield staging
            raise_if_interrupted()  # a Ctrl-C that a library swallowed still leaves `target` as it was
            replace_folder(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
