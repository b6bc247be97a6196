"""global_tokens(g): a few tokens attend to, and are attended by, every token."""

from __future__ import annotations

from .base import Pattern, check_int, register


class GlobalTokens(Pattern):
    symmetric = True

    def __init__(self, g):
        if g == "special":
            self.g = "special"
            self.input_dependent = True  # needs to know which tokens are special
        else:
            self.g = check_int(g, "number of global tokens g")
        self.name = f"global_tokens_{self.g}"

    def relation(self, layout, *, layer, num_heads):
        if self.g == "special":
            if layout.special is None:
                raise ValueError("global_tokens('special') needs to know the special tokens: pass a tokenizer to "
                                 "sparseattn.sparsify, or inputs made by sparseattn.encode")
            glob = layout.special
        else:
            glob = layout.real & (layout.positions < self.g)
        return glob[:, None, :, None] | glob[:, None, None, :]

    def relation_rows(self, layout, rows, *, layer, num_heads):
        if self.g == "special" and layout.special is None:
            return super().relation_rows(layout, rows, layer=layer, num_heads=num_heads)  # refuses, saying why
        glob = layout.special if self.g == "special" else layout.real & (layout.positions < self.g)
        return glob[:, None, rows, None] | glob[:, None, None, :]

    def sink_window(self, causal):
        # a decoder's query keeps the first g tokens (and, among the first g, every earlier one: also < g)
        return (self.g, 0) if causal and self.g != "special" else None

    def index_relation(self):
        if self.g == "special":
            return None
        g = self.g
        return lambda q, kv: (q < g) | (kv < g)

    def spec(self):
        return "global_tokens('special')" if self.g == "special" else f"global_tokens({self.g})"


@register
def global_tokens(g=1) -> Pattern:
    """The first g real tokens (or, with g='special', the special tokens such as [CLS] and [SEP])
    attend to every token and every token attends to them.

    global_tokens(0) adds nothing beyond the diagonal."""
    return GlobalTokens(g)


if __name__ == "__main__":  # draw it: python -m sparseattn.patterns.global_tokens
    from ..reports.masks import draw_pattern

    print(draw_pattern(global_tokens(2), path="global_tokens_2.png"))
