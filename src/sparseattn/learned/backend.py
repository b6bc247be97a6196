"""Attention with learnable soft windows: the reference backend's math with a differentiable gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends.base import AttentionCall, Backend
from ..backends.reference import ReferenceBackend
from .soft_window import SoftNeighbourDegrees


class SoftWindowBackend(Backend):
    """Exact softmax with logits + log w (the soft window of the layer's learnable degrees).
    Layers that do not learn a window run the reference backend under the plan (dense by default)."""

    name = "soft_window"

    def __init__(self, degrees: SoftNeighbourDegrees):
        self.degrees = degrees
        self.reference = ReferenceBackend()

    def attention(self, call: AttentionCall):
        layer = call.layer_plan.layer
        if not self.degrees.learns(layer):
            return self.reference.attention(call)
        q = call.query
        k, v = call.expanded_kv()
        bias = self.degrees.log_window(call.layout, layer)[:, :, -call.q_len:, :]  # (B, H, Lq, Lk)
        if call.model_mask is not None:
            real_q = call.layout.real[:, None, -call.q_len:, None]
            # padding queries: the model's own row, ungated (their output is ignored)
            bias = torch.where(real_q, bias, torch.zeros_like(bias)).masked_fill(~call.model_mask, float("-inf"))
        bias = bias.to(q.dtype)
        if not call.need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=call.dropout_p, scale=call.scale)
            return out, None
        scores = (q @ k.transpose(-1, -2)) * call.scale + bias
        probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
        dropped = F.dropout(probs, p=call.dropout_p) if call.dropout_p > 0 else probs
        return dropped @ v, probs
