"""full(): dense attention over the allowed pairs (the identity of sparsification)."""

from __future__ import annotations

import torch

from .base import Pattern, register


class Full(Pattern):
    name = "full"
    symmetric = True

    def relation(self, layout, *, layer, num_heads):
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=layout.device).expand(
            layout.batch_size, 1, layout.length, layout.length)

    def relation_rows(self, layout, rows, *, layer, num_heads):
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=layout.device).expand(
            layout.batch_size, 1, rows.shape[0], layout.length)

    def index_relation(self):
        return lambda q, kv: (q >= 0) | (kv >= 0)

    def spec(self):
        return "full()"


@register
def full() -> Pattern:
    """Every allowed pair: dense attention (a plan of full() leaves the model unchanged)."""
    return Full()
