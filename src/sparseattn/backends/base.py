"""What a backend receives: one attention call of one layer, with everything needed to build its mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..plans.plan import LayerPlan


@dataclass
class AttentionCall:
    """One layer's attention, as the model hands it over.

    query: (B, H, Lq, D); key, value: (B, H_kv, Lk, D) (H_kv < H for grouped-query attention).
    layout: the batch's layout over the Lk key positions (queries are the last Lq of them).
    model_mask: (B, 1 or H, Lq, Lk) bool from the model (padding, causality), or None for "no mask".
    cache: a dict shared by the layers of one forward pass (masks reused across layers).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    layer_plan: LayerPlan
    layout: TokenLayout
    model_mask: torch.Tensor | None
    scale: float
    dropout_p: float
    cache: dict
    need_weights: bool = False

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    def expanded_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value repeated to the query's number of heads (grouped-query attention)."""
        rep = self.query.shape[1] // self.key.shape[1]
        if rep == 1:
            return self.key, self.value
        return self.key.repeat_interleave(rep, dim=1), self.value.repeat_interleave(rep, dim=1)

    def keep_mask(self) -> torch.Tensor:
        """(B, H', Lq, Lk) bool: the plan's keep-mask for real queries, intersected with the model's mask;
        padding queries keep the model's own row (their output is ignored downstream)."""
        pattern = self.layer_plan.mask(self.layout, self.cache)[:, :, -self.q_len:, :]
        model = self.model_mask
        if model is None:
            return pattern | ~self.layout.real[:, None, -self.q_len:, None]
        real_q = self.layout.real[:, None, -self.q_len:, None]
        return torch.where(real_q, pattern & model, model)


class Backend:
    """A way to run attention under a plan. ``attention`` returns the output (B, H, Lq, D) and the
    attention probabilities (B, H, Lq, Lk) if ``call.need_weights`` (else None)."""

    name = "backend"

    def attention(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError
