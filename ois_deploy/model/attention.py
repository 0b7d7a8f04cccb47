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
    """Attention with separate q/k/v projections (the decoder's cross- and self-attention).

    `absorb` names the side with many tokens in a cross-attention between a few click tokens
    and the image tokens (docs/design.md §2.5): "keys" (clicks read the image) or "queries" (the
    image reads the clicks). The projections of that side are folded into the few click tokens
    instead of applied to every image token: the same function up to float rounding, in
    O(heads x clicks x tokens x width) instead of O(tokens x width^2), with no per-head
    re-layout of the image tokens. It is used where it costs no more at max_clicks
    (decoder_absorbs); the `fused` form always projects (ONNX's Attention op takes Q, K, V)."""

    def __init__(self, dim: int, num_heads: int, absorb: str | None = None):
        super().__init__()
        if absorb not in (None, "keys", "queries"):
            raise ValueError("absorb must be None, 'keys' or 'queries'")
        self.num_heads = num_heads
        self.absorb = absorb
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.impl = "sdpa"

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _per_head(self, linear: nn.Linear) -> Tensor:
        """A projection's weight [C,C] as [H,d,C]: head h's rows."""
        c = linear.weight.shape[1]
        return linear.weight.reshape(self.num_heads, c // self.num_heads, c)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        """q [B,Nq,C]; k, v [B or 1,Nk,C]; bias [B, Nq or 1, Nk] added to every head."""
        if self.absorb == "keys" and self.impl != "fused":
            return self._keys_absorbed(q, k, v, bias)
        if self.absorb == "queries" and self.impl != "fused":
            return self._queries_absorbed(q, k, v, bias)
        b, nq, c = q.shape
        out = attend(
            self._heads(self.q_proj(q)),
            self._heads(self.k_proj(k)),
            self._heads(self.v_proj(v)),
            None if bias is None else bias.unsqueeze(1),
            self.impl,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, c))

    def _keys_absorbed(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """Few queries, many keys: Q_h.K_h^T = (Q_h W_k,h).k^T + Q_h.b_k,h, whose last term is the
        same for every key of a row, so the softmax drops it; A_h.V_h = (A_h.v) W_v,h^T + b_v,h,
        as softmax rows sum to 1. Logits and softmax in float32 (the FP32 island)."""
        b, nq, c = q.shape
        h = self.num_heads
        scale = 1.0 / math.sqrt(c // h)
        q_read = self._heads(self.q_proj(q)).float() @ self._per_head(self.k_proj).float()  # [B,H,Nq,C]
        logits = (q_read * scale).reshape(b, h * nq, c) @ k.float().transpose(-1, -2)  # [B,H*Nq,Nk]
        logits = logits.reshape(b, h, nq, -1)
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        weights = logits.softmax(dim=-1).to(v.dtype).reshape(b, h * nq, -1)
        read = (weights @ v).reshape(b, h, nq, c)  # [B,H,Nq,C]: each head's average of v
        out = read @ self._per_head(self.v_proj).transpose(-1, -2) + self._heads(self.v_proj.bias.expand(1, 1, c))
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, c))

    def _queries_absorbed(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """Many queries, few keys: logits_h = q.(W_q,h^T K_h^T) + b_q,h.K_h^T, and the output
        projection applied to V per head first: out = sum_h A_h.(V_h W_o,h^T) + b_o."""
        b, nq, c = q.shape
        h = self.num_heads
        scale = 1.0 / math.sqrt(c // h)
        keys = self._heads(self.k_proj(k)).float()  # [B,H,Nk,d]
        nk = keys.shape[2]
        query_weight = (keys @ self._per_head(self.q_proj).float()).reshape(-1, h * nk, c)  # [B,H*Nk,C]
        query_bias = (keys @ self.q_proj.bias.float().reshape(h, -1, 1)).reshape(-1, 1, h * nk)
        logits = (q.float() @ (query_weight * scale).transpose(-1, -2) + query_bias * scale).reshape(b, nq, h, nk)
        if bias is not None:
            logits = logits + bias.unsqueeze(2)
        weights = logits.softmax(dim=-1).to(v.dtype).reshape(b, nq, h * nk)
        out_weight = self.out_proj.weight.reshape(c, h, c // h).permute(1, 2, 0)  # [H,d,C]: W_o,h^T
        values = (self._heads(self.v_proj(v)) @ out_weight).reshape(-1, h * nk, c)  # [B,H*Nk,C]
        return weights @ values + self.out_proj.bias


def set_attention_impl(module: nn.Module, impl: str) -> None:
    """Switch every attention of a model between its forms (ATTENTION_IMPLS)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}")
    for m in module.modules():
        if hasattr(m, "impl") and isinstance(m.impl, str):
            m.impl = impl
