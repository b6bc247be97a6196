"""strided(s): attend to every s-th token (the Sparse Transformer's strided pattern, both directions)."""

from __future__ import annotations

from .base import Pattern, check_int, positional_grid, register


class Strided(Pattern):
    symmetric = True

    def __init__(self, s: int):
        self.s = check_int(s, "stride s", minimum=1)
        self.name = f"strided_{self.s}"

    def relation(self, layout, *, layer, num_heads):
        return self.index_relation()(*positional_grid(layout))

    def relation_rows(self, layout, rows, *, layer, num_heads):
        return self.index_relation()(*positional_grid(layout, rows))

    def index_relation(self):
        s = self.s
        return lambda q, kv: (q - kv).remainder(s) == 0

    def spec(self):
        return f"strided({self.s})"


@register
def strided(s: int) -> Pattern:
    """Every s-th token: keep (i, j) when (i - j) is a multiple of s.

    strided(1) is full attention."""
    return Strided(s)


if __name__ == "__main__":  # draw it: python -m sparseattn.patterns.strided
    from ..reports.masks import draw_pattern

    print(draw_pattern(strided(3), path="strided_3.png"))
