"""What a backend receives: one attention call of one layer, with everything needed to build its mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..layout import TokenLayout
from ..plans.plan import LayerPlan


def sdpa_without_cudnn():
    """A context in which SDPA picks among flash, memory-efficient and math attention but not cuDNN's, which builds a
    new plan for every key length: a growing KV cache changes it at every decoding step (docs/generation.md)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass
class AttentionCall:
    """One layer's attention, as the model hands it over.

    query: (B, H, Lq, D); key, value: (B, H_kv, Lk, D) (H_kv < H for grouped-query attention).
    layout: the batch's layout over the Lk key positions; the queries are Lq of them, from index ``q_offset``.
    model_mask: (B, 1 or H, Lq, Lk) bool from the model (padding, causality), or None for "no mask".
    cache: a dict shared by the layers of one forward pass (masks reused across layers).
    q_offset: the index among the keys of the first query: None for the last Lq (a full forward pass, a dynamic
        cache), an int or a 0-d int64 tensor otherwise (a static cache fills slots from the tokens seen so far,
        a count it holds on the device).
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
    q_offset: int | torch.Tensor | None = None

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def incremental(self) -> bool:
        """Whether the queries are not all the keys (decoding with a KV cache)."""
        return self.q_len != self.key.shape[2] or (self.q_offset is not None and
                                                   (isinstance(self.q_offset, torch.Tensor) or self.q_offset != 0))

    def query_rows(self) -> torch.Tensor:
        """(Lq,) int64: the queries' indices among the keys."""
        key = ("query_rows", self.key.shape[2], self.q_len)
        if key not in self.cache:
            start = self.key.shape[2] - self.q_len if self.q_offset is None else self.q_offset
            self.cache[key] = torch.arange(self.q_len, device=self.query.device) + start
        return self.cache[key]

    def expanded_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value repeated to the query's number of heads (grouped-query attention)."""
        rep = self.query.shape[1] // self.key.shape[1]
        if rep == 1:
            return self.key, self.value
        return self.key.repeat_interleave(rep, dim=1), self.value.repeat_interleave(rep, dim=1)

    def keep_mask(self) -> torch.Tensor:
        """(B, H', Lq, Lk) bool: the plan's keep-mask for real queries, intersected with the model's mask;
        padding queries keep the model's own row (their output is ignored downstream). Incremental calls compute
        only the queries' rows of the plan (``LayerPlan.mask_rows``): nothing Lk x Lk is made."""
        if self.incremental:
            rows = self.query_rows()
            pattern = self.layer_plan.mask_rows(self.layout, rows, self.cache)
            real_q = self.layout.real[:, None, rows, None]
        else:
            pattern = self.layer_plan.mask(self.layout, self.cache)
            real_q = self.layout.real[:, None, :, None]
        model = self.model_mask
        if model is None:
            return pattern | ~real_q
        return torch.where(real_q, pattern & model, model)


class Backend:
    """A way to run attention under a plan. ``attention`` returns the output (B, H, Lq, D) and the
    attention probabilities (B, H, Lq, Lk) if ``call.need_weights`` (else None)."""

    name = "backend"

    def attention(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError
