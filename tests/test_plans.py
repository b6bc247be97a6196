"""Plans: the text spec and its round trip, layer and head selectors, resolution against a model's
shape, and per-layer masks with per-head rules."""

from __future__ import annotations

import pytest
import torch

import sparseattn as sa
from sparseattn.plans import LayerPlan, Plan, PlanError, PlanSpecError, Rule

from conftest import hand_mask, make_layout


@pytest.mark.parametrize("text", [
    "dense",
    "all: neighbour(2)",
    "later-half: neighbour(2) | global_tokens(1)",
    "first-half: bigbird(1, 2, 3)",
    "layers=3-5: neighbour(2) | global_tokens(1)",
    "layers=0,2,4-5: random(4, seed=7)",
    "heads=0-5@layers=all: random(4)",
    "heads=1,3@layers=2: strided(3) & causal(); heads=0@layers=2: full()",
    "layers=0: syntax(1, special='global'); layers=1: lexical(by='lemma') | similar(2)",
    "later-half: (neighbour(1) | global_tokens('special')) & strided(2)",
])
def test_spec_round_trip(text):
    plan = Plan.parse(text)
    assert Plan.parse(plan.spec()) == plan
    assert Plan.parse(plan.spec()).spec() == plan.spec()  # the canonical form is a fixed point
    assert hash(Plan.parse(plan.spec())) == hash(plan)


def test_spec_forms_that_mean_the_same_plan():
    a = Plan.parse("layers=3-5: neighbour(2) | global_tokens(1)")
    for text in ["layers=3,4,5:neighbour(2)|global_tokens(1)",
                 "  layers=3-5 :  neighbour( 2 ) | global_tokens(1)  # a comment",
                 "# header comment\nlayers=5,3-4: neighbour(2) | global_tokens(1)\n"]:
        assert Plan.parse(text) == a, text
    assert a == Plan([Rule(sa.neighbour(2) | sa.global_tokens(1), layers=(5, 4, 3))])
    assert Plan.parse("neighbour(1)") == Plan.everywhere(sa.neighbour(1))  # no selector: every layer and head
    assert Plan.parse("dense") == Plan.dense() == Plan.parse("none") == Plan.parse("dense # no sparsity")
    two = Plan.parse("layers=0: neighbour(1); layers=1: random(2)")
    assert two == Plan.parse("layers=0: neighbour(1)\nlayers=1: random(2)")
    assert two == Plan.parse("layers=0: neighbour(1)") + Plan.parse("layers=1: random(2)")
    assert two != Plan.parse("layers=0: neighbour(1); layers=1: random(3)")


def test_names_are_stable():
    assert Plan.parse("later-half: neighbour(2) | global_tokens(1)").name == \
        "later-half:or(neighbour_2,global_tokens_1)"
    assert Plan.parse("heads=0-5@layers=1,3: random(4)").name == "heads=0-5@layers=1,3:random_4"
    assert Plan.dense().name == "dense" and Plan.dense().spec() == "dense"


def _covered(plan: Plan, num_layers: int, num_heads: int) -> set[tuple[int, int]]:
    out = set()
    for lp in plan.resolve(num_layers, num_heads):
        assert lp.layer < num_layers and lp.num_heads == num_heads
        for heads, _ in lp.entries:
            out |= {(lp.layer, h) for h in (range(num_heads) if heads is None else heads)}
    return out


@pytest.mark.parametrize("selector,num_layers,layers", [
    ("all", 6, range(6)),
    ("later-half", 6, [3, 4, 5]),
    ("later-half", 7, [3, 4, 5, 6]),  # an odd middle layer belongs to the later half
    ("first-half", 6, [0, 1, 2]),
    ("first-half", 7, [0, 1, 2]),
    ("later-half", 1, [0]),
    ("first-half", 2, [0]),
    ("layers=1,3-4", 6, [1, 3, 4]),
    ("layers=all", 3, range(3)),
])
def test_layer_selectors(selector, num_layers, layers):
    plan = Plan.parse(f"{selector}: neighbour(1)")
    assert _covered(plan, num_layers, 4) == {(l, h) for l in layers for h in range(4)}


def test_first_and_later_half_partition_the_layers():
    for n in range(1, 10):
        plan = Plan.parse("first-half: neighbour(1); later-half: random(2)")
        assert _covered(plan, n, 2) == {(l, h) for l in range(n) for h in range(2)}


def test_head_selectors():
    plan = Plan.parse("heads=0-1@layers=2: neighbour(1); heads=3@layers=2: random(2); heads=2: strided(2)")
    assert _covered(plan, 4, 4) == {(2, 0), (2, 1), (2, 3)} | {(l, 2) for l in range(4)}
    lps = plan.resolve(4, 4)
    assert lps[0].entries == [((2,), sa.strided(2))]
    assert lps[2].entries == [((0, 1), sa.neighbour(1)), ((3,), sa.random(2)), ((2,), sa.strided(2))]
    assert Plan.parse("layers=1@heads=0-1: full()") == Plan.parse("heads=0-1@layers=1: full()")
    # heads naming every head mean "all heads" (one shared mask)
    assert Plan.parse("heads=0-3@layers=0: neighbour(1)").resolve(1, 4)[0].entries == [(None, sa.neighbour(1))]


def test_overlapping_rules_are_refused():
    with pytest.raises(PlanError, match=r"layer 2 head 0 is covered by two rules: 'all: neighbour\(1\)' and "
                                        r"'layers=2: random\(2\)'"):
        Plan.parse("all: neighbour(1); layers=2: random(2)").resolve(4, 4)
    with pytest.raises(PlanError, match="layer 3 head 1 is covered by two rules"):
        Plan.parse("heads=0-1@later-half: neighbour(1); heads=1-2@layers=3: random(2)").resolve(4, 4)
    # disjoint heads of one layer are fine
    Plan.parse("heads=0-1@layers=2: neighbour(1); heads=2-3@layers=2: random(2)").resolve(4, 4)


def test_resolve_checks_ranges_against_the_model():
    plan = Plan.parse("layers=2-6: neighbour(1)")
    assert len(plan.resolve(7, 2)) == 7
    with pytest.raises(PlanError, match=r"layer 6 is out of range for a model with 6 layers \(0-5\)"):
        plan.resolve(6, 2)
    plan = Plan.parse("heads=4-12@layers=0: neighbour(1)")
    plan.resolve(1, 13)
    with pytest.raises(PlanError, match=r"head 12 is out of range for a model with 12 heads \(0-11\)"):
        plan.resolve(1, 12)


def test_rules_from_python():
    r = Rule(sa.neighbour(2), layers=[5, 3, 4, 3])
    assert r.layers == (3, 4, 5) and r.heads is None
    assert r.spec() == "layers=3-5: neighbour(2)"
    assert Rule(sa.neighbour(2), layers=1, heads=[2, 0]).spec() == "heads=0,2@layers=1: neighbour(2)"
    assert Rule(sa.neighbour(2), heads="all").heads is None
    with pytest.raises(PlanError, match="unknown layer set 'second-half'"):
        Rule(sa.neighbour(2), layers="second-half")
    with pytest.raises(PlanError, match="layers must be >= 0, got -1"):
        Rule(sa.neighbour(2), layers=[0, -1])
    with pytest.raises(PlanError, match="heads is empty"):
        Rule(sa.neighbour(2), heads=[])
    with pytest.raises(TypeError, match="Rule.pattern must be a Pattern"):
        Rule("neighbour(2)")
    with pytest.raises(TypeError, match="Plan takes Rule objects"):
        Plan([sa.neighbour(2)])


# -- LayerPlan.mask --------------------------------------------------------------------------------
def test_layer_plan_mask_with_per_head_rules():
    layout = make_layout([7, 4, 1], "left", 1)
    plan = Plan.parse("heads=0-1@layers=1: neighbour(1); heads=3@layers=1: random(2, seed=3)")
    dense, lp = plan.resolve(2, 5)
    assert dense.is_dense and torch.equal(dense.mask(layout), layout.allowed())
    m = lp.mask(layout)
    assert m.shape == (3, 5, 8, 8)
    nb = hand_mask(layout.real, lambda b, h, i, j, *_: abs(i - j) <= 1)
    for h in (0, 1):
        assert torch.equal(m[:, h], nb[:, 0])
    for h in (2, 4):  # heads no rule names stay dense: exactly the allowed pairs
        assert torch.equal(m[:, h], layout.allowed()[:, 0])
    rnd = sa.random(2, seed=3).mask(layout, layer=1, num_heads=5)
    assert torch.equal(m[:, 3], rnd[:, 3])  # head 3 of the layer's draw, not head 0


def test_layer_plan_shares_one_mask_when_all_heads_agree():
    layout = make_layout([5, 3])
    lp = Plan.parse("all: neighbour(1)").resolve(1, 12)[0]
    assert lp.mask(layout).shape == (2, 1, 5, 5)


def test_mask_cache_is_keyed_by_layer_for_per_layer_patterns():
    layout = make_layout([12, 9])
    lps = Plan.parse("all: random(2) | neighbour(1)").resolve(3, 4)
    cache: dict = {}
    masks = [lp.mask(layout, cache) for lp in lps]
    for lp, m in zip(lps, masks):
        assert torch.equal(m, lp.mask(layout))  # the cache never changes a result
    assert not torch.equal(masks[0], masks[1])
    lps = Plan.parse("all: neighbour(1)").resolve(3, 4)
    cache = {}
    a, b = lps[0].mask(layout, cache), lps[2].mask(layout, cache)
    assert a is b  # a position-only, layer-independent mask is built once per forward pass


def test_layer_plan_direct():
    lp = LayerPlan(layer=0, num_heads=2, entries=[((1,), sa.neighbour(0))])
    layout = make_layout([3])
    m = lp.mask(layout)
    assert torch.equal(m[0, 0], torch.ones(3, 3, dtype=torch.bool))
    assert torch.equal(m[0, 1], torch.eye(3, dtype=torch.bool))
    assert lp.patterns == [sa.neighbour(0)] and not lp.is_dense


def test_spec_errors_point_at_the_offending_part():
    text = "layers=0-1: neighbour(2); later-half: neigbour(2)"
    with pytest.raises(PlanSpecError) as e:
        Plan.parse(text)
    msg = str(e.value)
    assert "unknown pattern 'neigbour'; did you mean 'neighbour'?" in msg
    line, caret = msg.splitlines()[-2:]
    assert line.strip() == text
    start = caret.index("^")
    assert caret[start:].strip() == "^" * len("neigbour")
    assert line[start:start + len("neigbour")] == "neigbour"
    assert e.value.start == text.index("neigbour")
