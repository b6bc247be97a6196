"""Each pattern against a keep-mask built by hand (loops over pairs, see conftest.hand_mask), on small
batches with right padding, left padding and extra padding, for encoders and decoders."""

from __future__ import annotations

import itertools

import pytest
import torch

import sparseattn as sa
from sparseattn.layout import TokenLayout
from sparseattn.plans.spec import parse_pattern

from conftest import examples_of, hand_mask, make_layout, padded_real, real_positions

LENGTHS = [6, 3, 1, 5]
SIDES = ["right", "left"]


def check(pattern, relation, *, lengths=LENGTHS, side="right", extra=1, causal=False, num_heads=1, layer=0,
          special=0):
    layout = make_layout(lengths, side, extra, causal=causal, special=special)
    got = pattern.mask(layout, layer=layer, num_heads=num_heads)
    want = hand_mask(layout.real, relation, causal=causal, num_heads=got.shape[1])
    assert got.dtype == torch.bool and got.shape == want.shape
    assert torch.equal(got, want), f"{pattern.name} differs from the hand-built mask ({side} padding)"
    return got


# -- positional patterns ---------------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [0, 1, 2, 7])
def test_neighbour(k, side, causal):
    check(sa.neighbour(k), lambda b, h, i, j, *_: abs(i - j) <= k, side=side, causal=causal)


def test_neighbour_is_a_band_by_broadcasting():
    # the attention-gym style check: one unpadded example against plain broadcasting
    L, k = 9, 2
    i = torch.arange(L)
    want = (i[:, None] - i[None, :]).abs() <= k
    assert torch.equal(sa.neighbour(k).mask(TokenLayout.from_lengths([L]))[0, 0], want)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("g", [0, 1, 2, 10])
def test_global_tokens(g, side, causal):
    check(sa.global_tokens(g), lambda b, h, i, j, *_: i < g or j < g, side=side, causal=causal)


@pytest.mark.parametrize("side", SIDES)
def test_global_special_tokens(side):
    layout = make_layout(LENGTHS, side, 1, special=1)
    special = layout.special

    def rel(b, h, i, j, ti, tj):
        return bool(special[b, ti]) or bool(special[b, tj])

    got = sa.global_tokens("special").mask(layout)
    assert torch.equal(got, hand_mask(layout.real, rel))
    # [CLS] and [SEP] rows are full over the real tokens of their example
    for b, n in enumerate(LENGTHS):
        idx = layout.real[b].nonzero().flatten()
        assert got[b, 0, idx[0], idx].all() and got[b, 0, idx[-1], idx].all()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [1, 2, 3])
def test_strided(s, side, causal):
    check(sa.strided(s), lambda b, h, i, j, *_: (i - j) % s == 0, side=side, causal=causal)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("causal", [False, True])
def test_full_is_the_allowed_pairs(side, causal):
    got = check(sa.full(), lambda *_: True, side=side, causal=causal)
    layout = make_layout(LENGTHS, side, 1, causal=causal)
    assert torch.equal(got, layout.allowed())


@pytest.mark.parametrize("side", SIDES)
def test_causal_on_an_encoder(side):
    check(sa.causal(), lambda b, h, i, j, *_: j <= i, side=side)


def test_causal_on_a_decoder_changes_nothing():
    layout = make_layout(LENGTHS, "left", 2, causal=True)
    assert torch.equal(sa.causal().mask(layout), layout.allowed())


# -- random ----------------------------------------------------------------------------------------
def _off_diagonal_degrees(mask, layout):
    """Kept keys per real query, excluding the query itself, and the candidate count: lists per (b, h, i)."""
    allowed = layout.allowed()
    out = []
    B, H, L, _ = mask.shape
    for b in range(B):
        for h in range(H):
            for i in range(L):
                if not layout.real[b, i]:
                    continue
                cand = [j for j in range(L) if j != i and allowed[b, 0, i, j]]
                kept = [j for j in range(L) if j != i and mask[b, h, i, j]]
                out.append((kept, cand))
    return out


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("r", [0, 1, 3, 20])
def test_random_degree_is_exact(r, side, causal):
    layout = make_layout([9, 4, 1, 7], side, 2, causal=causal)
    mask = sa.random(r).mask(layout, layer=1, num_heads=3)
    assert mask.shape[1] in (1, 3)  # a head dimension of 1 broadcasts (random(0) is the same in every head)
    mask = mask.expand(4, 3, layout.length, layout.length)
    for kept, cand in _off_diagonal_degrees(mask, layout):
        assert set(kept) <= set(cand)
        assert len(kept) == min(r, len(cand))
    # nothing outside the allowed pairs, and the diagonal kept
    assert not (mask & ~layout.allowed()).any()
    assert torch.equal(mask & layout.diagonal(), layout.diagonal().expand_as(mask))


def test_random_differs_per_head_and_per_layer():
    layout = make_layout([16])
    p = sa.random(3)
    m0 = p.mask(layout, layer=0, num_heads=4)[0]
    m1 = p.mask(layout, layer=1, num_heads=4)[0]
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.equal(m0[a], m0[b]), f"heads {a} and {b} drew the same keys"
    for h in range(4):
        assert not torch.equal(m0[h], m1[h]), f"head {h} drew the same keys in layers 0 and 1"


def test_random_is_deterministic_per_seed():
    layout = make_layout([12, 7], "left", 1)
    a = sa.random(3, seed=5).mask(layout, layer=2, num_heads=4)
    b = parse_pattern("random(3, seed=5)").mask(layout, layer=2, num_heads=4)
    c = sa.random(3, seed=6).mask(layout, layer=2, num_heads=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a head's draw does not depend on how many heads the layer has
    assert torch.equal(a[:, :2], sa.random(3, seed=5).mask(layout, layer=2, num_heads=2))


@pytest.mark.parametrize("causal", [False, True])
def test_random_is_padding_invariant(causal):
    """The same example gets the same random mask alone, right-padded, left-padded and batched."""
    lengths = [8, 3, 11, 5]
    p = sa.random(2, seed=1)
    alone = [p.mask(make_layout([n], causal=causal), layer=3, num_heads=4)[0] for n in lengths]
    for side, extra in [("right", 0), ("right", 3), ("left", 0), ("left", 2)]:
        layout = make_layout(lengths, side, extra, causal=causal)
        per_example = examples_of(p.mask(layout, layer=3, num_heads=4), layout.real)
        for n, a, got in zip(lengths, alone, per_example):
            assert torch.equal(got, a), f"example of length {n} changed under {side} padding (+{extra})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_random_and_similar_are_the_same_on_cuda_and_cpu():
    """"The same seed gives the same connections on any device": long rows, where float32 ties would show."""
    lengths = [512, 300, 7]
    for causal in (False, True):
        layout = make_layout(lengths, "left", 0, causal=causal)
        on_gpu = make_layout(lengths, "left", 0, causal=causal)
        on_gpu.real = on_gpu.real.cuda()
        for layer in range(4):
            for r in (1, 3, 8):
                cpu = sa.random(r, seed=layer).mask(layout, layer=layer, num_heads=12)
                gpu = sa.random(r, seed=layer).mask(on_gpu, layer=layer, num_heads=12)
                assert torch.equal(cpu, gpu.cpu()), (causal, layer, r)
    # similar: repeated tokens tie exactly; both devices keep the earlier key
    g = torch.Generator().manual_seed(0)
    vocab = torch.randn(20, 16, generator=g)
    ids = torch.randint(0, 20, (3, 64), generator=g)
    real = padded_real([64, 40, 9], "right")
    cpu = sa.similar(3).mask(TokenLayout(real=real, token_vectors=vocab[ids]))
    gpu = sa.similar(3).mask(TokenLayout(real=real.cuda(), token_vectors=vocab[ids].cuda()))
    assert torch.equal(cpu, gpu.cpu())


def test_random_draws_every_candidate_about_equally_often():
    # 256 independent draws (seeds x layers x heads) of 4 keys among 31 for the first query: each key is
    # expected 33 times; a biased draw (e.g. always the nearest keys) would fall far outside [10, 60].
    layout = make_layout([32])
    counts = torch.zeros(32)
    for seed in range(8):
        for layer in range(4):
            m = sa.random(4, seed=seed).mask(layout, layer=layer, num_heads=8)
            counts += m[0, :, 0].sum(0).float()
    assert counts[0] == 256  # the diagonal, every time
    assert counts[1:].sum() == 256 * 4
    assert counts[1:].min() >= 10 and counts[1:].max() <= 60, counts


# -- bigbird and composition -----------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_without_random_part(side, causal):
    check(sa.bigbird(1, 2, 0), lambda b, h, i, j, *_: i < 1 or j < 1 or abs(i - j) <= 2, side=side,
          causal=causal)


@pytest.mark.parametrize("side", SIDES)
def test_bigbird_is_the_union_of_its_parts(side):
    layout = make_layout([10, 6, 2], side, 1)
    bb = sa.bigbird(2, 1, 3, seed=4).mask(layout, layer=1, num_heads=3)
    rnd = sa.random(3, seed=4).mask(layout, layer=1, num_heads=3)
    want = hand_mask(layout.real, lambda b, h, i, j, ti, tj: i < 2 or j < 2 or abs(i - j) <= 1 or rnd[b, h, ti, tj],
                     num_heads=3)
    assert torch.equal(bb, want)
    assert sa.bigbird(2, 1, 3, seed=4).name == "bigbird_2_1_3_seed4"


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("causal", [False, True])
def test_union_and_intersection(side, causal):
    check(sa.neighbour(1) | sa.strided(3), lambda b, h, i, j, *_: abs(i - j) <= 1 or (i - j) % 3 == 0,
          side=side, causal=causal)
    check(sa.neighbour(3) & sa.strided(2), lambda b, h, i, j, *_: abs(i - j) <= 3 and (i - j) % 2 == 0,
          side=side, causal=causal)
    check(sa.causal() & (sa.neighbour(2) | sa.global_tokens(1)),
          lambda b, h, i, j, *_: j <= i and (abs(i - j) <= 2 or i < 1 or j < 1), side=side, causal=causal)


def test_intersection_of_disjoint_patterns_keeps_only_the_diagonal():
    layout = make_layout([7, 4], "right", 1)
    m = (sa.strided(2) & sa.global_tokens(0)).mask(layout)
    assert torch.equal(m, layout.diagonal())


def test_composition_flattens_and_names():
    p = (sa.neighbour(2) | sa.global_tokens(1)) | sa.random(3)
    assert p.name == "or(neighbour_2,global_tokens_1,random_3)"
    assert p.spec() == "(neighbour(2) | global_tokens(1) | random(3))"
    assert (sa.neighbour(2) & sa.causal()).name == "and(neighbour_2,causal)"
    assert p.per_head and p.per_layer and not p.symmetric
    with pytest.raises(TypeError, match="cannot combine 3"):
        sa.neighbour(1) | 3


@pytest.mark.parametrize("spec,name", [
    ("neighbour(2)", "neighbour_2"), ("global_tokens(1)", "global_tokens_1"),
    ("global_tokens('special')", "global_tokens_special"), ("random(4)", "random_4"),
    ("random(4, seed=2)", "random_4_seed2"), ("strided(3)", "strided_3"), ("full()", "full"),
    ("causal()", "causal"), ("bigbird(1, 2, 3)", "bigbird_1_2_3"), ("syntax(2)", "syntax_2"),
    ("syntax(1, special='global')", "syntax_1_global_special"), ("lexical()", "lexical"),
    ("lexical(by='lemma')", "lexical_lemma"), ("similar(3)", "similar_3"),
])
def test_names_are_stable_and_specs_round_trip(spec, name):
    p = parse_pattern(spec)
    assert p.name == name
    assert p.spec() == spec
    assert parse_pattern(p.spec()) == p


# -- static masks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("heads", [1, 3])
def test_static_mask_is_cropped_to_each_example(side, heads):
    g = torch.Generator().manual_seed(0)
    table = torch.rand(heads, 6, 6, generator=g) < 0.4
    p = sa.static_mask(table if heads > 1 else table[0], key="ap")
    layout = make_layout([6, 4, 1], side, 0)
    got = p.mask(layout, num_heads=3)
    want = hand_mask(layout.real, lambda b, h, i, j, *_: bool(table[h, i, j]), num_heads=heads)
    assert torch.equal(got, want)
    assert p.symmetric == bool(torch.equal(table, table.transpose(1, 2)))


def test_static_mask_refuses_longer_input():
    p = sa.static_mask(torch.ones(6, 6, dtype=torch.bool), key="ap")
    with pytest.raises(ValueError, match=r"at most 6 tokens.*example of 7"):
        p.mask(make_layout([7, 2]))
    p.mask(make_layout([6, 2], extra=3))  # padding beyond the table is fine


def test_static_mask_refuses_a_wrong_head_count():
    p = sa.static_mask(torch.ones(4, 5, 5, dtype=torch.bool), key="ap")
    with pytest.raises(ValueError, match="has 4 heads, the layer has 12"):
        p.mask(make_layout([5]), num_heads=12)


# -- similar ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("top_k", [0, 1, 3, 50])
def test_similar(top_k, side, causal):
    lengths = [7, 4, 1]
    real = padded_real(lengths, side, 1)
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(*real.shape, 5, generator=g)
    layout = TokenLayout(real=real, token_vectors=vectors, causal=causal)

    def cos(b, i, j):
        u, v = vectors[b, i].double(), vectors[b, j].double()
        return float(u @ v / (u.norm() * v.norm()))

    top = {}
    for b in range(len(lengths)):
        pos = real_positions(real[b])
        for i in range(real.shape[1]):
            if pos[i] < 0:
                continue
            cand = [j for j in range(real.shape[1]) if j != i and pos[j] >= 0 and (not causal or pos[j] <= pos[i])]
            top[b, i] = set(sorted(cand, key=lambda j: -cos(b, i, j))[:top_k])

    def rel(b, h, qp, kp, i, j):
        return j in top[b, i]

    assert torch.equal(sa.similar(top_k).mask(layout), hand_mask(real, rel, causal=causal))


@pytest.mark.parametrize("side", SIDES)
def test_similar_breaks_ties_towards_the_earlier_key(side):
    # repeated tokens have equal vectors: query 0 ties between keys 1, 3 and 4 and must keep 1 and 3
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8]), torch.tensor([0.0, 1.0])
    example = torch.stack([a, b, c, b, b])
    real = padded_real([5, 2], side, 1)
    vectors = torch.zeros(2, 6, 2)
    vectors[0, real[0]] = example
    vectors[1, real[1]] = example[:2]
    m = sa.similar(2).mask(TokenLayout(real=real, token_vectors=vectors))
    row = m[0, 0][real[0]][0, real[0]]
    assert row.tolist() == [True, True, False, True, False]


def test_similar_takes_vectors_lazily():
    calls = []

    def vectors():
        calls.append(1)
        return torch.eye(4)[None]

    layout = TokenLayout(real=torch.ones(1, 4, dtype=torch.bool), token_vectors=vectors)
    sa.neighbour(1).mask(layout)
    assert not calls  # positional patterns never compute embeddings
    m = sa.similar(1).mask(layout)
    assert calls == [1] and m.shape == (1, 1, 4, 4)


# -- lexical (words from the tokenizer's offsets) --------------------------------------------------
def _groups_mask(n_tokens, groups, special_rows=()):
    """(1, 1, n, n): tokens of one group attend to each other; special rows/cols attend everywhere."""
    m = torch.eye(n_tokens, dtype=torch.bool)
    for grp in groups:
        for a in grp:
            for b in grp:
                m[a, b] = True
    for s in special_rows:
        m[s, :] = True
        m[:, s] = True
    return m[None, None]


def _layout(enc):
    from sparseattn.model_sparsity import layout_of_batch

    return layout_of_batch(enc)


def test_lexical_by_lower_form(tokenizer):
    text = "I saw the Cat and the cat saw me."
    enc = sa.encode(tokenizer, [text])
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens == ["[CLS]", "i", "saw", "the", "cat", "and", "the", "cat", "saw", "me", ".", "[SEP]"]
    want = _groups_mask(12, [(2, 8), (3, 6), (4, 7)])
    layout = _layout(enc)
    assert torch.equal(sa.lexical(by="lower").mask(layout), want)
    assert torch.equal(sa.lexical(by="lower", special="global").mask(layout),
                       _groups_mask(12, [(2, 8), (3, 6), (4, 7)], special_rows=(0, 11)))
    # without a parser the segmentation has no lemmas; by='any' is the lower-case relation then
    assert torch.equal(sa.lexical().mask(layout), want)
    with pytest.raises(ValueError, match="lemma.*parser"):
        sa.lexical(by="lemma").mask(layout)


def test_lexical_by_lemma(tokenizer, parse_cache):
    text = "I saw the Cat and the cat saw me."
    enc = sa.encode(tokenizer, [text], parses=parse_cache)
    layout = _layout(enc)
    # spaCy's lemmas: saw -> see, me -> i; Cat/cat -> cat
    p = parse_cache.parse(text)
    assert p.lemmas[0] == p.lemmas[8] == "i" and p.lemmas[1] == p.lemmas[7] == "see"
    assert torch.equal(sa.lexical(by="lemma").mask(layout), _groups_mask(12, [(1, 9), (2, 8), (3, 6), (4, 7)]))
    assert torch.equal(sa.lexical(by="any").mask(layout), _groups_mask(12, [(1, 9), (2, 8), (3, 6), (4, 7)]))


def test_lexical_joins_pieces_of_a_word_but_not_equal_pieces_of_other_words(tokenizer):
    text = "The windows by the windowsill."
    enc = sa.encode(tokenizer, [text])
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens == ["[CLS]", "the", "windows", "by", "the", "windows", "##ill", ".", "[SEP]"]
    assert torch.equal(sa.lexical(by="lower").mask(_layout(enc)), _groups_mask(9, [(1, 4), (5, 6)]))


@pytest.mark.parametrize("side", SIDES)
def test_lexical_is_padding_invariant(tokenizer, side):
    texts = ["The windows by the windowsill.", "I saw the Cat and the cat saw me.", "Dogs bark."]
    alone = [sa.lexical(by="lower").mask(_layout(sa.encode(tokenizer, [t])))[0] for t in texts]
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        enc = sa.encode(tokenizer, texts)
    finally:
        tokenizer.padding_side = old
    layout = _layout(enc)
    assert layout.real[2, 0 if side == "left" else -1].item() is False  # really padded on that side
    for a, got in zip(alone, examples_of(sa.lexical(by="lower").mask(layout), layout.real)):
        assert torch.equal(got, a)


def test_neighbour_pair_count_by_formula():
    # a second, independent check: n(2k+1) - k(k+1) pairs within k of each other among n tokens
    for n, k in [(10, 0), (10, 2), (5, 9)]:
        kept = int(sa.neighbour(k).mask(TokenLayout.from_lengths([n])).sum())
        kk = min(k, n - 1)
        assert kept == n * (2 * kk + 1) - kk * (kk + 1)
