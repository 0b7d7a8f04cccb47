"""The one interface every backend implements: encode an image once, decode per click.

A backend subclasses Runner and implements `_encode` and `_decode` (and, where its state is not
numpy arrays, the state hand-over). The base class owns what all of them share: synchronising
device work before a clock is read, the timing hook, and use as a context manager. Nothing
outside a backend's module patches or probes a runner.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np

from ..presets import OISConfig

TimingHook = Callable[[str, float], None]  # (what: "encode" | "decode", milliseconds)


class Runner(ABC):
    """Runs the encoder and decoder halves of one model on one backend.

    encode(image [1,3,S,S] float32, RGB 0..255, padded) -> an opaque image state, kept wherever
    the backend keeps it (host or device memory). decode(state, coords [P,N,2] float32 in the SxS
    frame, labels [P,N] int32 (1 positive, 0 negative, -1 padding), prev_mask [P,1,S,S] float32
    probability) -> mask logits [P,1,S',S'] float32 on the host.

    Runners may be shared across threads where the backend allows it (`thread_safe`); a
    Predictor, which holds one click session, may not.
    """

    name: str = "runner"  # the registry name of the backend
    thread_safe: bool = True

    def __init__(self, cfg: OISConfig, precision: str, device: str = "cpu", notes: list[str] | None = None):
        self.cfg = cfg
        self.precision = precision
        self.device = device
        self.notes = list(notes or [])
        self.last_ms: dict[str, float] = {}
        self._hooks: list[TimingHook] = []

    # -- what a backend implements ---------------------------------------------------------
    @abstractmethod
    def _encode(self, image: np.ndarray) -> Any: ...

    @abstractmethod
    def _decode(self, state: Any, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray: ...

    def state_to_numpy(self, state: Any) -> dict[str, np.ndarray]:
        """The image state as float32 host arrays, by the contract's names."""
        return {k: np.asarray(v, np.float32) for k, v in state.items()}

    def state_from_numpy(self, arrays: dict[str, np.ndarray]) -> Any:
        """An image state from host arrays (another process's encode, a cache): the inverse of
        state_to_numpy, cast to what this backend's decoder takes."""
        return {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op for host backends)."""

    def close(self) -> None:
        """Release sessions, engines and device memory."""

    # -- shared ------------------------------------------------------------------------------
    @property
    def on_gpu(self) -> bool:
        return str(self.device).startswith("cuda")

    def encode(self, image: np.ndarray) -> Any:
        start = time.perf_counter()
        state = self._encode(image)
        self.synchronize()
        self._timed("encode", start)
        return state

    def decode(self, state: Any, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        logits = self._decode(state, coords, labels, prev_mask)
        self.synchronize()
        self._timed("decode", start)
        return logits

    def add_timing_hook(self, hook: TimingHook) -> Callable[[], None]:
        """Call hook(kind, ms) after every encode and decode; returns a function that removes it."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    def _timed(self, kind: str, start: float) -> None:
        ms = (time.perf_counter() - start) * 1000
        self.last_ms[kind] = ms
        for hook in self._hooks:
            hook(kind, ms)

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.cfg.name} {self.precision} on {self.device}>"
