"""From averaged attention to a global keep-mask and a plan (step 2 of Attention Pruning).

The mask prunes exactly ``round(p * allowed)`` entries of every unit (a layer, pooled over its heads, as
in the 2021 AP code; or a (layer, head), as in the 2024 Llama code), where *allowed* counts the grid
pairs that can carry attention: every (i, j) with i, j < N for encoders, j <= i for decoders. (The 2021
code's percentile counted entries that were zero anyway, padding and a decoder's future, so its
"% pruned" overstated the real sparsity.)

Which entries: the lowest average attention first, among the *candidates*: allowed pairs that are not
a query's own position (the diagonal is always kept, so no row is empty) and that were observed at
least once (no evidence, no pruning; they exist only when the grid is longer than the longest example
collected). Equal averages are broken by the flat index (layer-major, then head, query, key): the mask
is a deterministic function of the statistics. If a unit has fewer candidates than entries to prune,
that is an error naming the largest fraction that is possible.

What p counts (``budget``): 'grid', the allowed entries of the N x N grid, each once (the papers' way);
or 'data', the allowed pairs of the collected examples (entry (i, j) weighs as many examples as contain
it), so that p is the sparsity the mask actually has on that data once shorter examples are cropped.
The two differ a lot: low averages sit at far positions that few examples reach, so a 'grid' mask
removes far fewer real pairs than p (on SST-2, 20% of the grid is 8% of the training pairs).

Block variants, for block-sparse kernels (tiles of ``block`` x ``block`` positions, aligned at 0):
- ``expand_to_blocks``: keep every tile that holds a kept entry of a token-level mask (token sparsity
  goes down, block density is what a kernel pays);
- ``block_mask``: rank tiles by the attention mass they hold and prune exactly round(p * allowed tiles)
  of them (tiles on the diagonal, and tiles with unobserved pairs, are kept).

``random_like`` gives the baseline: random candidates, as many pruned per layer (and per head, with
``scope='head'``) as in a given mask.
"""

from __future__ import annotations

import math

import torch

from ..layout import TokenLayout
from ..patterns.static import static_mask
from ..plans.plan import Plan, Rule
from ..sparsity import SparsityReport, measure_plan
from .collect import AttentionStats

SCOPES = ("layer", "head")
BUDGETS = ("grid", "data")
_COUNTED = {"grid": "entries", "data": "pairs of the collected examples"}


def _check(fraction: float, scope: str, budget: str = "grid") -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction to prune must be in [0, 1), got {fraction}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")


def _count(fraction: float, total: int) -> int:
    """round(fraction * total), halves rounded up (not to even)."""
    return int(math.floor(fraction * total + 0.5))


def candidates(stats: AttentionStats) -> torch.Tensor:
    """(N, N) bool: pairs that may be pruned: allowed, off the diagonal, observed at least once."""
    n = stats.length
    return stats.allowed() & ~torch.eye(n, dtype=torch.bool) & (stats.counts > 0)


def _units(x: torch.Tensor, scope: str) -> torch.Tensor:
    """(layers, heads, ...) -> (units, M): one row per layer (scope 'layer') or per (layer, head)."""
    return x.flatten(1) if scope == "layer" else x.flatten(0, 1).flatten(1)


def _entry_weights(stats: AttentionStats, budget: str) -> torch.Tensor:
    """(N, N) int64: what pruning one grid entry removes: 1 entry (budget 'grid') or the number of
    collected examples in which the pair occurs (budget 'data')."""
    allowed = stats.allowed()
    return allowed.long() if budget == "grid" else stats.counts * allowed


def _select(order_keys: torch.Tensor | None, cand: torch.Tensor, weights: torch.Tensor, budgets: torch.Tensor,
            what: str, counted: str, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per unit (row), prune candidates in order until their weights reach the unit's budget.

    order_keys: (units, M) values, pruned lowest first, equal values by position (stable sort); None =
    random order from ``gen``. ``what`` / ``counted`` name the unit and what the weights count (for
    errors). cand: (units, M) bool. weights: (units, M) int64. budgets: (units,) int64.
    Returns (units, M) bool, True = pruned: the shortest prefix whose weight reaches the budget (with
    unit weights, exactly ``budget`` entries)."""
    pruned = torch.zeros_like(cand)
    for u in range(cand.shape[0]):
        need = int(budgets[u])
        if need == 0:
            continue
        idx = cand[u].nonzero().squeeze(1)  # ascending flat index
        if order_keys is None:
            order = torch.randperm(idx.numel(), generator=gen)
        else:
            order = torch.sort(order_keys[u, idx], stable=True).indices
        idx = idx[order]
        reached = weights[u, idx].cumsum(0)
        if idx.numel() == 0 or int(reached[-1]) < need:
            total = int(weights[u].sum())
            have = int(reached[-1]) if idx.numel() else 0
            raise ValueError(f"cannot prune {need} of the {total} allowed {counted} of {what} {u}: only {have} may "
                             f"go (the diagonal and never-observed pairs stay), at most {have / max(1, total):.1%}")
        k = int(torch.searchsorted(reached, torch.tensor(need))) + 1
        pruned[u, idx[:k]] = True
    return pruned


def _budgets(fraction: float, weights: torch.Tensor) -> torch.Tensor:
    return torch.tensor([_count(fraction, int(w)) for w in weights.sum(1)], dtype=torch.long)


def attention_pruning_mask(stats: AttentionStats, fraction: float, *, scope: str = "layer",
                           budget: str = "grid") -> torch.Tensor:
    """(layers, heads, N, N) bool keep-mask pruning ``fraction`` of each unit's allowed entries, those of
    lowest average attention (scope 'layer': pooled over heads; 'head': per head).

    budget 'grid': exactly round(fraction * allowed grid entries) entries per unit (the AP papers' way).
    budget 'data': the pruned entries cover round(fraction * allowed pairs of the collected examples),
    to within one entry: the sparsity the mask has on the collection data (sequences cropped)."""
    _check(fraction, scope, budget)
    L, H, N = stats.num_layers, stats.num_heads, stats.length
    allowed = stats.allowed()
    weights = _units(_entry_weights(stats, budget).expand(L, H, N, N), scope)
    cand = _units(candidates(stats).expand(L, H, N, N), scope)
    pruned = _select(_units(stats.mean(), scope), cand, weights, _budgets(fraction, weights), scope, _COUNTED[budget])
    return allowed & ~pruned.view(L, H, N, N)


def _tiles(x: torch.Tensor, block: int, reduce: str) -> torch.Tensor:
    """(..., N, N) -> (..., n, n) per tile of block x block (padded with zeros / False at the end)."""
    N = x.shape[-1]
    pad = (-N) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad, 0, pad))
    n = (N + pad) // block
    t = x.reshape(*x.shape[:-2], n, block, n, block)
    return t.any(dim=-1).any(dim=-2) if reduce == "any" else t.sum(dim=(-1, -3))


def _untile(t: torch.Tensor, block: int, N: int) -> torch.Tensor:
    """(..., n, n) tile mask -> (..., N, N) entry mask."""
    return t.repeat_interleave(block, -1).repeat_interleave(block, -2)[..., :N, :N]


def expand_to_blocks(keep: torch.Tensor, allowed: torch.Tensor, block: int) -> torch.Tensor:
    """Keep every block x block tile that holds a kept entry: (layers, heads, N, N) -> the same shape."""
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    return _untile(_tiles(keep, block, "any"), block, keep.shape[-1]) & allowed


def block_mask(stats: AttentionStats, fraction: float, block: int, *, scope: str = "layer",
               budget: str = "grid") -> torch.Tensor:
    """(layers, heads, N, N) keep-mask made of whole tiles: per unit, prune the tiles of least attention
    mass (the sum of their average attention) until round(fraction * allowed tiles) are gone (budget
    'grid'), or until they cover that fraction of the collected examples' allowed pairs ('data'). Tiles
    on the diagonal and tiles with a never-observed allowed pair are kept."""
    _check(fraction, scope, budget)
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    L, H, N = stats.num_layers, stats.num_heads, stats.length
    allowed = stats.allowed()
    unobserved = allowed & (stats.counts == 0)
    mass = _tiles(stats.mean() * allowed, block, "sum")  # (L, H, n, n)
    tile_allowed = _tiles(allowed, block, "any")
    n = tile_allowed.shape[-1]
    tile_cand = tile_allowed & ~torch.eye(n, dtype=torch.bool) & ~_tiles(unobserved, block, "any")
    tile_weights = tile_allowed.long() if budget == "grid" else _tiles(_entry_weights(stats, "data"), block, "sum")
    weights = _units(tile_weights.expand(L, H, n, n), scope)
    pruned = _select(_units(mass, scope), _units(tile_cand.expand(L, H, n, n), scope), weights,
                     _budgets(fraction, weights), scope, "tiles" if budget == "grid" else _COUNTED[budget])
    return _untile(~pruned.view(L, H, n, n), block, N) & allowed


def random_like(keep: torch.Tensor, stats: AttentionStats, *, scope: str = "layer", budget: str = "grid",
                seed: int = 0) -> torch.Tensor:
    """The random baseline: a keep-mask pruning uniformly drawn candidates, as many per layer (and per
    head with scope 'head') as ``keep`` prunes: the same number of grid entries (budget 'grid') or
    entries covering the same number of the collected examples' pairs, to within one entry ('data').
    Deterministic given the seed."""
    _check(0.0, scope, budget)
    L, H, N = keep.shape[:3]
    allowed = stats.allowed()
    weights = _units(_entry_weights(stats, budget).expand(L, H, N, N), scope)
    budgets = (_units(allowed & ~keep, scope).long() * weights).sum(1)
    cand = _units(candidates(stats).expand(L, H, N, N), scope)
    pruned = _select(None, cand, weights, budgets, scope, _COUNTED[budget], gen=torch.Generator().manual_seed(seed))
    return allowed & ~pruned.view(L, H, N, N)


# -- plans and reports ------------------------------------------------------------------------------
def mask_plan(keep: torch.Tensor, *, prefix: str = "ap") -> Plan:
    """One rule per layer, ``layers=i: static_mask('<prefix>_l<i>')``, holding that layer's (heads, N, N)
    table. Loadable anywhere a plan is (save it with ``save_plan``)."""
    return Plan([Rule(static_mask(keep[i], key=f"{prefix}_l{i}"), layers=(i,)) for i in range(keep.shape[0])])


def grid_report(plan: Plan, stats: AttentionStats, *, block_size: int | None = None) -> SparsityReport:
    """Sparsity of ``plan`` on one example as long as the grid (the definition of sparseattn.sparsity)."""
    layout = TokenLayout.from_lengths([stats.length], causal=stats.causal)
    return measure_plan(plan.resolve(stats.num_layers, stats.num_heads), layout, block_size=block_size)


def data_report(keep: torch.Tensor, stats: AttentionStats) -> SparsityReport:
    """Sparsity of ``keep`` over the collected examples themselves, each cropped to its length: the pair
    counts are the collection's counts, so this equals measure_sparsity on that data."""
    allowed = stats.allowed() & (stats.counts > 0)
    weight = stats.counts * allowed
    kept = (keep & allowed).long().mul(weight).sum(dim=(-1, -2))
    total = weight.sum().expand_as(kept)
    return SparsityReport(kept, total.clone(), torch.ones_like(kept, dtype=torch.bool),
                          examples=stats.num_examples)


def thresholds(keep: torch.Tensor, stats: AttentionStats, scope: str = "layer") -> list:
    """The largest average attention pruned per unit (the effective percentile), None if nothing is."""
    mean = _units(stats.mean(), scope)
    pruned = _units(stats.allowed() & ~keep, scope)
    return [float(mean[u][pruned[u]].max()) if pruned[u].any() else None for u in range(mean.shape[0])]


def check_prune_options(cfg, method: str, choices: dict) -> None:
    """What every pruning method's run config shares: a dense plan (the method makes its own mask), ``prune`` a
    percentage in [0, 100) (made a float), and each option in ``choices`` ({name: allowed values}) one of its values."""
    if cfg.plan != "dense":
        raise ValueError(f"a {method} run makes its own mask; plan must be 'dense', got {cfg.plan!r}")
    if isinstance(cfg.prune, bool) or not isinstance(cfg.prune, (int, float)) or not 0 <= cfg.prune < 100:
        raise ValueError(f"prune is a percentage in [0, 100), got {cfg.prune!r}")
    cfg.prune = float(cfg.prune)
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
