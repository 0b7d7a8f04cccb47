"""The one interface every backend implements: encode an image once, decode per click.

A backend subclasses Runner and implements `_encode` and `_decode` (and, where its state is not
numpy arrays, the state hand-over). The base class owns what all of them share: synchronising
device work before a clock is read, the timing hook, use as a context manager, and the click loop
around the decoder on the host (image into the input frame, previous-mask feedback, threshold,
resize to the image); a backend that can run that loop where its decoder runs overrides
`encode_frame`, `empty_prev`, `prev_from_numpy`, `decode_to_image` and `decode_prompts` (the
PyTorch family does). Nothing outside a backend's module patches or probes a runner.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np

from ..errors import UserError
from ..presets import OISConfig
from .preprocess import Frame, feedback, logit_cut, logits_to_image, logits_to_input_frame, mask_to_image, scratch, to_input

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
        self._no_prev = np.zeros((0, 1, cfg.input_size, cfg.input_size), np.float32)  # empty_prev's zeros

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

    def profile_decode(self, state: Any, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray,
                       calls: int) -> dict:
        """The runtime's own per-node times of `calls` decoder calls on these inputs, summed by
        node type (runtime.profiling.summarise); backends whose runtime has a profiler implement
        it, and need opening with profile=True."""
        raise UserError(f"backend {self.name} has no per-node profile (openvino and ort have)")

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op for host backends)."""

    def close(self) -> None:
        """Release sessions, engines and device memory."""

    # -- shared ------------------------------------------------------------------------------
    @property
    def on_gpu(self) -> bool:
        return str(self.device).startswith("cuda")

    def encode(self, image: np.ndarray) -> Any:
        return self._measured("encode", self._encode, image)

    def decode(self, state: Any, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        return self._measured("decode", self._decode, state, coords, labels, prev_mask)

    # -- the click loop around the decoder (docs/design.md §2.2); on the host here -----------
    def encode_frame(self, image: np.ndarray, frame: Frame) -> Any:
        """RGB uint8 HxWx3 -> its image state: resized into the SxS frame, padded, encoded."""
        return self.encode(to_input(image, frame.size)[0])

    def empty_prev(self, prompts: int = 1) -> Any:
        """The previous-mask probability before the first click: [P,1,S,S] zeros, the first P of
        one array kept for the largest P asked so far (shared: never written). A new array on
        every click or SAT chunk cost a page fault per 4 KiB page as the decoder read it."""
        if len(self._no_prev) < prompts:
            s = self.cfg.input_size
            self._no_prev = np.zeros((prompts, 1, s, s), np.float32)
        return self._no_prev[:prompts]

    def prev_from_numpy(self, prob: np.ndarray) -> Any:
        """A previous-mask probability [1,1,S,S] from host memory, where decode_to_image takes it."""
        return np.ascontiguousarray(prob, np.float32)

    def decode_to_image(self, state: Any, frame: Frame, coords: np.ndarray, labels: np.ndarray, prev: Any,
                        threshold: float = 0.5, with_logits: bool = True) -> tuple[np.ndarray, np.ndarray | None, Any]:
        """One prompt set (coords [1,N,2] in the input frame, labels [1,N]) and the previous mask
        -> (bool mask [H,W] on the host, float32 logits [H,W] or None, the next previous mask).
        Logits stay at the input frame until the final resize; the mask is made in strips, with
        no float array of the image's size, the same with or without logits."""
        size = self.cfg.input_size
        logits_sxs = logits_to_input_frame(self.decode(state, coords, labels, prev)[0, 0], size,
                                           scratch("logits_sxs", (size, size)))
        logits = logits_to_image(logits_sxs, frame) if with_logits else None
        return mask_to_image(logits_sxs, frame, logit_cut(threshold)), logits, feedback(logits_sxs, frame)

    def decode_prompts(self, state: Any, coords: np.ndarray, labels: np.ndarray) -> Any:
        """P prompt sets without a previous mask (SAT) -> logits [P,1,S',S'] wherever the backend
        keeps them; on the host the empty previous mask is empty_prev's (made once, not per call)."""
        return self.decode(state, coords, labels, self.empty_prev(len(coords)))

    def add_timing_hook(self, hook: TimingHook) -> Callable[[], None]:
        """Call hook(kind, ms) after every encode and decode; returns a function that removes it."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    def _measured(self, kind: str, fn: Callable, *args) -> Any:
        """fn(*args), its device work finished, timed as `kind` for last_ms and the hooks."""
        start = time.perf_counter()
        out = fn(*args)
        self.synchronize()
        ms = (time.perf_counter() - start) * 1000
        self.last_ms[kind] = ms
        for hook in self._hooks:
            hook(kind, ms)
        return out

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.cfg.name} {self.precision} on {self.device}>"
