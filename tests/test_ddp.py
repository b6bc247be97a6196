"""Data-parallel fine-tuning: `torchrun --nproc-per-node 2` (gloo, CPU) gives the metrics of one process with
the same global batch, writes one results.json (rank 0) that records the world size, and reports once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseattn.training.distributed import shard_batches

GLUE_DIR = os.environ.get("GLUE_DIR")
needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
needs_glue = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set")


def test_shard_batches_disjoint_and_complete():
    rng = np.random.default_rng(0)
    batches = [rng.permutation(100)[:n] for n in (8, 8, 7, 1)]
    for world in (1, 2, 3):
        shards = [shard_batches(batches, r, world) for r in range(world)]
        for i, b in enumerate(batches):
            parts = [s[i] for s in shards]
            assert all(len(p) >= 1 for p in parts)  # every rank takes every step
            if len(b) >= world:
                assert sorted(np.concatenate(parts).tolist()) == sorted(b.tolist())  # disjoint, complete
            else:
                assert set(np.concatenate(parts).tolist()) == set(b.tolist())


def make_tiny_model(path: Path) -> str:
    """A 2-layer BERT without dropout (so one and two processes can agree closely), MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    from sparseattn.models import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run_cli(args: list[str], nproc: int, cwd: Path, **env_extra) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           **env_extra}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launch = [sys.executable, "-m", "sparseattn.cli"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "sparseattn.cli"]
    p = subprocess.run(launch + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@needs_dist
@needs_glue
def test_torchrun_two_processes_match_one(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    common = ["finetune", "--task", "sst2", "--model", model, "--epochs", "2", "--lr", "3e-3", "--warmup", "0",
              "--limit-train", "64", "--limit-eval", "64", "--max-length", "32", "--seed", "1", "--device", "cpu",
              "--no-progress", "--glue-dir", GLUE_DIR]
    run_cli(common + ["--batch-size", "8", "--out", str(tmp_path / "one")], 1, tmp_path)
    out2 = run_cli(common + ["--batch-size", "4", "--out", str(tmp_path / "two")], 2, tmp_path)  # global batch 8

    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["results.json"]
    assert out2.count("results: ") == 1 and out2.count(" x 2 processes") == 1, out2  # rank 0 alone reports
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert "distributed" not in one  # the single-process record is unchanged
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "per_rank_batch_size": 4,
                                  "global_batch_size": 8}
    assert two["data"]["train_examples"] == one["data"]["train_examples"] == 64
    assert len(two["train_loss_curve"]["values"]) == len(one["train_loss_curve"]["values"])  # same step count
    assert abs(two["metrics"]["accuracy"] - one["metrics"]["accuracy"]) <= 0.05
    for e1, e2 in zip(one["epochs"], two["epochs"]):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=0.10)
    assert two["train_loss_curve"]["values"] == pytest.approx(one["train_loss_curve"]["values"], rel=0.10)


def _word_corpus(root: Path) -> Path:
    """Seeded random sentences over a small vocabulary: a corpus a tiny LM can learn something of."""
    import random

    rng = random.Random(0)
    words = "the a quick brown fox dog cat jumps sat over on lazy mat and runs".split()
    for split, n in (("train", 300), ("valid", 40), ("test", 10)):
        (root / split).mkdir(parents=True)
        (root / split / "a.txt").write_text(" ".join(" ".join(rng.choices(words, k=8)) + "." for _ in range(n)))
    return root


@needs_dist
def test_train_lm_under_torchrun_matches_one_process_and_writes_once(tmp_path):
    corpus = _word_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    common = ["train-lm", "--task", str(corpus), "--layers", "2", "--hidden", "32", "--heads", "2", "--vocab-size",
              "300", "--context", "16", "--epochs", "2", "--lr", "3e-3", "--warmup", "0", "--limit-train", "48",
              "--limit-eval", "16", "--precision", "fp32", "--device", "cpu", "--seed", "1", "--no-progress"]
    # two processes first: rank 0 trains the BPE tokenizer into the empty cache, rank 1 loads it
    out2 = run_cli(common + ["--batch-size", "4", "--out", str(tmp_path / "two"), "--save-model"], 2, tmp_path,
                   SPARSEATTN_CACHE=str(cache))
    run_cli(common + ["--batch-size", "8", "--out", str(tmp_path / "one")], 1, tmp_path, SPARSEATTN_CACHE=str(cache))

    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["model", "plan", "results.json"]
    assert len(list((cache / "lm-tokenizers").iterdir())) == 1  # made once: no second copy, no partial one
    assert out2.count("results: ") == 1 and out2.count(" x 2 processes") == 1, out2  # rank 0 alone reports
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert "distributed" not in one
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "per_rank_batch_size": 4,
                                  "global_batch_size": 8}
    assert two["data"]["train_rows"] == one["data"]["train_rows"] == 48
    assert len(two["train_loss_curve"]["values"]) == len(one["train_loss_curve"]["values"]) == 12  # 6 steps x 2
    # no dropout, fp32: the same steps up to the order of the gradient sums
    assert two["train_loss_curve"]["values"] == pytest.approx(one["train_loss_curve"]["values"], rel=1e-4)
    assert two["metrics"]["perplexity"] == pytest.approx(one["metrics"]["perplexity"], rel=1e-4)
    assert one["epochs"][-1]["train_loss"] < one["epochs"][0]["train_loss"]  # it learned something
