"""The reference backend: exact softmax over the allowed keys. It is the specification every fast path
is tested against.

Readable on purpose: build the dense keep-mask, hand it to scaled_dot_product_attention (or, when the
attention probabilities are asked for, do the softmax explicitly with the same mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionCall, Backend


class ReferenceBackend(Backend):
    name = "reference"

    def attention(self, call: AttentionCall):
        q = call.query
        k, v = call.expanded_kv()
        keep = call.keep_mask()
        if not call.need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=call.dropout_p, scale=call.scale)
            return out, None
        scores = (q @ k.transpose(-1, -2)) * call.scale
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)  # fully masked rows -> 0
        dropped = F.dropout(probs, p=call.dropout_p) if call.dropout_p > 0 else probs
        return dropped @ v, probs
