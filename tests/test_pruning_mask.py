"""Attention Pruning masks: exact fractions of allowed entries, per layer and per head, deterministic ties,
the diagonal kept, block variants and the random baseline. On synthetic statistics (fast, exact)."""

from __future__ import annotations

import math

import pytest
import torch

from sparseattn.layout import TokenLayout
from sparseattn.pruning import (AttentionStats, attention_pruning_mask, block_mask, data_report, expand_to_blocks,
                                grid_report, mask_plan, random_like)
from sparseattn.sparsity import measure_plan

FRACTIONS = [0.0, 0.13, 0.2, 0.4, 0.6, 0.8, 0.9]


def synthetic_stats(lengths, L, *, layers=3, heads=4, causal=False, levels=None, seed=0) -> AttentionStats:
    """Counts by loops from example lengths; means uniform in [0, 1), or drawn from ``levels`` distinct
    values (many ties)."""
    counts = torch.zeros(L, L, dtype=torch.long)
    for n in lengths:
        for i in range(n):
            for j in range(n):
                if not causal or j <= i:
                    counts[i, j] += 1
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(layers, heads, L, L, generator=g, dtype=torch.float64)
    if levels:
        mean = (mean * levels).floor() / levels
    return AttentionStats(mean * counts, counts, causal, {"examples": len(lengths)})


def hand_allowed(L, causal):
    return torch.tensor([[not causal or j <= i for j in range(L)] for i in range(L)])


def expected(fraction, total):
    return math.floor(fraction * total + 0.5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scope", ["layer", "head"])
def test_prunes_exactly_the_requested_fraction(scope, causal):
    L = 24  # the diagonal stays: a causal grid of L positions can lose at most 1 - 2 / (L + 1) of its pairs
    stats = synthetic_stats([24, 24, 17, 4], L, causal=causal)
    allowed = hand_allowed(L, causal)
    n_allowed = int(allowed.sum())
    for f in FRACTIONS:
        keep = attention_pruning_mask(stats, f, scope=scope)
        assert keep.shape == (3, 4, L, L)
        assert not (keep & ~allowed).any(), "never keeps a pair that cannot carry attention"
        assert keep.diagonal(dim1=-2, dim2=-1).all(), "a query's own position is never pruned"
        pruned = (allowed & ~keep).sum(dim=(-1, -2))  # (layers, heads)
        if scope == "layer":
            assert pruned.sum(1).tolist() == [expected(f, 4 * n_allowed)] * 3
        else:
            assert pruned.flatten().tolist() == [expected(f, n_allowed)] * 12
        # the sparsity definition agrees on a full-length example, to within one entry per unit
        report = grid_report(mask_plan(keep), stats)
        units = 3 if scope == "layer" else 12
        assert abs(report.overall - f) <= units / (12 * n_allowed) + 1e-12
        assert (report.per_layer - f).abs().max() <= (1 if scope == "layer" else 4) / (4 * n_allowed) + 1e-12
        if scope == "head":
            assert (report.per_head - f).abs().max() <= 1 / n_allowed + 1e-12


@pytest.mark.parametrize("scope", ["layer", "head"])
def test_prunes_the_lowest_averages(scope):
    stats = synthetic_stats([8, 6, 5], 8)
    keep = attention_pruning_mask(stats, 0.5, scope=scope)
    mean = stats.mean()
    off_diag = ~torch.eye(8, dtype=torch.bool)
    for layer in range(3):
        for h in range(4) if scope == "head" else [None]:
            sel = (slice(layer, layer + 1), slice(None) if h is None else slice(h, h + 1))
            m, k = mean[sel], keep[sel]
            assert m[~k].max() <= m[k & off_diag].min()


def test_ties_are_broken_by_position_deterministically():
    # every average equal: the pruned entries are the first candidates in flat (head, query, key) order
    stats = synthetic_stats([6, 6], 6, layers=1, heads=2, levels=1)
    assert (stats.mean() == 0).all()
    keep = attention_pruning_mask(stats, 0.25, scope="layer")
    k = expected(0.25, 2 * 36)
    order = [(h, i, j) for h in range(2) for i in range(6) for j in range(6) if i != j]
    want = torch.ones(1, 2, 6, 6, dtype=torch.bool)
    for h, i, j in order[:k]:
        want[0, h, i, j] = False
    assert torch.equal(keep, want)
    # with few distinct values, repeated calls give the same mask
    tied = synthetic_stats([9, 8, 3], 9, levels=3, seed=4)
    masks = [attention_pruning_mask(tied, 0.4, scope=s) for s in ("layer", "layer", "head", "head")]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[2], masks[3])


def test_unobserved_pairs_are_kept_and_impossible_fractions_refused():
    stats = synthetic_stats([5, 4], 8)  # positions 5-7 never seen
    keep = attention_pruning_mask(stats, 0.3)
    assert keep[..., 5:, :].all() and keep[..., :, 5:].all()
    # candidates: 25 - 5 observed off-diagonal... only 20 of 64 entries may go per head
    with pytest.raises(ValueError, match=r"cannot prune .* only 80 may go .* at most 31.2%"):
        attention_pruning_mask(stats, 0.5)
    with pytest.raises(ValueError, match="fraction to prune"):
        attention_pruning_mask(stats, 1.0)
    with pytest.raises(ValueError, match="scope"):
        attention_pruning_mask(stats, 0.1, scope="model")


@pytest.mark.parametrize("causal", [False, True])
def test_data_budget_matches_the_collected_data(causal):
    lengths = [9, 7, 7, 5, 3, 2]
    stats = synthetic_stats(lengths, 9, causal=causal)
    for f in (0.2, 0.5):
        keep = attention_pruning_mask(stats, f, budget="data")
        rep = data_report(keep, stats)
        # to within one entry's weight (the most examples any pair occurs in), per layer
        assert (rep.per_layer - f).abs().max() <= int(stats.counts.max()) / int(stats.counts.sum() * 4) + 1e-12
        # data_report is the sparsity measured on those examples, each cropped to its length
        layout = TokenLayout.from_lengths(lengths, causal=causal)
        measured = measure_plan(mask_plan(keep).resolve(3, 4), layout)
        assert torch.equal(measured.kept, rep.kept) and torch.equal(measured.allowed, rep.allowed)


@pytest.mark.parametrize("scope", ["layer", "head"])
@pytest.mark.parametrize("budget", ["grid", "data"])
def test_random_baseline_has_the_same_sparsity(scope, budget):
    lengths = [10, 10, 8, 6, 3]
    stats = synthetic_stats(lengths, 10, causal=False)
    allowed = hand_allowed(10, False)
    for f in (0.2, 0.6, 0.8):  # (at 90% every off-diagonal candidate of a 10-grid goes: nothing to draw)
        keep = attention_pruning_mask(stats, f, scope=scope, budget=budget)
        rand = random_like(keep, stats, scope=scope, budget=budget, seed=3)
        assert rand.diagonal(dim1=-2, dim2=-1).all() and not (rand & ~allowed).any()
        assert not torch.equal(rand, keep)
        assert torch.equal(rand, random_like(keep, stats, scope=scope, budget=budget, seed=3))
        assert not torch.equal(rand, random_like(keep, stats, scope=scope, budget=budget, seed=4))
        if budget == "grid":
            dim = (1, 2, 3) if scope == "layer" else (2, 3)
            assert torch.equal((allowed & ~rand).sum(dim=dim), (allowed & ~keep).sum(dim=dim))
        else:
            a, r = data_report(keep, stats), data_report(rand, stats)
            per = r.per_layer if scope == "layer" else r.per_head
            ref = a.per_layer if scope == "layer" else a.per_head
            weight = int(stats.counts.max()) / int(stats.counts.sum() * (4 if scope == "layer" else 1))
            assert (per - ref).abs().max() <= weight + 1e-12


def test_block_variants():
    stats = synthetic_stats([16, 16, 13, 9], 16, causal=False)
    allowed = hand_allowed(16, False)
    keep = attention_pruning_mask(stats, 0.7)
    blocky = expand_to_blocks(keep, allowed, 4)
    assert (blocky | ~keep).all(), "expanding to blocks only adds entries"
    tiles = blocky.reshape(3, 4, 4, 4, 4, 4)
    assert (tiles.all(dim=(3, 5)) | ~tiles.any(dim=(3, 5))).all(), "every tile is all kept or all pruned"
    assert grid_report(mask_plan(blocky), stats, block_size=4).block_density == \
        grid_report(mask_plan(keep), stats, block_size=4).block_density
    # tiles ranked by attention mass: exactly round(p * 16) of the 16 tiles of each layer's heads go
    for scope in ("layer", "head"):
        bm = block_mask(stats, 0.5, 4, scope=scope)
        t = bm.reshape(3, 4, 4, 4, 4, 4).any(dim=5).any(dim=3)  # (layers, heads, 4, 4)
        assert t.diagonal(dim1=-2, dim2=-1).all()
        pruned = (~t).sum(dim=(-1, -2))
        if scope == "layer":
            assert pruned.sum(1).tolist() == [expected(0.5, 64)] * 3
        else:
            assert pruned.flatten().tolist() == [8] * 12
        report = grid_report(mask_plan(bm), stats, block_size=4)
        assert report.block_density == pytest.approx(0.5)
        assert report.overall == pytest.approx(0.5)  # 4 divides 16: whole tiles of 16 entries
    # a pruned tile never holds more mass than a kept off-diagonal tile of the same head
    bm = block_mask(stats, 0.5, 4, scope="head")
    mass = (stats.mean()).reshape(3, 4, 4, 4, 4, 4).sum(dim=(3, 5))
    t = bm.reshape(3, 4, 4, 4, 4, 4).any(dim=5).any(dim=3)
    off = ~torch.eye(4, dtype=torch.bool)
    for layer in range(3):
        for h in range(4):
            assert mass[layer, h][~t[layer, h]].max() <= mass[layer, h][t[layer, h] & off].min()
    with pytest.raises(ValueError, match="at most"):
        block_mask(stats, 0.8, 4)  # the 4 diagonal tiles of 16 stay: at most 75%


def test_mask_plan_crops_shorter_inputs_and_refuses_longer():
    stats = synthetic_stats([8, 5], 8, causal=True)
    keep = attention_pruning_mask(stats, 0.4)
    plan = mask_plan(keep)
    lp = plan.resolve(3, 4)[1]
    short = lp.mask(TokenLayout.from_lengths([5, 3], causal=True))
    assert torch.equal(short[0], keep[1, :, :5, :5])
    assert torch.equal(short[1, :, :3, :3], keep[1, :, :3, :3])
    with pytest.raises(ValueError, match="at most 8 tokens.*example of 9"):
        lp.mask(TokenLayout.from_lengths([9], causal=True))
