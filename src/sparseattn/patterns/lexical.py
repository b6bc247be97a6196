"""lexical(by) and similar(top_k): connections between tokens of the same or similar words."""

from __future__ import annotations

import torch

from ._words import check_special, special_handling, structure_of
from .base import Pattern, check_int, register

_BY = ("any", "lemma", "lower")


class Lexical(Pattern):
    symmetric = True
    input_dependent = True

    def __init__(self, by: str = "any", special: str = "self"):
        if by not in _BY:
            raise ValueError(f"lexical(by=...) must be one of {_BY}, got {by!r}")
        self.by = by
        self.needs_parser = by != "lower"  # lemmas come from the parser
        self.special = check_special(special)
        self.name = "lexical" + ("" if by == "any" else f"_{by}") + ("_global_special" if special == "global" else "")

    def relation(self, layout, *, layer, num_heads):
        s = structure_of(layout, self.name)
        if self.by == "lemma" and not s.parsed:
            raise ValueError("lexical(by='lemma') needs lemmas from a parser: encode with parses=ParseCache(...)")
        has_word = s.word_ids >= 0
        idx = s.word_ids.clamp(min=0)
        rel = torch.zeros(layout.batch_size, layout.length, layout.length, dtype=torch.bool, device=layout.device)
        for kind in (("lemma", "lower") if self.by == "any" else (self.by,)):
            ids = (s.lemma_ids if kind == "lemma" else s.lower_ids).gather(1, idx)
            rel |= ids[:, :, None] == ids[:, None, :]
        rel &= has_word[:, :, None] & has_word[:, None, :]
        return special_handling(rel[:, None], layout, has_word, self.special)

    def spec(self):
        args = [] if self.by == "any" else [f"by='{self.by}'"]
        if self.special != "self":
            args.append(f"special='{self.special}'")
        return f"lexical({', '.join(args)})"


@register
def lexical(by: str = "any", special: str = "self") -> Pattern:
    """Tokens whose words are the same: share a lemma or a lower-cased form (by='any'), or only one of
    them (by='lemma' needs a parser; by='lower' does not).

    A word's pieces attend to each other. Special tokens as in syntax()."""
    return Lexical(by, special)


class Similar(Pattern):
    symmetric = False
    input_dependent = True

    def __init__(self, top_k: int):
        self.top_k = check_int(top_k, "similar top_k")
        self.name = f"similar_{self.top_k}"

    def relation(self, layout, *, layer, num_heads):
        B, L = layout.batch_size, layout.length
        if self.top_k == 0:
            return torch.zeros(B, 1, L, L, dtype=torch.bool, device=layout.device)
        v = layout.vectors().float()
        v = torch.nn.functional.normalize(v, dim=-1)
        sim = v @ v.transpose(1, 2)  # (B, L, L) cosine similarity
        cand = (layout.allowed() & ~layout.diagonal())[:, 0]
        sim = torch.where(cand, sim, torch.full_like(sim, -3.0))  # below any cosine
        # a stable sort, not topk: repeated tokens tie exactly, and topk breaks ties differently per device;
        # this way the earlier key wins, as documented
        top = sim.sort(dim=-1, descending=True, stable=True)
        k = min(self.top_k, L)
        rel = torch.zeros(B, L, L, dtype=torch.bool, device=layout.device)
        rel.scatter_(-1, top.indices[..., :k], top.values[..., :k] > -2.0)
        return rel[:, None]

    def spec(self):
        return f"similar({self.top_k})"


@register
def similar(top_k: int) -> Pattern:
    """Each query attends to the top_k keys whose input embeddings (the model's token embeddings,
    before position embeddings) are most cosine-similar to its own.

    Ties break by position; applied through sparsify, the vectors come from the model."""
    return Similar(top_k)
