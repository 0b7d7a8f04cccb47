"""The model as the exporters see it: encode() and decode() with the image state spelled out as
plain tensors in the graph contract's order (ois_deploy.contract), for torch.onnx, torch.export
and torch.compile alike; and the reference model an export's graphs were made from.

Below export/ and runtime/ so that both can use them without importing each other.
"""

from __future__ import annotations

from torch import nn

from .ois import OIS, ImageState


class EncoderGraph(nn.Module):
    """encode() with the image state as a tuple (what the exporters and a package return)."""

    def __init__(self, model: OIS):
        super().__init__()
        self.model = model

    def forward(self, image):
        return tuple(self.model.encode(image))


class DecoderGraph(nn.Module):
    """decode() with the image state's tensors as separate inputs, the graph contract's order."""

    def __init__(self, model: OIS):
        super().__init__()
        self.model = model

    def forward(self, image_embed, pyramid_l1, pyramid_l2, pyramid_l3, depth, point_coords, point_labels, prev_mask):
        state = ImageState(image_embed, pyramid_l1, pyramid_l2, pyramid_l3, depth)
        return self.model.decode(state, point_coords, point_labels, prev_mask)


def reference_for(manifest: dict, precision: str, checkpoint: str | None = None) -> OIS:
    """The model the export's graphs were made from, in `precision` (eval mode)."""
    from .weights import reference_model

    model = reference_model(manifest, checkpoint).eval()
    if precision == "fp16":
        from .precision import to_fp16

        model = to_fp16(model)
    return model
