"""The Pattern protocol, composition, and the registry of named factories.

A pattern says which query-key pairs survive. Each concrete pattern implements ``relation``: the raw
boolean relation between positions, (B or 1, H or 1, L, L). ``mask`` turns it into a keep-mask with the
guarantees every consumer relies on:

- only allowed pairs are kept (never padding, never a decoder's future);
- every real query keeps its own position, so no row is empty;
- padding rows and columns are all False (the model's own mask decides what padding queries do).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError, ConfigTypeError
from ..layout import TokenLayout


class Pattern:
    """Base class of all patterns. Subclasses set ``name`` and implement ``relation`` and ``spec``."""

    name: str = "pattern"
    symmetric: bool = True  # relation(i, j) == relation(j, i) for every layout
    input_dependent: bool = False  # needs structure / token vectors, not just positions
    needs_parser: bool = False  # needs dependency parses or lemmas (a spaCy pipeline, or a parse cache)
    per_head: bool = False  # differs across heads
    per_layer: bool = False  # differs across layers (e.g. random draws per layer)

    def relation(self, layout: TokenLayout, *, layer: int, num_heads: int) -> torch.Tensor:
        raise NotImplementedError

    def index_relation(self):
        """The relation as a function of positions alone, ``rel(q, kv) -> bool`` over broadcasting integer
        tensors, for kernels that evaluate it pair by pair instead of reading a stored mask; None when the
        pattern needs more than positions (draws, tables, the input). Equal to ``relation`` on examples
        without padding, where a token's position is its index."""
        return None

    def prefix_stable(self, causal: bool) -> bool:
        """Whether the mask on a sequence of n tokens is the mask on any longer sequence cropped to its first n
        positions (for decoders if ``causal``), so that one layout over a length bucket's positions serves every
        shorter sequence: the examples of a padded batch, the documents of a packed row. True for relations of
        positions alone; not for draws among all of an encoder example's keys, whose choice depends on n."""
        return self.index_relation() is not None

    def mask(self, layout: TokenLayout, *, layer: int = 0, num_heads: int = 1) -> torch.Tensor:
        """Keep-mask (B, H', L, L) bool with H' = num_heads if ``per_head`` else 1."""
        rel = self.relation(layout, layer=layer, num_heads=num_heads)
        if rel.dtype != torch.bool or rel.dim() != 4:
            raise TypeError(f"{self.name}.relation returned {rel.dtype} {tuple(rel.shape)}, expected a 4-D bool tensor")
        return (rel & layout.allowed()) | layout.diagonal()

    def relation_rows(self, layout: TokenLayout, rows: torch.Tensor, *, layer: int, num_heads: int) -> torch.Tensor:
        """``relation(...)[:, :, rows]`` (B or 1, H or 1, Lq, L): the relation of the queries at indices ``rows``
        (Lq,) int64 with every key, for incremental decoding. Patterns whose rows can be had without the L x L
        relation override this (every packaged pattern of positions or stored tables does); this default
        crops the whole relation, which is right but costs L x L memory. Input-dependent patterns refuse:
        a generation cache does not keep the past tokens' ids, parses or vectors."""
        if self.input_dependent:
            raise ValueError(f"{self.spec()} depends on the input (ids, parses or embeddings of every token), which "
                             "a generation cache does not keep: it does not support incremental decoding "
                             "(generate() with a KV cache); run full forward passes, or use positional patterns")
        return self.relation(layout, layer=layer, num_heads=num_heads)[:, :, rows]

    def mask_rows(self, layout: TokenLayout, rows: torch.Tensor, *, layer: int = 0, num_heads: int = 1) -> torch.Tensor:
        """``mask(layout)[:, :, rows]`` (B, H', Lq, L) without the L x L mask: the keep-mask rows of the queries at
        indices ``rows`` (Lq,) int64 of the layout, for incremental decoding with a KV cache."""
        rel = self.relation_rows(layout, rows, layer=layer, num_heads=num_heads)
        if rel.dtype != torch.bool or rel.dim() != 4:
            raise TypeError(f"{self.name}.relation_rows returned {rel.dtype} {tuple(rel.shape)}, expected a 4-D "
                            "bool tensor")
        return (rel & layout.allowed_rows(rows)) | layout.diagonal_rows(rows)

    def sink_window(self, causal: bool) -> tuple[int, int] | None:
        """(sink, window) when a query at position p keeps no key outside positions < sink or >= p - window, on
        every layout (for decoders if ``causal``): a generation cache may then evict every other key (see
        ``sparseattn.generation_cache``). None where a query may keep keys at any distance."""
        return None

    def spec(self) -> str:
        """Text that `sparseattn.parse_pattern` turns back into an equal pattern."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors this pattern is defined by (only for stored masks); saved beside a plan."""
        return {}

    # -- composition ---------------------------------------------------------------------------
    def __or__(self, other: "Pattern") -> "Pattern":
        return union(self, other)

    def __and__(self, other: "Pattern") -> "Pattern":
        return intersection(self, other)

    def __eq__(self, other) -> bool:
        return isinstance(other, Pattern) and self.spec() == other.spec() and _same_tensors(self, other)

    def __hash__(self) -> int:
        return hash(self.spec())

    def __repr__(self) -> str:
        return self.spec()


def _same_tensors(a: Pattern, b: Pattern) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


class _Combined(Pattern):
    op = ""
    word = ""

    def __init__(self, parts: tuple[Pattern, ...]):
        flat: list[Pattern] = []
        for p in parts:
            if not isinstance(p, Pattern):
                raise TypeError(f"cannot combine {p!r} ({type(p).__name__}) with patterns")
            flat.extend(p.parts if type(p) is type(self) else (p,))
        self.parts = tuple(flat)
        self.name = f"{self.word}(" + ",".join(p.name for p in self.parts) + ")"
        self.symmetric = all(p.symmetric for p in self.parts)
        self.input_dependent = any(p.input_dependent for p in self.parts)
        self.needs_parser = any(p.needs_parser for p in self.parts)
        self.per_head = any(p.per_head for p in self.parts)
        self.per_layer = any(p.per_layer for p in self.parts)
        self.tensors()  # refuse two different stored tables under one key now, not when saving

    def spec(self) -> str:
        return "(" + f" {self.op} ".join(p.spec() for p in self.parts) + ")"

    def index_relation(self):
        """The parts' index relations combined with this operator (| or &); None if any part has none."""
        rels = [p.index_relation() for p in self.parts]
        if any(r is None for r in rels):
            return None
        combine = (lambda a, b: a | b) if self.op == "|" else (lambda a, b: a & b)

        def combined(q, kv):
            out = rels[0](q, kv)
            for r in rels[1:]:
                out = combine(out, r(q, kv))
            return out
        return combined

    def prefix_stable(self, causal: bool) -> bool:
        return all(p.prefix_stable(causal) for p in self.parts)

    def relation_rows(self, layout, rows, *, layer, num_heads):
        rel = None
        for p in self.parts:
            r = p.relation_rows(layout, rows, layer=layer, num_heads=num_heads)
            rel = r if rel is None else (rel | r if self.op == "|" else rel & r)
        return rel

    def tensors(self):
        out = {}
        for p in self.parts:
            for k, t in p.tensors().items():
                if k in out and not torch.equal(out[k], t):
                    # the spec names tables by key only: one of them would be lost on save and reload
                    raise ValueError(f"two different stored masks share the key {k!r} in {self.spec()}; "
                                     "give each table its own key")
                out[k] = t
        return out


class Union(_Combined):
    op, word = "|", "or"

    def sink_window(self, causal):
        # the union keeps what any part keeps: the largest sink and the largest window bound it
        bounds = [p.sink_window(causal) for p in self.parts]
        if any(b is None for b in bounds):
            return None
        return max(b[0] for b in bounds), max(b[1] for b in bounds)

    def relation(self, layout, *, layer, num_heads):
        rel = None
        for p in self.parts:
            r = p.relation(layout, layer=layer, num_heads=num_heads)
            rel = r if rel is None else rel | r
        return rel


class Intersection(_Combined):
    op, word = "&", "and"

    def sink_window(self, causal):
        # the intersection keeps no more than any part: any part's bound holds; the one keeping fewest keys
        bounds = [b for b in (p.sink_window(causal) for p in self.parts) if b is not None]
        return min(bounds, key=lambda b: b[0] + b[1]) if bounds else None

    def relation(self, layout, *, layer, num_heads):
        rel = None
        for p in self.parts:
            r = p.relation(layout, layer=layer, num_heads=num_heads)
            rel = r if rel is None else rel & r
        return rel


def union(*patterns: Pattern) -> Pattern:
    """Pairs kept by any of the patterns (``a | b``)."""
    return patterns[0] if len(patterns) == 1 else Union(patterns)


def intersection(*patterns: Pattern) -> Pattern:
    """Pairs kept by all of the patterns (``a & b``); self-connections are always kept."""
    return patterns[0] if len(patterns) == 1 else Intersection(patterns)


# -- registry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatternInfo:
    name: str
    factory: Callable[..., Pattern]
    summary: str
    signature: str


REGISTRY: dict[str, PatternInfo] = {}


def register(factory: Callable[..., Pattern]) -> Callable[..., Pattern]:
    """Make a factory available by name to plan specs and the CLI (``sparseattn patterns``)."""
    doc = inspect.getdoc(factory) or ""
    REGISTRY[factory.__name__] = PatternInfo(
        factory.__name__, factory, doc.split("\n\n")[0].replace("\n", " "),
        f"{factory.__name__}{inspect.signature(factory)}")
    return factory


# The largest integer a pattern argument may be: more than any sequence's length, and small enough that
# positions, degrees and seeds stay exact in int64 arithmetic (a seed is multiplied by a 32-bit constant).
MAX_INT = 2**31 - 1


def check_int(value, what: str, *, minimum: int = 0, maximum: int = MAX_INT) -> int:
    """Validate a degree-like argument; errors name the value and what was expected."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {value}")
    if value > maximum:
        shown = value if value.bit_length() <= 64 else f"an integer of {len(str(value))} digits"
        raise ConfigError(f"{what} must be <= {maximum} (2**31 - 1, longer than any sequence), got {shown}")
    return value


def positional_grid(layout: TokenLayout, rows: torch.Tensor | None = None):
    """(B, 1, L, 1) query positions and (B, 1, 1, L) key positions (real-token indices, -1 for padding); with
    ``rows`` (Lq,), the queries are the tokens at those indices only: (B, 1, Lq, 1)."""
    p = layout.positions
    q = p if rows is None else p[:, rows]
    return q[:, None, :, None], p[:, None, None, :]
