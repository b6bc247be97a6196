"""Baselines for Attention Pruning at equal *measured* sparsity: the positional plan of attention sinks and a
sliding window, ``global_tokens(g) | neighbour(w)`` on every layer and head (the random baseline is
``mask.random_like``).

    g, w, got = sink_window_for_sparsity(0.9, 1024)      # the (g, w) whose sparsity on a full causal row of
    plan = sink_window_plan(g, w)                        # 1024 tokens is nearest 90%

Sparsity is ``sparseattn.sparsity``'s, measured on one full row of ``length`` tokens (a language model's
rows all are); it falls as w grows, so w is found by bisection for each candidate g.
"""

from __future__ import annotations

from typing import Sequence

from ..layout import TokenLayout
from ..plans.plan import Plan
from ..sparsity import measure_plan


def sink_window_plan(sinks: int, window: int) -> Plan:
    """``all: global_tokens(sinks) | neighbour(window)``; ``sinks = 0``: the window alone."""
    if sinks < 0 or window < 0:
        raise ValueError(f"sinks and window must be >= 0, got {sinks} and {window}")
    return Plan.parse(f"all: global_tokens({sinks}) | neighbour({window})" if sinks else f"all: neighbour({window})")


def row_sparsity(plan: Plan, length: int, *, causal: bool = True) -> float:
    """The plan's sparsity on one full row of ``length`` tokens (one layer, one head: the plan is uniform)."""
    return measure_plan(plan.resolve(1, 1), TokenLayout.from_lengths([length], causal=causal)).overall


def _causal_sink_window_sparsity(g: int, w: int, n: int) -> float:
    """The same number as ``row_sparsity(sink_window_plan(g, w), n)`` for a causal row, counted in closed form
    (the search uses it; the chosen plan is then measured): query i < g keeps all its i + 1 keys; a later
    query keeps the window, min(i, w) + 1 keys, and the sinks before the window, min(g, i - w) when i > w."""
    kept = 0
    for i in range(n):
        kept += i + 1 if i < g else min(i, w) + 1 + max(0, min(g, i - w))
    return 1 - kept / (n * (n + 1) // 2)


def sink_window_for_sparsity(target: float, length: int, *, sinks: int | Sequence[int] = 4,
                             causal: bool = True) -> tuple[int, int, float]:
    """(g, w, measured sparsity): among ``sinks`` (one g or several to choose from) and every window w, the
    sink-and-window plan whose sparsity on a full row of ``length`` tokens is nearest ``target`` (ties: the
    smaller g, then the smaller w)."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"the target sparsity must be in [0, 1), got {target}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    candidates = [sinks] if isinstance(sinks, int) else list(sinks)
    if not candidates:
        raise ValueError("sink_window_for_sparsity needs at least one number of sinks")
    def sparsity(g, w):
        if causal:
            return _causal_sink_window_sparsity(g, w, length)
        return row_sparsity(sink_window_plan(g, w), length, causal=False)

    best = None
    for g in sorted(candidates):
        lo, hi = 0, length  # sparsity(w) does not rise with w; find the first w at or below the target
        while lo < hi:
            mid = (lo + hi) // 2
            if sparsity(g, mid) <= target:
                hi = mid
            else:
                lo = mid + 1
        for w in sorted({max(0, lo - 1), lo}):
            key = (abs(sparsity(g, w) - target), g, w)
            if best is None or key < best[0]:
                best = (key, g, w)
    _, g, w = best
    return g, w, row_sparsity(sink_window_plan(g, w), length, causal=causal)
