"""Multi-head attention with additive bias, and the masking rules of docs/design.md §2.5.

Three forms of the same function:
- "sdpa": eager PyTorch, SDPA in the activation dtype (its fused kernels accumulate Q.K^T and
  the softmax in float32 internally);
- "matmul": the export's default, the pattern TensorRT fuses: Q is scaled before the first
  MatMul, then MatMul -> Add(bias) -> Softmax -> MatMul, logits and softmax in float32;
- "fused": `export --attention fused`, one SDPA call on float32 Q, K, V and mask, which the
  exporter writes as one ONNX Attention node (opset 23) with float32 inputs.
The exported forms keep the attention logits and softmax in float32 whatever the activation
dtype (the FP32 island of docs/design.md §4, checked by lint); in an fp32 model the casts are
no-ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_IMPLS = ("matmul", "sdpa", "fused")


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, impl: str = "matmul") -> Tensor:
    """q [B,H,Nq,d], k/v [B or 1,H,Nk,d], bias broadcastable to [B,H,Nq,Nk] (float32)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "fused":  # ONNX's Attention computes in its inputs' dtype: float32 in, float32 logits
        return attend(q.float(), k.float(), v.float(), bias, "sdpa").to(v.dtype)
    if impl == "sdpa":
        # Broadcasts spelled out as views: ONNX Runtime's Attention op wants K/V at Q's batch
        # and a mask with Q's sequence length.
        k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        mask = None if bias is None else bias.to(q.dtype).expand(q.shape[0], -1, q.shape[2], -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    logits = (q.float() * scale) @ k.float().transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).to(v.dtype) @ v


def masked_bias(allowed: Tensor, mask_value: float) -> Tensor:
    """Turn a {0,1} 'may attend' map [..., Nk] into an additive bias of 0 / mask_value.

    A row with nothing allowed falls back to plain attention (all allowed), so a softmax
    row never sees only masked entries: no NaN, in float16 too. mask_value is finite.
    """
    allowed = allowed.float()
    empty_row = 1.0 - allowed.amax(dim=-1, keepdim=True)
    allowed = torch.maximum(allowed, empty_row)
    return (1.0 - allowed) * mask_value


class Attention(nn.Module):
    """Attention with separate q/k/v projections (the decoder's cross- and self-attention)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.impl = "sdpa"

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        """q [B,Nq,C]; k, v [B or 1,Nk,C]; bias [B, Nq or 1, Nk] added to every head."""
        b, nq, c = q.shape
        out = attend(
            self._heads(self.q_proj(q)),
            self._heads(self.k_proj(k)),
            self._heads(self.v_proj(v)),
            None if bias is None else bias.unsqueeze(1),
            self.impl,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, c))


def set_attention_impl(module: nn.Module, impl: str) -> None:
    """Switch every attention of a model between its forms (ATTENTION_IMPLS)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}")
    for m in module.modules():
        if hasattr(m, "impl") and isinstance(m.impl, str):
            m.impl = impl
