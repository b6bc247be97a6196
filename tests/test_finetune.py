"""End-to-end fine-tuning on CPU with a tiny random BERT (the MiniLM tokenizer): a single-sentence task, a
pair task and the regression task, dense and sparse; the loss falls, metrics and sparsity are recorded."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseattn.training.batching import collate, encode_split, train_batches
from sparseattn.training.finetune import FinetuneConfig, finetune
from sparseattn.training.glue import Example, get_task

GLUE_DIR = os.environ.get("GLUE_DIR")
needs_glue = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set")


def make_tiny_model(path: Path) -> str:
    """A 2-layer, 4-head BERT with random weights and the packaged MiniLM's tokenizer, saved to ``path``."""
    from transformers import BertConfig, BertModel

    from sparseattn.models import load_tokenizer

    if (path / "config.json").exists():
        return str(path)
    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [  # (task, plan)
    ("sst2", "dense"),
    ("sst2", "later-half: neighbour(1) | lexical(by='lower')"),  # input-dependent: batches carry the structure
    ("mrpc", "dense"),
    ("mrpc", "all: neighbour(2) | global_tokens(1)"),
    ("stsb", "dense"),
    ("stsb", "later-half: random(3)"),
]


@needs_glue
@pytest.mark.parametrize("task,plan", CASES)
def test_tiny_finetune(tiny_model, tmp_path, task, plan):
    cfg = FinetuneConfig(task=task, plan=plan, model=tiny_model, epochs=4, lr=3e-3, batch_size=8, warmup=0.0,
                         limit_train=48, limit_eval=40, max_length=64, seed=1)
    r = finetune(cfg, out_dir=tmp_path, progress=False, device="cpu")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"] == cfg.to_dict() and saved["metrics"] == r["metrics"]
    t = get_task(task)
    assert set(r["metrics"]) == set(t.metrics) and r["score"] == r["metrics"][t.main_metric]
    assert all(np.isfinite(v) for v in r["metrics"].values())
    losses = [e["train_loss"] for e in r["epochs"]]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    sp = r["sparsity"]
    assert len(sp["per_layer"]) == 2 and sp["examples"] == 40
    if plan == "dense":
        assert sp["overall"] == 0.0 and sp["applied"] == 0.0 and sp["kept_pairs"] == sp["allowed_pairs"]
    else:
        assert 0.0 < sp["overall"] <= sp["applied"] < 1.0
        if plan.startswith("later-half"):
            assert sp["per_layer"][0] == 0.0 and sp["per_layer"][1] > 0.0
    assert r["data"]["train_examples"] == 48 and r["data"]["eval_examples"] == 40
    assert r["plan"] == cfg.plan and r["versions"]["torch"] == torch.__version__


@needs_glue
def test_truncation_is_counted_and_reported(tiny_model, caplog):
    cfg = FinetuneConfig(task="rte", model=tiny_model, epochs=1, limit_train=16, limit_eval=16, max_length=24)
    with caplog.at_level(logging.WARNING, logger="sparseattn"):
        r = finetune(cfg, progress=False, device="cpu")
    assert r["data"]["train_truncated"] > 0 and r["data"]["eval_truncated"] > 0  # RTE premises are long
    assert "longer than max_length=24" in caplog.text


def test_encode_split_truncates_explicitly_and_pads_per_batch():
    from sparseattn.models import load_tokenizer

    tok = load_tokenizer()
    long = " ".join(["word"] * 40)
    ex = [Example("a short one .", None, 0), Example(long, None, 1), Example("three words here", None, 1)]
    split = encode_split(tok, ex, max_length=16)
    assert split.truncated == 1 and split.lengths.tolist() == [6, 16, 5]
    batch = collate(split, np.array([0, 2]))
    assert batch["input_ids"].shape == (2, 6)  # padded to the batch's longest, not max_length
    assert batch["attention_mask"].sum(1).tolist() == [6, 5]
    assert batch["input_ids"][1, 5] == tok.pad_token_id
    ref = tok(["a short one .", "three words here"], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    # pairs: segment ids come along; structures when asked for
    pairs = encode_split(tok, [Example("A cat.", "A dog.", 0), Example("Yes.", "No way.", 1)], 32, structure=True)
    b = collate(pairs, np.array([0, 1]))
    ref = tok(["A cat.", "Yes."], ["A dog.", "No way."], padding=True, return_tensors="pt")
    assert torch.equal(b["input_ids"], ref["input_ids"]) and torch.equal(b["token_type_ids"], ref["token_type_ids"])
    assert b["sparse_structure"].word_ids.shape == b["input_ids"].shape


def test_length_buckets_cover_every_example_once():
    from sparseattn.training.batching import EncodedSplit

    lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    split = EncodedSplit(np.zeros(lengths.sum(), np.int64), None, np.r_[0, np.cumsum(lengths)[:-1]], lengths,
                         np.zeros(1000, np.int64), None, 0, 64, 0)
    batches = train_batches(split, 32, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    pad = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches) / lengths.sum()
    assert pad < 0.05  # bucketing pads little (random batches would pad ~ 50%)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown GLUE task"):
        FinetuneConfig(task="sst5")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        FinetuneConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown fine-tune option.*'learning_rate'"):
        FinetuneConfig.from_dict({"learning_rate": 1e-4})
    assert FinetuneConfig(plan="later-half:neighbour(2)").plan == "later-half: neighbour(2)"


@needs_glue
def test_a_plan_that_isolates_cls_in_every_layer_is_flagged(tiny_model, caplog):
    """[CLS] keeping only itself in every layer makes a classifier's input constant: finetune warns and
    records it (the pattern ablation's syntax(1)/lexical() arms with special='self' did exactly this)."""
    from sparseattn.training.finetune import readout_isolated_layers
    from sparseattn.models import load_model, load_tokenizer
    from sparseattn.plans import parse_plan

    common = dict(task="rte", model=tiny_model, epochs=1, batch_size=8, limit_train=16, limit_eval=16, max_length=48)
    with caplog.at_level(logging.WARNING, logger="sparseattn"):
        r = finetune(FinetuneConfig(plan="all: neighbour(0)", **common), progress=False, device="cpu")
    assert r["readout_isolated"] is True
    assert any("cannot depend on the input" in m for m in caplog.messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparseattn"):
        r = finetune(FinetuneConfig(plan="all: neighbour(0) | global_tokens(1)", **common), progress=False,
                     device="cpu")
    assert r["readout_isolated"] is False and not any("cannot depend" in m for m in caplog.messages)
    # per layer: a later-half plan isolates [CLS] only in the later layer of a 2-layer model
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, task="classification", num_labels=2)
    enc = tok(["a b c d", "e f"], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert readout_isolated_layers(parse_plan("later-half: neighbour(0)"), model, batch, tok) == [1]
    assert readout_isolated_layers(parse_plan("all: random(2)"), model, batch, tok) == []
