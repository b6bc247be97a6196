"""causal(): a token attends to itself and earlier tokens only."""

from __future__ import annotations

from .base import Pattern, positional_grid, register


class Causal(Pattern):
    name = "causal"
    symmetric = False

    def relation(self, layout, *, layer, num_heads):
        return self.index_relation()(*positional_grid(layout))

    def relation_rows(self, layout, rows, *, layer, num_heads):
        return self.index_relation()(*positional_grid(layout, rows))

    def index_relation(self):
        return lambda q, kv: kv <= q

    def spec(self):
        return "causal()"


@register
def causal() -> Pattern:
    """Keys at or before the query: keep (i, j) when j <= i.

    Decoders are causal already (their future is never allowed); use this to make an encoder causal,
    or in intersections such as causal() & neighbour(4)."""
    return Causal()


if __name__ == "__main__":  # draw it: python -m sparseattn.patterns.causal
    from ..reports.masks import draw_pattern

    print(draw_pattern(causal(), path="causal.png"))
