"""neighbour(k): each token attends to the tokens within k positions of it (a sliding window)."""

from __future__ import annotations

from .base import Pattern, check_int, positional_grid, register


class Neighbour(Pattern):
    symmetric = True

    def __init__(self, k: int):
        self.k = check_int(k, "neighbour degree k")
        self.name = f"neighbour_{self.k}"

    def relation(self, layout, *, layer, num_heads):
        return self.index_relation()(*positional_grid(layout))

    def relation_rows(self, layout, rows, *, layer, num_heads):
        return self.index_relation()(*positional_grid(layout, rows))

    def sink_window(self, causal):
        return (0, self.k) if causal else None

    def index_relation(self):
        k = self.k
        return lambda q, kv: (q - kv).abs() <= k

    def spec(self):
        return f"neighbour({self.k})"


@register
def neighbour(k: int) -> Pattern:
    """Tokens within k positions: keep (i, j) when |i - j| <= k.

    Positions count real tokens only, so left and right padding mean the same. neighbour(0) keeps
    only the diagonal."""
    return Neighbour(k)


if __name__ == "__main__":  # draw it: python -m sparseattn.patterns.neighbour
    from ..reports.masks import draw_pattern

    print(draw_pattern(neighbour(2), path="neighbour_2.png"))
