"""Plans: which pattern applies to which layers and heads. Layers and heads a plan does not name stay dense.

>>> from sparseattn import Plan
>>> from sparseattn.patterns import neighbour, global_tokens
>>> plan = Plan.parse("layers=3-5: neighbour(2) | global_tokens(1)")
>>> plan == Plan([Rule(layers=(3, 4, 5), pattern=neighbour(2) | global_tokens(1))])
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..layout import TokenLayout
from ..patterns.base import Pattern
from .errors import PlanError
from .spec import parse_rules

NAMED_LAYER_SETS = ("all", "later-half", "first-half")


def _as_index_tuple(x, what: str) -> tuple[int, ...] | str | None:
    if x is None or isinstance(x, str):
        return x
    if isinstance(x, int) and not isinstance(x, bool):
        x = (x,)
    try:
        vals = tuple(x)
    except TypeError:
        raise TypeError(f"{what} must be an int, an iterable of ints or a name, got {x!r}") from None
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{what} must contain integers, got {v!r}")
        if v < 0:
            raise PlanError(f"{what} must be >= 0, got {v}")
    if not vals:
        raise PlanError(f"{what} is empty")
    return tuple(sorted(set(vals)))


def _ranges(vals: tuple[int, ...]) -> str:
    out, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(out)


@dataclass(frozen=True, eq=True)
class Rule:
    """Apply ``pattern`` to ``layers`` ('all', 'later-half', 'first-half' or indices) and ``heads``
    (None for all heads, or indices)."""

    pattern: Pattern
    layers: tuple[int, ...] | str = "all"
    heads: tuple[int, ...] | None = None
    source: str | None = field(default=None, compare=False, repr=False)  # the spec text it came from

    def __post_init__(self):
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"Rule.pattern must be a Pattern, got {self.pattern!r}")
        layers = _as_index_tuple(self.layers, "layers")
        if isinstance(layers, str) and layers not in NAMED_LAYER_SETS:
            raise PlanError(f"unknown layer set {layers!r}; expected one of {NAMED_LAYER_SETS} or layer indices")
        object.__setattr__(self, "layers", layers)
        heads = _as_index_tuple(self.heads, "heads")
        if isinstance(heads, str):
            if heads != "all":
                raise PlanError(f"unknown head set {heads!r}; expected 'all' or head indices")
            heads = None
        object.__setattr__(self, "heads", heads)

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers == "all":
            return tuple(range(num_layers))
        if self.layers == "later-half":
            return tuple(range(num_layers // 2, num_layers))
        if self.layers == "first-half":
            return tuple(range(num_layers // 2))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise PlanError(f"{self._where()}layer {bad[0]} is out of range for a model with {num_layers} layers "
                            f"(0-{num_layers - 1})")
        return self.layers

    def resolve_heads(self, num_heads: int) -> tuple[int, ...] | None:
        if self.heads is None:
            return None
        bad = [h for h in self.heads if h >= num_heads]
        if bad:
            raise PlanError(f"{self._where()}head {bad[0]} is out of range for a model with {num_heads} heads "
                            f"(0-{num_heads - 1})")
        return self.heads if len(self.heads) < num_heads else None

    def _where(self) -> str:
        return f"in rule {self.source!r}: " if self.source else f"in rule {self.spec()!r}: "

    def selector(self) -> str:
        lay = self.layers if isinstance(self.layers, str) else f"layers={_ranges(self.layers)}"
        return lay if self.heads is None else f"heads={_ranges(self.heads)}@{lay}"

    def spec(self) -> str:
        return f"{self.selector()}: {self.pattern.spec()}"


@dataclass
class LayerPlan:
    """What one layer does: (heads or None for all, pattern) entries; unnamed heads stay dense."""

    layer: int
    num_heads: int
    entries: list[tuple[tuple[int, ...] | None, Pattern]]

    @property
    def is_dense(self) -> bool:
        return not self.entries

    @property
    def patterns(self) -> list[Pattern]:
        return [p for _, p in self.entries]

    def mask(self, layout: TokenLayout, cache: dict | None = None) -> torch.Tensor:
        """Keep-mask (B, H', L, L); H' = 1 when every head shares one mask. ``cache``: a dict shared by the layers
        of one forward pass, which holds its layouts (entries are keyed by the layout's identity: a model whose
        layers see different keys, such as sliding-window and full layers, has a layout for each)."""
        def pattern_mask(p: Pattern) -> torch.Tensor:
            key = (id(layout), p.spec(), self.layer if p.per_layer else None, self.num_heads if p.per_head else None)
            if cache is not None and key in cache:
                return cache[key]
            m = p.mask(layout, layer=self.layer, num_heads=self.num_heads)
            if cache is not None:
                cache[key] = m
            return m

        if not self.entries:
            return layout.allowed()
        if len(self.entries) == 1 and self.entries[0][0] is None:
            return pattern_mask(self.entries[0][1])
        B, L = layout.batch_size, layout.length
        out = layout.allowed().expand(B, self.num_heads, L, L).clone()
        for heads, p in self.entries:
            m = pattern_mask(p)
            idx = list(range(self.num_heads)) if heads is None else list(heads)
            out[:, idx] = m[:, idx] if m.shape[1] > 1 else m.expand(B, len(idx), L, L)
        return out


    def mask_rows(self, layout: TokenLayout, rows: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """``mask(layout)[:, :, rows]`` (B, H', Lq, L) without the L x L mask: the keep-mask rows of the queries at
        indices ``rows`` (Lq,) int64 (incremental decoding: the new tokens of a KV cache). ``cache`` as for ``mask``;
        a pass gives each layout one set of rows."""
        def pattern_rows(p: Pattern) -> torch.Tensor:
            key = ("rows", id(layout), rows.shape[0], p.spec(), self.layer if p.per_layer else None,
                   self.num_heads if p.per_head else None)
            if cache is not None and key in cache:
                return cache[key]
            m = p.mask_rows(layout, rows, layer=self.layer, num_heads=self.num_heads)
            if cache is not None:
                cache[key] = m
            return m

        if not self.entries:
            return layout.allowed_rows(rows)
        if len(self.entries) == 1 and self.entries[0][0] is None:
            return pattern_rows(self.entries[0][1])
        B, Lq, L = layout.batch_size, rows.shape[0], layout.length
        out = layout.allowed_rows(rows).expand(B, self.num_heads, Lq, L).clone()
        for heads, p in self.entries:
            m = pattern_rows(p)
            idx = list(range(self.num_heads)) if heads is None else list(heads)
            out[:, idx] = m[:, idx] if m.shape[1] > 1 else m.expand(B, len(idx), Lq, L)
        return out

    def sink_window(self, causal: bool) -> tuple[int, int] | None:
        """(sink, window) bounding what every head of this layer keeps (see ``Pattern.sink_window``); None for a
        layer with a dense head or a pattern that keeps keys at any distance."""
        covered = set()
        for heads, _ in self.entries:
            covered.update(range(self.num_heads) if heads is None else heads)
        if len(covered) < self.num_heads:  # a dense head keeps every earlier key
            return None
        bounds = [p.sink_window(causal) for p in self.patterns]
        if any(b is None for b in bounds):
            return None
        return max(b[0] for b in bounds), max(b[1] for b in bounds)


class Plan:
    """An ordered list of rules. Two rules may not cover the same (layer, head)."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules: tuple[Rule, ...] = tuple(rules)
        for r in self.rules:
            if not isinstance(r, Rule):
                raise TypeError(f"Plan takes Rule objects, got {r!r}")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, tables: dict[str, torch.Tensor] | None = None) -> "Plan":
        """Parse a text spec, e.g. ``"layers=3-5: neighbour(2) | global_tokens(1); later-half: random(4)"``."""
        return cls([Rule(pattern=r.pattern, layers=r.layers, heads=r.heads, source=r.source)
                    for r in parse_rules(text, tables)])

    @classmethod
    def dense(cls) -> "Plan":
        return cls(())

    @classmethod
    def everywhere(cls, pattern: Pattern) -> "Plan":
        return cls([Rule(pattern)])

    def __add__(self, other: "Plan") -> "Plan":
        return Plan(self.rules + other.rules)

    # -- identity ---------------------------------------------------------------------------
    def spec(self) -> str:
        return "; ".join(r.spec() for r in self.rules) if self.rules else "dense"

    @property
    def name(self) -> str:
        """A stable short name for tables and file names."""
        if not self.rules:
            return "dense"
        return "+".join(f"{r.selector()}:{r.pattern.name}" for r in self.rules)

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self.rules == other.rules

    def __hash__(self):
        return hash(self.spec())

    def __repr__(self) -> str:
        return f"Plan({self.spec()!r})"

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for r in self.rules:
            for k, t in r.pattern.tensors().items():
                if k in out and not torch.equal(out[k], t):
                    raise PlanError(f"two stored masks share the key {k!r} but differ")
                out[k] = t
        return out

    @property
    def input_dependent(self) -> bool:
        return any(r.pattern.input_dependent for r in self.rules)

    @property
    def needs_parser(self) -> bool:
        """Whether inputs need dependency parses or lemmas (syntax, lexical by lemma)."""
        return any(r.pattern.needs_parser for r in self.rules)

    # -- binding to a model shape ---------------------------------------------------------------
    def resolve(self, num_layers: int, num_heads: int) -> list[LayerPlan]:
        """One LayerPlan per layer; raises PlanError for out-of-range layers/heads or overlapping rules."""
        owner: dict[tuple[int, int], Rule] = {}
        layers = [LayerPlan(i, num_heads, []) for i in range(num_layers)]
        for rule in self.rules:
            heads = rule.resolve_heads(num_heads)
            for li in rule.resolve_layers(num_layers):
                for h in (range(num_heads) if heads is None else heads):
                    if (li, h) in owner:
                        raise PlanError(f"layer {li} head {h} is covered by two rules: {owner[li, h].spec()!r} and "
                                        f"{rule.spec()!r}; combine their patterns with | or & in one rule")
                    owner[li, h] = rule
                layers[li].entries.append((heads, rule.pattern))
        return layers


def parse_plan(text: str, tables: dict[str, torch.Tensor] | None = None) -> Plan:
    """Parse a plan spec (see ``sparseattn.plans.spec`` for the grammar); the same as ``Plan.parse``."""
    return Plan.parse(text, tables)
