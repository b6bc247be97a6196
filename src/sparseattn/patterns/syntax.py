"""syntax(hops): tokens whose words are within a number of hops in a dependency parse."""

from __future__ import annotations

from ._words import check_special, gather_pairs, special_handling, structure_of
from .base import Pattern, check_int, register


class Syntax(Pattern):
    symmetric = True
    input_dependent = True
    needs_parser = True

    def __init__(self, hops: int = 1, special: str = "self"):
        self.hops = check_int(hops, "syntax hops")
        self.special = check_special(special)
        self.name = f"syntax_{self.hops}" + ("_global_special" if self.special == "global" else "")

    def relation(self, layout, *, layer, num_heads):
        s = structure_of(layout, self.name)
        if not s.parsed:
            raise ValueError(f"{self.name} needs dependency parses, but the inputs were segmented without a parser: "
                             "encode them with parses=sparseattn.ParseCache(...)")
        has_word = s.word_ids >= 0
        dist = gather_pairs(s.word_dist, s.word_ids)
        rel = (dist <= self.hops) & has_word[:, :, None] & has_word[:, None, :]
        return special_handling(rel[:, None], layout, has_word, self.special)

    def spec(self):
        return f"syntax({self.hops})" if self.special == "self" else f"syntax({self.hops}, special='global')"


@register
def syntax(hops: int = 1, special: str = "self") -> Pattern:
    """Words within `hops` edges of each other in the dependency parse (undirected; spaCy).

    A word's sub-word pieces share its edges and attend to each other (hop distance 0). Words of
    different sentences or of the two segments of a pair are never connected. Special tokens
    ([CLS], [SEP]) keep only themselves with special='self', or attend to and from everything with
    special='global'."""
    return Syntax(hops, special)
