"""The click loop's array work in torch, wherever the tensors live (docs/design.md §2.2): the
same geometry as preprocess.py's host functions, so that a PyTorch-family runner on a GPU sends
only the final mask (and logits where asked) back to the host.

Equivalences, checked in tests/test_device_loop.py: on float logits, bilinear with
align_corners=False is cv2's INTER_LINEAR (both sample at pixel centres, neither antialiases).
The image itself is uint8, where cv2 computes in fixed point: a growing image repeats cv2's
integer arithmetic (equal to the bit); a shrinking one (INTER_AREA: a box filter with fractional
edges) is computed from prefix sums and rounded, one grey level off in a few pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import Frame, bilinear_rows, strips


def _area_resize(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Box-filter x along dim to size (< x.shape[dim]): each output is the mean of its window of
    width n/size, fractional end pixels weighted by their overlap (cv2 INTER_AREA)."""
    n = x.shape[dim]
    if n == size:
        return x.double()
    scale = n / size
    edges = torch.arange(size + 1, dtype=torch.float64, device=x.device) * scale
    edges[-1] = n
    start = torch.clamp(edges.floor().long(), max=n - 1)
    frac = edges - start
    # Prefix sums (integers stay exact in int64) with a zero in front: sum of x[:k] is sums[k].
    sums = torch.cumsum(x, dim, dtype=torch.int64 if not x.is_floating_point() else torch.float64)
    sums = torch.cat([torch.zeros_like(sums.narrow(dim, 0, 1)), sums], dim)
    shape = [1] * x.dim()
    shape[dim] = size + 1
    # Integral of the piecewise-constant row up to each edge, then window sums / width.
    integral = sums.index_select(dim, start).double() + frac.view(shape) * x.index_select(dim, start).double()
    return (integral.narrow(dim, 1, size) - integral.narrow(dim, 0, size)) / scale


def _linear_weights(src: int, dst: int, clamp_fraction: bool) -> tuple[np.ndarray, ...]:
    """cv2's INTER_LINEAR taps and 11-bit weights for uint8 (float32 positions, round half even;
    cv2 zeroes the fraction at the left/right borders but only clamps rows)."""
    f = ((np.arange(dst) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    f = (f - i).astype(np.float32)
    if clamp_fraction:
        f[(i < 0) | (i >= src - 1)] = 0
    one = np.float32(_ONE)
    return (np.clip(i, 0, src - 1), np.clip(i + 1, 0, src - 1),
            np.rint((np.float32(1) - f) * one).astype(np.int64), np.rint(f * one).astype(np.int64))


_ONE = 1 << 11  # cv2's INTER_RESIZE_COEF_SCALE


def _linear_uint8(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[3,H,W] uint8 -> [3,h,w] as cv2.resize INTER_LINEAR gives it for uint8 (growing images)."""
    t = lambda a: torch.from_numpy(a).to(x.device)  # noqa: E731
    x0, x1, a0, a1 = map(t, _linear_weights(x.shape[2], w, True))
    y0, y1, b0, b1 = map(t, _linear_weights(x.shape[1], h, False))
    x = x.long()
    rows = x[:, :, x0] * a0 + x[:, :, x1] * a1  # horizontal pass, scaled by 2^11
    r0, r1 = rows[:, y0] >> 4, rows[:, y1] >> 4
    # cv2's vertical pass for uint8 (VResizeLinear, FixedPtCast): the same shifts and rounding.
    return ((b0[:, None] * r0 >> 16) + (b1[:, None] * r1 >> 16) + 2) >> 2


def fit_to_frame(image: torch.Tensor, frame: Frame) -> torch.Tensor:
    """RGB uint8 [H,W,3] -> float32 [1,3,S,S] in 0..255, resized into the frame as cv2 does on
    the host (area when shrinking, bilinear when growing, uint8 results), padded with zeros."""
    h, w = frame.resized
    x = image.permute(2, 0, 1)
    x = _area_resize(_area_resize(x, 1, h), 2, w).round() if frame.scale < 1 else _linear_uint8(x, h, w)
    canvas = torch.zeros((1, 3, frame.size, frame.size), dtype=torch.float32, device=image.device)
    canvas[0, :, :h, :w] = x.clamp(0, 255)
    return canvas


def logits_to_input_frame(logits: torch.Tensor, size: int) -> torch.Tensor:
    """mask logits [P,1,S',S'] -> float32 [P,1,S,S] (bilinear)."""
    return F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)


def feedback(logits_sxs: torch.Tensor, frame: Frame) -> torch.Tensor:
    """Probability fed back as the next prev_mask [1,1,S,S]; zero outside the resized image."""
    h, w = frame.resized
    prob = torch.zeros_like(logits_sxs)
    prob[..., :h, :w] = torch.sigmoid(logits_sxs[..., :h, :w])
    return prob


def to_image(logits_sxs: torch.Tensor, frame: Frame, cut: float, with_logits: bool,
             strip_elements: int) -> tuple[np.ndarray, np.ndarray | None]:
    """logits [1,1,S,S] -> (bool mask [H,W], float32 logits [H,W] or None) on the host. The mask
    is made in row strips of at most strip_elements floats, as preprocess.mask_to_image does."""
    h, w = frame.resized
    crop = logits_sxs[0, 0, :h, :w]
    mask = torch.empty((frame.height, frame.width), dtype=torch.bool, device=crop.device)
    rows_at = strips(frame, strip_elements)
    for start in rows_at:
        stop = min(start + rows_at.step, frame.height)
        i0, i1, a = (torch.from_numpy(v).to(crop.device) for v in bilinear_rows(start, stop, h, frame.height))
        rows = crop[i0] + (crop[i1] - crop[i0]) * a[:, None]
        rows = F.interpolate(rows[None, None], size=(stop - start, frame.width), mode="bilinear", align_corners=False)
        torch.gt(rows[0, 0], cut, out=mask[start:stop])
    logits = None
    if with_logits:
        logits = F.interpolate(crop[None, None], size=(frame.height, frame.width), mode="bilinear",
                               align_corners=False)[0, 0].cpu().numpy()
    return mask.cpu().numpy(), logits
