"""``finetune --pack``: several examples per row, one prediction per example. Packed rows give the same logits as
one padded row per example (BERT with token types and absolute positions, a Llama reading its last token; dense and
sparse plans), training on the same examples per step gives the same losses, and the run's results say how full
its batches were. Unpacked runs keep their run keys."""

import os

import numpy as np
import pytest
import torch

from sparseattn import sparsify
from sparseattn.errors import ConfigError
from sparseattn.training.batching import EncodedSplit, collate
from sparseattn.training.config import FinetuneConfig
from sparseattn.training.packing import pack_rows, packed_logits, place, token_slots

from conftest import tiny_bert

GLUE_DIR = os.environ.get("GLUE_DIR")
needs_glue = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set")


pytestmark = pytest.mark.usefixtures("one_thread")


def _split(lengths, *, pairs: bool = True, seed: int = 0, max_length: int = 32) -> EncodedSplit:
    """Random token ids (3..119) of the given lengths; with ``pairs``, token type 1 on each example's second half."""
    g = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ids = g.integers(3, 120, int(lengths.sum())).astype(np.int64)
    types = None
    if pairs:
        types = np.concatenate([(np.arange(n) >= n // 2).astype(np.int64) for n in lengths])
    labels = g.integers(0, 2, len(lengths)).astype(np.int64)
    return EncodedSplit(ids, types, offsets, lengths, labels, None, 0, max_length, 0)


LENGTHS = [7, 31, 12, 5, 19, 26, 3, 17, 9]  # odd lengths; rows of 32 hold several of them


def test_pack_rows_lay_each_example_out_as_it_runs_alone():
    split = _split(LENGTHS)
    idx = np.array([4, 0, 8, 2, 6, 1])
    b = pack_rows(split, idx, 32)
    R, W = b["input_ids"].shape
    assert W <= 32 and R < len(idx)  # several examples share a row
    flat = {k: b[k].reshape(-1) for k in ("input_ids", "position_ids", "token_type_ids", "attention_mask")}
    cu = b["cu_seq_lens_q"].tolist()
    assert b["cu_seq_lens_q"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == R * W
    for j, i in enumerate(idx):
        s, n = int(b["example_starts"][j]), int(b["example_lengths"][j])
        assert n == LENGTHS[i] and s in cu and s + n in cu  # an example is one segment of the offsets
        assert s // W == (s + n - 1) // W  # within one row
        o = split.offsets[i]
        assert flat["input_ids"][s:s + n].tolist() == split.ids[o:o + n].tolist()
        assert flat["token_type_ids"][s:s + n].tolist() == split.type_ids[o:o + n].tolist()
        assert flat["position_ids"][s:s + n].tolist() == list(range(n))
    assert int(b["attention_mask"].sum()) == sum(LENGTHS[i] for i in idx)
    assert b["labels"].tolist() == split.labels[idx].tolist()
    assert token_slots(split, [idx], pack=32) == R * W
    assert token_slots(split, [idx], pack=None) == collate(split, idx)["input_ids"].numel()


def test_place_fits_longest_first_and_refuses_what_cannot_fit():
    row, at, used = place(np.array([5, 30, 20, 10, 2]), 32)
    assert used.tolist() == [32, 30, 5] and row.tolist() == [2, 0, 1, 1, 0] and at.tolist() == [0, 0, 0, 20, 30]
    with pytest.raises(ValueError, match="40 tokens does not fit in packed rows of 32"):
        place(np.array([40]), 32)


def _logits(model, split, idx, pack):
    with torch.no_grad():
        if pack:
            return packed_logits(model, pack_rows(split, idx, pack))
        b = collate(split, idx)
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return model(**{k: b[k] for k in keys if k in b}).logits


PACKED_CASES = [(arch, plan, "reference") for arch in ("bert", "llama")
                for plan in ("dense", "all: neighbour(2) | global_tokens(1)", "later-half: random(3)")]
PACKED_CASES += [("bert", "all: neighbour(2) | global_tokens(1)", "block"), ("bert", "later-half: random(3)", "block")]


@pytest.mark.parametrize("arch,plan,backend", PACKED_CASES)
def test_packed_logits_equal_one_padded_row_per_example(arch, plan, backend):
    """The sparsified model (under the dense plan too) on packed rows: each example's logits equal its logits in a
    padded batch, BERT reading [CLS] (token types and positions restarting per example), a Llama its last token;
    on the reference backend and on the block backend's Triton kernel (Triton's interpreter on the CPU)."""
    if arch == "bert":
        model = tiny_bert("classify")
        split = _split(LENGTHS)
    else:
        from transformers import LlamaConfig, LlamaForSequenceClassification

        torch.manual_seed(0)
        model = LlamaForSequenceClassification(LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=120, max_position_embeddings=40, num_labels=3, pad_token_id=0)).eval()
        split = _split(LENGTHS, pairs=False)
    if backend == "block":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the kernel runs in Triton's interpreter where there is no GPU")
        from sparseattn.backends import BlockSparseBackend

        backend = BlockSparseBackend(block_size=32, force=True, kernel="triton")
    sparsify(model, plan, backend=backend)
    idx = np.arange(len(LENGTHS))
    want = _logits(model, split, idx, None)
    for pack in (32, 64):
        got = _logits(model, split, idx, pack)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    if not isinstance(backend, str):  # the kernel ran, on padded and packed rows
        assert backend.stats["block"] >= 3, backend.stats  # (a dense layer of packed rows runs the reference)


def _encoder_classifier(arch: str):
    """A tiny random ALBERT (its pooler a Linear with a separate tanh) or RoBERTa (positions counted from
    pad_token_id + 1) classifier, with weights large enough that a wrong position or a missing tanh shows."""
    from transformers import (AlbertConfig, AlbertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=120,
              max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              initializer_range=0.5, num_labels=3)
    if arch == "albert":  # one layer: sparseattn maps ALBERT's one shared attention module onto one layer only
        kw["num_hidden_layers"] = 1
        return AlbertForSequenceClassification(AlbertConfig(embedding_size=16, classifier_dropout_prob=0.0,
                                                            **kw)).eval()
    return RobertaForSequenceClassification(RobertaConfig(pad_token_id=0, type_vocab_size=1, **kw)).eval()


@pytest.mark.parametrize("arch", ["albert", "roberta"])
def test_packed_logits_of_other_encoder_heads_equal_one_padded_row_per_example(arch):
    """ALBERT's pooler is a Linear whose tanh the base model applies apart; RoBERTa counts positions from
    pad_token_id + 1: packed rows still give each example its padded logits."""
    model = _encoder_classifier(arch)
    split = _split([n for n in LENGTHS if n < 30], pairs=arch == "albert")
    sparsify(model, "dense")
    idx = np.arange(len(split.lengths))
    want = _logits(model, split, idx, None)
    assert want.shape == (len(idx), 3)
    torch.testing.assert_close(_logits(model, split, idx, 64), want, atol=2e-5, rtol=1e-4)


def test_a_model_that_is_not_sparsified_attends_across_packed_examples():
    """Why a packed run sparsifies its model under the dense plan: transformers' own BERT attention reads no
    document offsets, so packed examples see each other and their logits change."""
    model = tiny_bert("classify", initializer_range=0.5)  # large weights: logits that tell inputs apart
    split = _split(LENGTHS)
    idx = np.arange(len(LENGTHS))
    want = _logits(model, split, idx, None)
    got = _logits(model, split, idx, 64)
    assert (got - want).abs().max() > 1e-2
    sparsify(model, "dense")
    torch.testing.assert_close(_logits(model, split, idx, 64), want, atol=2e-5, rtol=1e-4)


def test_pack_option_is_checked_and_left_out_of_unpacked_run_keys():
    cfg = FinetuneConfig(task="sst2", max_length=64)
    assert "pack" not in cfg.to_dict()  # the run key of an unpacked run is what it was before pack existed
    assert FinetuneConfig(task="sst2", max_length=64, pack=True).pack == 64
    assert FinetuneConfig(task="sst2", max_length=64, pack=False).pack is None
    assert FinetuneConfig.from_dict({"task": "sst2", "max_length": 64, "pack": 256}).to_dict()["pack"] == 256
    with pytest.raises(ConfigError, match="at least max_length=64 .* got 32"):
        FinetuneConfig(task="sst2", max_length=64, pack=32)
    with pytest.raises(ConfigError, match="got '128'"):
        FinetuneConfig(task="sst2", pack="128")
    with pytest.raises(ConfigError, match="input-dependent patterns need"):
        FinetuneConfig(task="sst2", plan="all: lexical(by='lower') | global_tokens(1)", pack=True)
    from sparseattn.learned.glue import LearnGlueConfig

    with pytest.raises(ConfigError, match="method 'learn' does not pack"):
        LearnGlueConfig(task="sst2", pack=True)


def test_cli_pack_takes_an_optional_row_length():
    from sparseattn.cli import build_parser

    p = build_parser()
    assert p.parse_args(["finetune"]).pack is None
    assert p.parse_args(["finetune", "--pack"]).pack is True
    assert p.parse_args(["finetune", "--pack", "256"]).pack == 256


@pytest.fixture(scope="module")
def tiny_model_no_dropout(tmp_path_factory):
    """A 2-layer BERT with the MiniLM tokenizer and no dropout: packed and padded steps see the same computation."""
    from transformers import BertConfig, BertModel

    from sparseattn.models import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert-nodrop")
    tok = load_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@needs_glue
@pytest.mark.parametrize("plan", ["dense", "all: neighbour(2) | global_tokens(1)"])
def test_packed_finetune_trains_and_evaluates_as_unpacked(tiny_model_no_dropout, plan):
    """The same examples per step, packed or padded: the same losses step by step, the same predictions and
    metrics (MRPC: pairs with token types); the results report how full the batches were."""
    from sparseattn.training.finetune import finetune

    common = dict(task="mrpc", plan=plan, model=tiny_model_no_dropout, epochs=1, lr=3e-3, batch_size=8, warmup=0.0,
                  limit_train=32, limit_eval=40, max_length=64, seed=1)
    padded = finetune(FinetuneConfig(**common), progress=False, device="cpu")
    packed = finetune(FinetuneConfig(**common, pack=128), progress=False, device="cpu")
    assert packed["config"]["pack"] == 128 and "pack" not in padded["config"]
    a, b = padded["train_loss_curve"]["values"], packed["train_loss_curve"]["values"]
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert packed["predicted_classes"] == padded["predicted_classes"]
    for k, v in padded["metrics"].items():
        assert packed["metrics"][k] == pytest.approx(v, abs=1e-6)
    assert packed["sparsity"] == padded["sparsity"]
    pa, pp = padded["padding"], packed["padding"]
    assert pa["pack"] is None and pp["pack"] == 128
    assert pa["train_real_tokens"] == pp["train_real_tokens"] > 0
    assert 0 < pa["train_utilisation"] <= 1 and 0 < pp["train_utilisation"] <= 1
    assert pp["eval_utilisation"] > pa["eval_utilisation"]  # 40 pairs in rows of 128 waste less than padded rows


def test_a_sweep_spec_takes_pack_and_keeps_the_keys_of_unpacked_runs():
    from sparseattn.experiments.sweep import spec_from_dict
    from sparseattn.training.record import run_key

    spec = spec_from_dict({"fixed": {"task": "sst2", "max_length": 64}, "grid": {"pack": [None, True, 64]}},
                          name="packing")
    assert [c.pack for c in spec.configs] == [None, 64]  # true is rows of max_length: the same run as 64
    from dataclasses import asdict

    # what to_dict gave before the pack field existed: every other field
    before = {k: v for k, v in asdict(FinetuneConfig(task="sst2", max_length=64)).items() if k != "pack"}
    assert run_key(spec.configs[0].to_dict()) == run_key(before)
    assert run_key(spec.configs[1].to_dict()) != run_key(before)


@needs_glue
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_packed_batches_under_torchrun_match_padded_ones(tmp_path, tiny_model_no_dropout):
    """`finetune --pack` under torchrun (2 processes, gloo): each rank packs its slice of the step's examples, and
    the head's parameters, used outside the model's forward pass, still get their gradients averaged; the losses
    equal those of the padded run with the same ranks. The CLI reports how full the batches were."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    common = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
              "sparseattn.cli", "finetune", "--task", "sst2", "--model", tiny_model_no_dropout, "--epochs", "1",
              "--lr", "3e-3", "--warmup", "0", "--limit-train", "32", "--limit-eval", "32", "--max-length", "64",
              "--batch-size", "4", "--device", "cpu", "--no-progress", "--glue-dir", GLUE_DIR]
    results = {}
    for name, extra in (("padded", []), ("packed", ["--pack"])):
        p = subprocess.run(common + extra + ["--out", str(tmp_path / name)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "real tokens fill" in p.stdout
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    padded, packed = results["padded"], results["packed"]
    assert packed["distributed"]["world_size"] == 2 and packed["padding"]["pack"] == 64
    one = subprocess.run(common[:1] + ["-m", "sparseattn.cli"] + common[common.index("finetune"):]
                         + ["--out", str(tmp_path / "one")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    one = json.loads((tmp_path / "one" / "results.json").read_text())  # one process, batches of 4: twice the steps
    # the training tokens of every rank, not rank 0's share
    assert padded["padding"]["train_real_tokens"] == packed["padding"]["train_real_tokens"] \
        == one["padding"]["train_real_tokens"]
    np.testing.assert_allclose(packed["train_loss_curve"]["values"], padded["train_loss_curve"]["values"],
                               rtol=1e-4, atol=1e-5)
    assert packed["predicted_classes"] == padded["predicted_classes"]
