"""Learnable neighbour degrees: one soft window per (layer, head), its expected density, and export.

Breaking BERT's third contribution (inspired by irregular LDPC codes): instead of one neighbour degree
for every head, learn each head's degree while penalizing density. Our parameterization:

    w_ij(d, T) = sigmoid((d - |i - j| + 1/2) / T)          (soft window of radius d, temperature T)
    p_ij      ∝ w_ij · exp(q_i·k_j / sqrt(D))               (attention with the window as a gate)

so the attention logits get the bias log w_ij. As T -> 0, w_ij -> 1[|i - j| < d + 1/2], which is
exactly `neighbour(k)` with k = floor(d + 1/2), d rounded to the nearest integer: the half in the
numerator puts each integer degree in the middle of its interval, so a degree of exactly k is the
hard window k at every temperature's limit. Global tokens (the first g) keep w = 1 in both directions, and the diagonal is always kept.

The *expected density* of a head on a batch is the mean of w_ij over its allowed pairs (the same pairs
`sparseattn.sparsity` counts), and the model's expected density is the allowed-pair-weighted mean over
layers and heads, so 1 - expected density is the expected sparsity in the toolkit's one definition.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..layout import TokenLayout
from ..patterns import global_tokens as global_tokens_pattern
from ..patterns import neighbour
from ..plans.plan import Plan, Rule


class SoftNeighbourDegrees(nn.Module):
    """Learnable neighbour degrees d[layer, head] >= 0 with a temperature.

    num_layers, num_heads: the model's shape. init_degree: starting radius for every head.
    global_tokens: the first g tokens stay global (fixed, not learned). temperature: T of the soft window.
    layers: which layers learn a window (others stay dense); default all.
    """

    def __init__(self, num_layers: int, num_heads: int, *, init_degree: float = 32.0, global_tokens: int = 1,
                 temperature: float = 4.0, layers: list[int] | None = None):
        super().__init__()
        if init_degree < 0:
            raise ValueError(f"init_degree must be >= 0, got {init_degree}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if global_tokens < 0:
            raise ValueError(f"global_tokens must be >= 0, got {global_tokens}")
        self.num_layers, self.num_heads = num_layers, num_heads
        self.layers = sorted(set(range(num_layers) if layers is None else layers))
        bad = [l for l in self.layers if not 0 <= l < num_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range for a model with {num_layers} layers")
        self.degree = nn.Parameter(torch.full((num_layers, num_heads), float(init_degree)))
        self.global_tokens = global_tokens
        self.temperature = temperature

    def learns(self, layer: int) -> bool:
        return layer in self.layers

    def degrees(self) -> torch.Tensor:
        """(layers, heads) current degrees, clamped at 0 for reporting (a negative radius means 'diagonal
        only'). The window uses the raw parameter, so a head at or below 0 still gets gradients and can
        widen again."""
        return self.degree.clamp(min=0)

    def _distances_and_fixed(self, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, L, L) |i - j| over real-token positions, and the pairs every window keeps: the diagonal
        and the global tokens' rows and columns."""
        p = layout.positions
        dist = (p[:, None, :, None] - p[:, None, None, :]).abs()
        fixed = layout.diagonal()
        if self.global_tokens:
            glob = layout.real & (p < self.global_tokens)
            fixed = fixed | glob[:, None, :, None] | glob[:, None, None, :]
        return dist, fixed

    def window(self, layout: TokenLayout, layer: int) -> torch.Tensor:
        """(B, H, L, L) soft keep-weights in [0, 1] for one layer: 1 on the diagonal and for global tokens,
        0 on pairs that are not allowed (padding, a decoder's future)."""
        dist, fixed = self._distances_and_fixed(layout)
        d = self.degree[layer][None, :, None, None]
        w = torch.sigmoid((d - dist.to(self.degree.dtype) + 0.5) / self.temperature)
        w = torch.where(fixed, torch.ones_like(w), w)
        return w * layout.allowed()

    def log_window(self, layout: TokenLayout, layer: int) -> torch.Tensor:
        """The attention-logit bias log w (B, H, L, L); -inf where w is 0."""
        w = self.window(layout, layer)
        return torch.log(w.clamp(min=torch.finfo(w.dtype).tiny)).masked_fill(w == 0, float("-inf"))

    def expected_kept(self, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected kept pairs, allowed pairs) over all layers and heads of this batch, the first
        differentiable in the degrees; dense layers keep all their allowed pairs."""
        allowed = layout.allowed().sum().to(self.degree.dtype)
        kept = []
        for layer in range(self.num_layers):
            kept.append(self.window(layout, layer).sum() / self.num_heads if self.learns(layer) else allowed)
        return torch.stack(kept).sum(), allowed * self.num_layers

    def hard_kept(self, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, allowed) pairs of this batch under the exported plan (the T -> 0 windows of the current
        degrees), in ``expected_kept``'s units (heads averaged, layers summed), as device tensors (no host
        sync); not differentiable."""
        dist, fixed = self._distances_and_fixed(layout)
        allowed_mask = layout.allowed()
        allowed = allowed_mask.sum().to(self.degree.dtype)
        hard = self.hard_degrees()
        kept = []
        for layer in range(self.num_layers):
            if self.learns(layer):
                keep = (dist <= hard[layer][None, :, None, None]) | fixed
                kept.append((keep & allowed_mask).sum().to(self.degree.dtype) / self.num_heads)
            else:
                kept.append(allowed)
        return torch.stack(kept).sum(), allowed * self.num_layers

    def expected_density(self, layout: TokenLayout) -> torch.Tensor:
        """Scalar: the expected fraction of this batch's allowed pairs kept, over all layers and heads (dense
        layers count as density 1), differentiable in the degrees."""
        kept, allowed = self.expected_kept(layout)
        return kept / allowed

    def hard_degrees(self) -> torch.Tensor:
        """(layers, heads) int64: floor(d + 1/2), at least 0: the degrees of the T -> 0 limit."""
        return (self.degree.detach() + 0.5).floor().clamp(min=0).long()

    def to_plan(self) -> Plan:
        """The T -> 0 limit as an ordinary plan: per layer, heads grouped by degree, each rule
        neighbour(k) | global_tokens(g)."""
        rules = []
        hard = self.hard_degrees()
        for layer in self.layers:
            by_degree: dict[int, list[int]] = {}
            for h, k in enumerate(hard[layer].tolist()):
                by_degree.setdefault(k, []).append(h)
            for k, heads in sorted(by_degree.items()):
                pat = neighbour(k)
                if self.global_tokens:
                    pat = pat | global_tokens_pattern(self.global_tokens)
                rules.append(Rule(pattern=pat, layers=(layer,), heads=tuple(heads) if len(heads) < self.num_heads
                                  else None))
        return Plan(rules)


def annealed_temperature(step: int, total_steps: int, start: float, end: float) -> float:
    """Geometric annealing from ``start`` to ``end`` over ``total_steps``."""
    if total_steps <= 1:
        return end
    t = min(max(step / (total_steps - 1), 0.0), 1.0)
    return math.exp(math.log(start) + t * (math.log(end) - math.log(start)))
