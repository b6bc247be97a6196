"""Causal language models: sliding-window perplexity against a hand computation, training that learns, a saved
model that scores the same, and bad inputs with clear errors. Tiny Llamas and a few hundred tokens of text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from sparseattn.cli import main
from sparseattn.integrations.hf import sparsify
from sparseattn.lm.corpus import bpe_tokenizer, cut_rows, read_text
from sparseattn.training.tasks import score_text
from sparseattn.lm.perplexity import perplexity, rows_score, windows
from sparseattn.lm.train import LMConfig, load_lm_data, train_lm
from sparseattn.model_sparsity import measure_sparsity
from sparseattn.models import load_model
from sparseattn.plans.io import as_plan, save_plan
from sparseattn.pruning.mask import mask_plan

SENTENCE = "the quick brown fox jumps over the lazy dog. "
TINY = dict(layers=2, hidden=32, heads=2, vocab_size=300, max_length=16, batch_size=8, precision="fp32")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A corpus folder of one repeated sentence (train, valid, test), with a private tokenizer cache."""
    monkeypatch.setenv("SPARSEATTN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "corpus"
    for split, n in (("train", 60), ("valid", 12), ("test", 12)):
        (root / split).mkdir(parents=True)
        (root / split / "a.txt").write_text(SENTENCE * n)
    return root


# -- perplexity -------------------------------------------------------------------------------------
def hand_nll(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """-log p summed over tokens 1..n-1, each from its own forward pass over the window that scores it: the
    first window (starts 0, +stride, at most one token before the previous end) whose end is past it."""
    n, total, counted = len(ids), 0.0, 0
    spans, begin = [], 0
    while True:
        end = min(begin + context, n)
        spans.append((begin, end))
        if end == n:
            break
        begin = min(begin + stride, end - 1)
    for t in range(1, n):
        b, e = next(s for s in spans if s[1] > t)
        assert b < t  # at least one token of context
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[b:e]])).logits[0].double()
        total -= float(torch.log_softmax(logits[t - 1 - b], -1)[ids[t]])
        counted += 1
    return total, counted


@pytest.mark.parametrize("n, context, stride", [(23, 8, 3), (20, 8, 8), (7, 8, 4)])
def test_perplexity_equals_hand_computation(n, context, stride):
    model = tiny_llama(max_position_embeddings=8)
    g = torch.Generator().manual_seed(n)
    docs = [torch.randint(0, 120, (n,), generator=g).tolist(), torch.randint(0, 120, (5,), generator=g).tolist()]
    got = perplexity(model, [np.array(d) for d in docs], context=context, stride=stride, batch_size=2)
    nll = cnt = 0
    for d in docs:
        a, c = hand_nll(model, d, context, stride)
        nll, cnt = nll + a, cnt + c
    assert got["tokens"] == cnt == n - 1 + 4
    assert got["loss"] == pytest.approx(nll / cnt, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / cnt), rel=1e-5)
    assert got["sparsity"] == 0.0


def test_windows_overlap_and_cover():
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(10, 4, 4) == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]  # disjoint windows share one context token
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def test_perplexity_under_a_plan_reports_its_sparsity():
    model = tiny_llama(max_position_embeddings=8)
    plan = as_plan("all: global_tokens(1) | neighbour(1)")
    sparsify(model, plan)
    doc = torch.randint(0, 120, (16,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, [doc.numpy()], context=8, stride=4, plan=plan)
    wins = windows(16, 8, 4)
    batch = {"input_ids": torch.stack([doc[b:e] for b, e, _ in wins])}
    assert got["sparsity"] == pytest.approx(measure_sparsity(model, batch).overall)
    assert 0.4 < got["sparsity"] < 0.9
    nll, cnt = hand_nll(model, doc.tolist(), 8, 4)  # the sparsified model, window by window
    assert got["loss"] == pytest.approx(nll / cnt, rel=1e-5)


# -- training ---------------------------------------------------------------------------------------
def test_training_learns_a_repeated_text(corpus):
    r = train_lm(LMConfig(task=str(corpus), epochs=20, lr=1e-2, warmup=0.1, **TINY), progress=False)
    assert r["epochs"][-1]["train_loss"] < 0.1  # the rest: "the" before "quick" or "lazy" at a row's start
    assert r["metrics"]["perplexity"] < 1.1  # the valid split is the same sentence
    assert r["main_metric"] == "perplexity" and r["score"] == r["metrics"]["perplexity"]
    assert r["epochs"][0]["metrics"]["perplexity"] > r["metrics"]["perplexity"]


def test_saved_model_loads_back_with_identical_perplexity(corpus, tmp_path):
    plan = "all: global_tokens(1) | neighbour(3)"
    cfg = LMConfig(task=str(corpus), plan=plan, epochs=1, **TINY)
    out = tmp_path / "run"
    r = train_lm(cfg, out_dir=out, save_model=True, progress=False)
    assert json.loads((out / "results.json").read_text())["metrics"] == r["metrics"]
    model = load_model(str(out / "model"), task="causal-lm")
    sparsify(model, as_plan(str(out / "plan")))
    rows = load_lm_data(cfg).evals
    assert rows_score(model, rows).perplexity == pytest.approx(r["metrics"]["perplexity"], rel=1e-9)
    assert r["sparsity"]["overall"] > 0.4
    # the command line reads the saved model and plan; windows = rows of the valid text (EOS after it aside)
    js = tmp_path / "ppl.json"
    assert main(["perplexity", str(out / "model"), "--text", str(corpus / "valid" / "a.txt"), "--plan",
                 str(out / "plan"), "--context", "16", "--json", str(js)]) == 0
    got = json.loads(js.read_text())
    assert got["sparsity"] == pytest.approx(r["sparsity"]["overall"], abs=0.02) and got["tokens"] > 100


def test_tokenizer_is_cached(corpus):
    files = [corpus / "train" / "a.txt"]
    a = bpe_tokenizer(files, 300)
    b = bpe_tokenizer(files, 300)
    assert a.name_or_path == b.name_or_path and a(SENTENCE)["input_ids"] == b(SENTENCE)["input_ids"]
    assert a.decode(a(SENTENCE)["input_ids"]) == SENTENCE


# -- bad inputs -------------------------------------------------------------------------------------
def test_empty_text_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        read_text(empty)
    assert main(["perplexity", "unused-model", "--text", str(empty)]) == 1
    assert "empty.txt is empty" in capsys.readouterr().err


def test_context_longer_than_positions():
    model = tiny_llama(max_position_embeddings=8)
    with pytest.raises(ValueError, match="context of 16 tokens is longer than the model's 8 positions"):
        perplexity(model, [np.arange(20)], context=16)


def test_plan_mask_shorter_than_context(tmp_path):
    model = tiny_llama(max_position_embeddings=16)
    keep = torch.ones(2, 4, 8, 8, dtype=torch.bool).tril()
    folder = save_plan(mask_plan(keep), tmp_path / "ap8")
    with pytest.raises(ValueError, match=r"layer 0's static_mask\('ap_l0'\) stores a mask of 8 positions, shorter "
                                         r"than the context of 16 tokens"):
        perplexity(model, [np.arange(20)], context=16, plan=as_plan(str(folder)))


def test_too_little_text_for_a_row():
    with pytest.raises(ValueError, match="3 tokens make no row of 16 tokens"):
        cut_rows([np.arange(2)], 16, separator=0)


def test_lm_task_is_a_corpus_not_glue():
    with pytest.raises(ValueError, match="is a GLUE task"):
        LMConfig(task="sst2")
    with pytest.raises(ValueError, match="multiple of heads"):
        LMConfig(hidden=30, heads=4)


def test_progress_lines_print_perplexity_as_is():
    # sweeps print each finished run's score: GLUE's fractions x100, perplexity as it is
    assert score_text("books", {"main_metric": "perplexity", "score": 37.214}) == "perplexity 37.21"
    assert score_text("sst2", {"main_metric": "accuracy", "score": 0.914}) == "accuracy 91.40"
