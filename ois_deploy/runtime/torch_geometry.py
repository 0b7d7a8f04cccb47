"""The click loop's array work in torch, wherever the tensors live (docs/design.md §2.2): the
same geometry as preprocess.py's host functions, so that a PyTorch-family runner on a GPU sends
only the final mask (and logits where asked) back to the host.

Equivalences, checked in tests/test_device_loop.py: bilinear with align_corners=False is cv2's
INTER_LINEAR (both sample at pixel centres, neither antialiases); cv2's INTER_AREA, used when the
image shrinks into the input frame, is a box filter with fractional edges, computed here from
prefix sums; both round to uint8 as cv2 does before the encoder sees the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import Frame, bilinear_rows


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


def fit_to_frame(image: torch.Tensor, frame: Frame) -> torch.Tensor:
    """RGB uint8 [H,W,3] -> float32 [1,3,S,S] in 0..255, resized into the frame (area when
    shrinking, bilinear when growing), rounded like cv2's uint8 output, padded with zeros."""
    h, w = frame.resized
    x = image.permute(2, 0, 1)
    if frame.scale < 1:
        x = _area_resize(_area_resize(x, 1, h), 2, w)
    else:
        x = F.interpolate(x[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    canvas = torch.zeros((1, 3, frame.size, frame.size), dtype=torch.float32, device=image.device)
    canvas[0, :, :h, :w] = x.round().clamp(0, 255)
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
    """logits [1,1,S,S] -> (bool mask [H,W], float32 logits [H,W] or None) on the host. Without
    logits the mask is made in row strips of at most strip_elements floats."""
    h, w = frame.resized
    crop = logits_sxs[0, 0, :h, :w]
    if with_logits:
        full = F.interpolate(crop[None, None], size=(frame.height, frame.width), mode="bilinear",
                             align_corners=False)[0, 0]
        return (full > cut).cpu().numpy(), full.cpu().numpy()
    mask = torch.empty((frame.height, frame.width), dtype=torch.bool, device=crop.device)
    step = max(1, strip_elements // frame.width)
    for start in range(0, frame.height, step):
        stop = min(start + step, frame.height)
        i0, i1, a = (torch.from_numpy(v).to(crop.device) for v in bilinear_rows(start, stop, h, frame.height))
        rows = crop[i0] + (crop[i1] - crop[i0]) * a[:, None]
        rows = F.interpolate(rows[None, None], size=(stop - start, frame.width), mode="bilinear", align_corners=False)
        torch.gt(rows[0, 0], cut, out=mask[start:stop])
    return mask.cpu().numpy(), None
