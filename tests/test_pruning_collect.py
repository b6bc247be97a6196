"""Attention statistics (sparseattn ap collect) against a brute-force average, example by example."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_bert, tiny_llama
from sparseattn.pruning import AttentionStats, Example, collect_attention
from sparseattn.pruning.data import load_text_file

SENTENCES = [
    "a gripping , funny film .",
    "it is not a good movie",
    "the acting is wooden and the plot goes nowhere , slowly .",
    "charming",
    "an utterly predictable story told with real warmth and wit by a director who cares",
    "bad .",
    "one of the year 's best .",
]
PAIRS = [("the cat sat .", "a cat was sitting on the mat ."), ("stocks fell", "markets dropped sharply today ."),
         ("he left early", "she stayed")]


def brute_force(model, tokenizer, examples, L):
    """Sums and counts by running every example alone (no padding) through eager attention."""
    model.set_attn_implementation("eager")
    cfg = model.config
    sums = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, L, L, dtype=torch.float64)
    counts = torch.zeros(L, L, dtype=torch.long)
    causal = cfg.model_type == "llama"
    with torch.no_grad():
        for e in examples:
            enc = tokenizer(e.text, e.pair, return_tensors="pt")
            if causal:
                enc.pop("token_type_ids", None)
            out = model(**enc, output_attentions=True)
            n = enc["input_ids"].shape[1]
            allowed = torch.ones(n, n, dtype=torch.bool)
            if causal:
                allowed = allowed.tril()
            for layer, att in enumerate(out.attentions):
                sums[layer, :, :n, :n] += att[0].double() * allowed
            counts[:n, :n] += allowed.long()
    model.set_attn_implementation("sdpa")
    return sums, counts


@pytest.fixture(scope="module")
def bert(tokenizer):
    return tiny_bert(vocab_size=tokenizer.vocab_size)


def test_average_equals_brute_force_encoder(bert, tokenizer):
    examples = [Example(s) for s in SENTENCES]
    stats = collect_attention(bert, tokenizer, examples, length=24, batch_size=3, progress=False)
    sums, counts = brute_force(bert, tokenizer, examples, 24)
    assert torch.equal(stats.counts, counts)
    torch.testing.assert_close(stats.sums, sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.mean(), sums / counts.clamp(min=1), atol=1e-6, rtol=1e-5)
    assert not stats.causal and stats.num_examples == len(examples)
    assert stats.longest == int(counts.diagonal().gt(0).sum())
    assert not bert.training and getattr(bert, "_sparseattn", None) is None  # handed back as it was


def test_average_equals_brute_force_pairs(bert, tokenizer):
    examples = [Example(a, b) for a, b in PAIRS]
    stats = collect_attention(bert, tokenizer, examples, length=20, batch_size=2, progress=False)
    sums, counts = brute_force(bert, tokenizer, examples, 20)
    assert torch.equal(stats.counts, counts)
    torch.testing.assert_close(stats.sums, sums, atol=1e-5, rtol=1e-5)


def test_average_equals_brute_force_decoder(tokenizer):
    llama = tiny_llama(vocab_size=tokenizer.vocab_size)
    examples = [Example(s) for s in SENTENCES]
    stats = collect_attention(llama, tokenizer, examples, length=24, batch_size=4, progress=False)
    sums, counts = brute_force(llama, tokenizer, examples, 24)
    assert stats.causal and stats.metadata["decoder"]
    assert not stats.counts.triu(1).any(), "a decoder's future keys are never allowed"
    assert torch.equal(stats.counts, counts)
    torch.testing.assert_close(stats.sums, sums, atol=1e-5, rtol=1e-5)


def test_padding_invariance(bert, tokenizer):
    """The same data batched one by one (no padding), in threes, and all at once (padded to the longest)."""
    examples = [Example(s) for s in SENTENCES]
    runs = [collect_attention(bert, tokenizer, examples, length=24, batch_size=b, progress=False) for b in (1, 3, 7)]
    for r in runs[1:]:
        assert torch.equal(r.counts, runs[0].counts)
        torch.testing.assert_close(r.mean(), runs[0].mean(), atol=1e-6, rtol=1e-5)
    # order does not matter either
    shuffled = collect_attention(bert, tokenizer, examples[::-1], length=24, batch_size=2, progress=False)
    torch.testing.assert_close(shuffled.mean(), runs[0].mean(), atol=1e-6, rtol=1e-5)


def test_longer_examples_refused_truncated_or_skipped(bert, tokenizer):
    examples = [Example(s) for s in SENTENCES]
    n_long = sum(len(tokenizer(s)["input_ids"]) > 8 for s in SENTENCES)
    assert 0 < n_long < len(SENTENCES)
    with pytest.raises(ValueError, match=r"longer than the grid of 8 tokens.*--longer truncate"):
        collect_attention(bert, tokenizer, examples, length=8, progress=False)
    cut = collect_attention(bert, tokenizer, examples, length=8, longer="truncate", progress=False)
    assert cut.metadata["truncated"] == n_long and cut.num_examples == len(examples)
    skipped = collect_attention(bert, tokenizer, examples, length=8, longer="skip", progress=False)
    assert skipped.metadata["skipped"] == n_long and skipped.num_examples == len(examples) - n_long


def test_save_load_and_merge(bert, tokenizer, tmp_path):
    a = collect_attention(bert, tokenizer, [Example(s) for s in SENTENCES[:4]], length=24, progress=False,
                          metadata={"model": "tiny", "data": "unit test"})
    b = collect_attention(bert, tokenizer, [Example(s) for s in SENTENCES[4:]], length=24, progress=False)
    path = a.save(tmp_path / "a.safetensors")
    back = AttentionStats.load(path)
    assert torch.equal(back.sums, a.sums) and torch.equal(back.counts, a.counts)
    assert back.metadata["model"] == "tiny" and back.metadata["examples"] == 4 and back.length == 24
    whole = collect_attention(bert, tokenizer, [Example(s) for s in SENTENCES], length=24, progress=False)
    merged = a + b
    torch.testing.assert_close(merged.mean(), whole.mean(), atol=1e-6, rtol=1e-5)
    assert merged.metadata["examples"] == len(SENTENCES)
    cropped = whole.cropped(10)
    assert torch.equal(cropped.sums, whole.sums[..., :10, :10])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        AttentionStats.load(tmp_path / "bad.safetensors")


def test_text_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("first sentence\tits pair\nsecond\tpair two\n")
    ex = load_text_file(f)
    assert ex[1] == Example("second", "pair two")
    f.write_text("one\n\nthree\n")
    with pytest.raises(ValueError, match=r"data.txt:2: empty text"):
        load_text_file(f)
    f.write_text("a\tb\tc\n")
    with pytest.raises(ValueError, match=r"data.txt:1: 3 tab-separated fields"):
        load_text_file(f)
    f.write_text("a\tb\nc\n")
    with pytest.raises(ValueError, match=r"data.txt:2: mixes single texts and tab-separated pairs"):
        load_text_file(f)
