"""Properties every keep-mask must have, for random positional patterns (and their unions and
intersections) on random padded batches, checked with hypothesis against loops over pairs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn.layout import TokenLayout
from sparseattn.plans.spec import parse_pattern
from sparseattn.sparsity import mask_sparsity, measure_plan

from conftest import examples_of, make_layout, real_positions

MAX_LEN = 10
MAX_EXTRA = 3
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _static_table(bits):
    # keyed by content: two different tables in one pattern must not share a key
    key = "t" + format(int("".join("1" if b else "0" for b in bits), 2), "x")
    return sa.static_mask(torch.tensor(bits).reshape(MAX_LEN, MAX_LEN), key=key)


def _static_tables():
    return st.lists(st.booleans(), min_size=MAX_LEN * MAX_LEN, max_size=MAX_LEN * MAX_LEN).map(_static_table)


base_patterns = st.one_of(
    st.integers(0, 5).map(sa.neighbour),
    st.integers(0, 3).map(sa.global_tokens),
    st.builds(sa.random, st.integers(0, 4), seed=st.integers(0, 3)),
    st.integers(1, 4).map(sa.strided),
    st.just(sa.full()),
    st.just(sa.causal()),
    st.builds(sa.bigbird, st.integers(0, 2), st.integers(0, 3), st.integers(0, 3), seed=st.integers(0, 2)),
    _static_tables(),
)

positional_patterns = st.recursive(
    base_patterns,
    lambda inner: st.tuples(inner, inner, st.booleans()).map(lambda t: t[0] | t[1] if t[2] else t[0] & t[1]),
    max_leaves=4,
)


@st.composite
def batches(draw):
    lengths = draw(st.lists(st.integers(1, MAX_LEN), min_size=1, max_size=4))
    side = draw(st.sampled_from(["right", "left"]))
    extra = draw(st.integers(0, MAX_EXTRA))
    causal = draw(st.booleans())
    return lengths, side, extra, causal


def _brute_counts(mask, real, causal):
    """(kept, allowed) summed over batch and heads by a loop over pairs, from first principles."""
    kept = allowed = 0
    B, H, L, _ = mask.shape
    for b in range(B):
        pos = real_positions(real[b])
        for i in range(L):
            for j in range(L):
                if pos[i] < 0 or pos[j] < 0 or (causal and pos[j] > pos[i]):
                    continue
                allowed += H
                kept += int(mask[b, :, i, j].sum())
    return kept, allowed


@SETTINGS
@given(pattern=positional_patterns, batch=batches(), num_heads=st.integers(1, 3), layer=st.integers(0, 3))
def test_mask_guarantees(pattern, batch, num_heads, layer):
    lengths, side, extra, causal = batch
    layout = make_layout(lengths, side, extra, causal=causal)
    m = pattern.mask(layout, layer=layer, num_heads=num_heads)
    B, L = layout.real.shape
    assert m.dtype == torch.bool and m.dim() == 4 and m.shape[0] == B and m.shape[2:] == (L, L)
    assert m.shape[1] in (1, num_heads)
    real = layout.real
    # self-connections of real tokens are always kept, so no real row is empty
    diag = m.diagonal(dim1=-2, dim2=-1)  # (B, H', L)
    assert torch.equal(diag, real[:, None, :].expand_as(diag))
    # padding rows and columns are all False
    assert not m[~real[:, None, :, None].expand_as(m)].any()
    assert not m[~real[:, None, None, :].expand_as(m)].any()
    if causal:  # a decoder never keeps a future key
        for b in range(B):
            pos = real_positions(real[b])
            for i in range(L):
                for j in range(L):
                    if pos[i] >= 0 and pos[j] > pos[i]:
                        assert not m[b, :, i, j].any()
    if pattern.symmetric and not causal:
        assert torch.equal(m, m.transpose(-1, -2)), f"{pattern.name} claims symmetry"


@SETTINGS
@given(pattern=positional_patterns, batch=batches(), num_heads=st.integers(1, 3))
def test_sparsity_matches_a_brute_force_count(pattern, batch, num_heads):
    lengths, side, extra, causal = batch
    layout = make_layout(lengths, side, extra, causal=causal)
    m = pattern.mask(layout, layer=1, num_heads=num_heads).expand(-1, num_heads, -1, -1)
    kept, allowed = _brute_counts(m, layout.real, causal)
    want = 1 - kept / allowed
    s = mask_sparsity(m, layout)
    assert 0.0 <= s <= 1.0
    assert s == pytest.approx(want, abs=1e-12)
    # the same number through a plan (pattern on layer 1 of 2; layer 0 dense)
    report = measure_plan(sa.Plan.parse(f"layers=1: {pattern.spec()}", tables=pattern.tensors()).resolve(2, num_heads),
                          layout)
    assert report.per_layer[1].item() == pytest.approx(want, abs=1e-12)
    assert report.per_layer[0].item() == 0.0
    assert report.applied_sparsity == pytest.approx(want, abs=1e-12)
    assert report.overall == pytest.approx(want / 2, abs=1e-12)  # both layers allow the same pairs


@SETTINGS
@given(pattern=positional_patterns, batch=batches(), num_heads=st.integers(1, 3), layer=st.integers(0, 3))
def test_same_seed_same_mask(pattern, batch, num_heads, layer):
    lengths, side, extra, causal = batch
    layout = make_layout(lengths, side, extra, causal=causal)
    again = parse_pattern(pattern.spec(), tables=pattern.tensors())  # a fresh object from the spec
    assert again == pattern and again.name == pattern.name
    assert torch.equal(pattern.mask(layout, layer=layer, num_heads=num_heads),
                       again.mask(layout, layer=layer, num_heads=num_heads))


@SETTINGS
@given(pattern=positional_patterns, lengths=st.lists(st.integers(1, MAX_LEN), min_size=1, max_size=4),
       extra=st.integers(0, MAX_EXTRA), causal=st.booleans(), num_heads=st.integers(1, 3))
def test_left_and_right_padding_give_the_same_examples(pattern, lengths, extra, causal, num_heads):
    masks = {}
    for side in ("right", "left"):
        layout = make_layout(lengths, side, extra, causal=causal)
        masks[side] = examples_of(pattern.mask(layout, layer=2, num_heads=num_heads), layout.real)
    for n, a, b in zip(lengths, masks["right"], masks["left"]):
        alone = pattern.mask(make_layout([n], causal=causal), layer=2, num_heads=num_heads)[0]
        assert torch.equal(a, b) and torch.equal(a, alone)


@pytest.mark.parametrize("spec", ["neighbour(0)", "neighbour(3)", "strided(4)", "causal()", "full()",
                                  "global_tokens(2)", "neighbour(2) | global_tokens(1)", "neighbour(5) & strided(2)"])
@pytest.mark.parametrize("causal", [False, True])
def test_index_relation_is_the_relation_on_unpadded_examples(spec, causal):
    from sparseattn.patterns.base import positional_grid

    p = parse_pattern(spec)
    layout = TokenLayout.from_lengths([23, 23], causal=causal)
    rel = p.index_relation()
    assert rel is not None
    want = p.relation(layout, layer=0, num_heads=1)
    got = rel(*positional_grid(layout))
    assert torch.equal(got.expand_as(want), want)


@pytest.mark.parametrize("spec", ["random(2)", "global_tokens('special')", "syntax(1)", "neighbour(2) | random(1)"])
def test_patterns_beyond_positions_have_no_index_relation(spec):
    assert parse_pattern(spec).index_relation() is None


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_prefix_stable_patterns_crop_to_shorter_sequences(causal):
    """A pattern that says it is prefix-stable has, on n tokens, exactly its mask on a longer sequence cropped to
    n; one that says it is not differs somewhere (so the flag is not merely conservative for these)."""
    table = torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(0)) < 0.3
    specs = ["neighbour(2)", "global_tokens(2)", "strided(3)", "full()", "causal()", "random(3)",
             "bigbird(1, 2, 2)", "random_blocks(2, block=4)", "neighbour(1) | random(2)", "static_mask('t')"]
    for spec in specs:
        lp = sa.Plan.parse(f"all: {spec}", tables={"t": table}).resolve(1, 2)[0]
        p = lp.entries[0][1]
        long = lp.mask(TokenLayout.from_lengths([40], causal=causal))
        same = all(torch.equal(lp.mask(TokenLayout.from_lengths([n], causal=causal)), long[..., :n, :n])
                   for n in (5, 17, 23, 33))
        if p.prefix_stable(causal):
            assert same, spec
        elif not causal and spec.startswith(("random(", "bigbird")):
            assert not same, spec
