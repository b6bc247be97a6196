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

from sparseattn.training.distributed import loss_weights, shard_batches

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


def test_loss_weights_make_the_ranks_average_the_global_batch_mean():
    """Each rank's mean loss over its slice, weighted, averages over the ranks to the global batch's mean (uneven
    slices of an epoch's last batch, and ranks that only repeat an example of a batch smaller than the world)."""
    rng = np.random.default_rng(1)
    batches = [rng.permutation(100)[:n] for n in (8, 7, 5, 1)]
    per_example = rng.normal(size=100)
    for world in (1, 2, 3):
        shards = [shard_batches(batches, r, world) for r in range(world)]
        weights = [loss_weights(batches, r, world) for r in range(world)]
        for i, b in enumerate(batches):
            ranks = [per_example[shards[r][i]].mean() * weights[r][i] for r in range(world)]
            assert np.mean(ranks) == pytest.approx(per_example[b].mean(), rel=1e-12)
    assert loss_weights(batches, 0, 2)[:3] == [1.0, 8 / 7, 6 / 5] and loss_weights(batches, 1, 2)[3] == 0


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
              "--limit-train", "61", "--limit-eval", "64", "--max-length", "32", "--seed", "1", "--device", "cpu",
              "--no-progress", "--glue-dir", GLUE_DIR]  # each epoch's last global batch: 5 examples, 3 + 2
    run_cli(common + ["--batch-size", "8", "--out", str(tmp_path / "one")], 1, tmp_path)
    out2 = run_cli(common + ["--batch-size", "4", "--out", str(tmp_path / "two")], 2, tmp_path)  # global batch 8

    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["results.json"]
    assert out2.count("results: ") == 1 and out2.count(" x 2 processes") == 1, out2  # rank 0 alone reports
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert "distributed" not in one  # the single-process record is unchanged
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "per_rank_batch_size": 4,
                                  "global_batch_size": 8}
    assert two["data"]["train_examples"] == one["data"]["train_examples"] == 61
    assert len(two["train_loss_curve"]["values"]) == len(one["train_loss_curve"]["values"]) == 16  # 8 steps x 2
    # no dropout, fp32: the same steps up to the order of the gradient sums, the uneven last batches too
    assert two["train_loss_curve"]["values"] == pytest.approx(one["train_loss_curve"]["values"], rel=1e-4)
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)


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
              "300", "--context", "16", "--epochs", "2", "--lr", "3e-3", "--warmup", "0", "--limit-train", "45",
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
    assert two["data"]["train_rows"] == one["data"]["train_rows"] == 45  # each epoch's last global batch: 3 + 2
    assert len(two["train_loss_curve"]["values"]) == len(one["train_loss_curve"]["values"]) == 12  # 6 steps x 2
    # no dropout, fp32: the same steps up to the order of the gradient sums
    assert two["train_loss_curve"]["values"] == pytest.approx(one["train_loss_curve"]["values"], rel=1e-4)
    assert two["metrics"]["perplexity"] == pytest.approx(one["metrics"]["perplexity"], rel=1e-4)
    assert one["epochs"][-1]["train_loss"] < one["epochs"][0]["train_loss"]  # it learned something


@needs_dist
@needs_glue
def test_ap_collect_under_torchrun_adds_up_to_one_process(tmp_path):
    from sparseattn.pruning.collect import AttentionStats

    model = make_tiny_model(tmp_path / "tiny")
    common = ["ap", "collect", "--task", "sst2", "--model", model, "--limit", "45", "--max-length", "32", "--batch-size",
              "4", "--longer", "truncate", "--device", "cpu", "--quiet", "--glue-dir", GLUE_DIR]
    run_cli(common + ["--out", str(tmp_path / "one" / "stats.safetensors")], 1, tmp_path)
    out2 = run_cli(common + ["--out", str(tmp_path / "two" / "stats.safetensors")], 2, tmp_path)  # 12 batches: 6 each

    assert [p.name for p in (tmp_path / "two").iterdir()] == ["stats.safetensors"] and out2.count("wrote ") == 1
    one, two = (AttentionStats.load(tmp_path / n / "stats.safetensors") for n in ("one", "two"))
    assert torch.equal(two.counts, one.counts) and two.causal == one.causal
    torch.testing.assert_close(two.sums, one.sums, rtol=1e-12, atol=1e-12)  # float64 sums, added in another order
    assert two.metadata == one.metadata and one.metadata["examples"] == 45


PRUNE_SCRIPT = """
import json, sys
import transformers
transformers.logging.set_verbosity_error()
from sparseattn.pruning.glue import PruneGlueConfig, prune_glue
model, glue_dir, work, out, batch = sys.argv[1:6]
cfg = PruneGlueConfig(task="sst2", model=model, epochs=2, lr=3e-3, warmup=0, batch_size=int(batch), max_length=32,
                      limit_train=64, limit_eval=64, seed=1, prune=50, precision="fp32")
r = prune_glue(cfg, glue_dir=glue_dir, work_dir=work, out_dir=out, device="cpu", progress=False)
print("RESULT", json.dumps(r["pruning"]))
"""


@needs_dist
@needs_glue
def test_attention_pruning_under_torchrun_matches_one_process_and_writes_once(tmp_path):
    """Dense fine-tune, attention averages, mask and re-training, each made by both ranks and written by rank 0."""
    from sparseattn.pruning.collect import AttentionStats

    model = make_tiny_model(tmp_path / "tiny")
    script = tmp_path / "prune.py"
    script.write_text(PRUNE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    for name, launch, batch in (("one", [sys.executable], "8"), ("two", [sys.executable, "-m", "torch.distributed.run",
                                                                         "--standalone", "--nproc-per-node=2"], "4")):
        p = subprocess.run(launch + [str(script), model, GLUE_DIR, str(tmp_path / name / "work"),
                                     str(tmp_path / name / "out"), batch], env=env, capture_output=True, text=True,
                           timeout=240)
        assert p.returncode == 0, p.stdout + p.stderr
    one_root, two_root = (next((tmp_path / n / "work").iterdir()) for n in ("one", "two"))
    made = sorted(str(p.relative_to(two_root)) for p in two_root.rglob("*") if p.parent == two_root or
                  p.parent.parent == two_root)
    assert not [m for m in made if "partial" in m], made  # every file moved into place, none left half-made
    assert sorted(p.name for p in (tmp_path / "two" / "out").iterdir()) == ["results.json"]
    stats = [AttentionStats.load(next(r.glob("attention-*.safetensors"))) for r in (one_root, two_root)]
    # no dropout, fp32: the same dense model, the same averages, up to the order of the sums
    torch.testing.assert_close(stats[1].sums, stats[0].sums, rtol=1e-4, atol=1e-6)
    assert torch.equal(stats[1].counts, stats[0].counts)
    one, two = (json.loads((tmp_path / n / "out" / "results.json").read_text()) for n in ("one", "two"))
    assert two["distributed"]["world_size"] == 2 and "distributed" not in one
    dense = [json.loads((r / "dense" / "results.json").read_text()) for r in (one_root, two_root)]
    assert dense[1]["distributed"]["global_batch_size"] == 8
    assert dense[1]["train_loss_curve"]["values"] == pytest.approx(dense[0]["train_loss_curve"]["values"], rel=1e-4)
    assert two["train_loss_curve"]["values"] == pytest.approx(one["train_loss_curve"]["values"], rel=1e-4)
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)
    assert two["sparsity"]["overall"] == pytest.approx(one["sparsity"]["overall"], abs=1e-9)  # the same mask


def test_what_is_not_data_parallel_refuses_under_torchrun(tmp_path, monkeypatch, capsys):
    """Under a launcher of two processes, a command or method that would run whole in each (and write twice)
    stops before it starts, saying why."""
    from sparseattn.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for argv, what in ((["ap", "mask", str(tmp_path / "s.safetensors"), "--prune", "50", "--out", str(tmp_path)],
                        "ap mask"), (["sweep", str(tmp_path / "s.yaml")], "sweep"), (["report", "x.sqlite"], "report")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"sparseattn {what} does not run data-parallel (finetune, learn, train-lm and ap collect do); torchrun " \
               "started 2 processes: run it as one process" in err, err
    assert not list(tmp_path.iterdir())  # nothing written


PRUNE_LM_SCRIPT = """
import json, sys
from sparseattn.pruning.lm import LMPruneConfig, prune_lm
corpus, work, out, batch = sys.argv[1:5]
cfg = LMPruneConfig(task=corpus, layers=2, hidden=32, heads=2, vocab_size=300, max_length=16, epochs=1, lr=3e-3,
                    warmup=0, batch_size=int(batch), limit_train=48, limit_eval=16, seed=1, precision="fp32", prune=50)
prune_lm(cfg, work_dir=work, out_dir=out, device="cpu", progress=False)
"""


@needs_dist
def test_attention_pruning_of_a_language_model_under_torchrun_matches_one_process(tmp_path):
    from sparseattn.pruning.collect import AttentionStats

    corpus = _word_corpus(tmp_path / "corpus")
    script = tmp_path / "prune_lm.py"
    script.write_text(PRUNE_LM_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "SPARSEATTN_CACHE": str(tmp_path / "cache")}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    for name, launch, batch in (("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc-per-node=2"], "4"), ("one", [sys.executable], "8")):
        p = subprocess.run(launch + [str(script), str(corpus), str(tmp_path / name / "work"),
                                     str(tmp_path / name / "out"), batch], env=env, capture_output=True, text=True,
                           timeout=240)
        assert p.returncode == 0, p.stdout + p.stderr
    roots = [next((tmp_path / n / "work").iterdir()) for n in ("one", "two")]
    assert not list(roots[1].rglob("*partial*")) and len(list((tmp_path / "cache" / "lm-tokenizers").iterdir())) == 1
    assert sorted(p.name for p in (tmp_path / "two" / "out").iterdir()) == ["results.json"]
    stats = [AttentionStats.load(next(r.glob("attention-*.safetensors"))) for r in roots]
    assert torch.equal(stats[1].counts, stats[0].counts)
    torch.testing.assert_close(stats[1].sums, stats[0].sums, rtol=1e-4, atol=1e-6)  # the same dense model's
    from safetensors.torch import load_file

    folders = [next(r.glob("plans-*/*/plan.json")).parent for r in roots]
    plans = [json.loads((f / "plan.json").read_text()) for f in folders]
    assert plans[1].pop("metadata")["ap_sparsity"] == pytest.approx(plans[0].pop("metadata")["ap_sparsity"])
    assert plans[1] == plans[0]  # the same rules (the metadata names each run's own folders)
    masks = [load_file(f / "masks.safetensors") for f in folders]
    assert masks[1].keys() == masks[0].keys() and all(torch.equal(masks[1][k], masks[0][k]) for k in masks[0])
    one, two = (json.loads((tmp_path / n / "out" / "results.json").read_text()) for n in ("one", "two"))
    assert two["distributed"]["world_size"] == 2 and "distributed" not in one
    assert two["metrics"]["perplexity"] == pytest.approx(one["metrics"]["perplexity"], rel=1e-4)
    assert two["sparsity"]["overall"] == pytest.approx(one["sparsity"]["overall"], abs=1e-9)


@needs_dist
@needs_glue
def test_learn_under_torchrun_matches_one_process_and_writes_once(tmp_path):
    """Learned degrees: the pair counts of the global batch on every rank, so the degrees, the penalty's
    running density and the exported plan follow one process's; rank 0 alone writes."""
    model = make_tiny_model(tmp_path / "tiny")
    common = ["learn", "--task", "sst2", "--model", model, "--lambda", "0.5", "--init-degree", "4", "--epochs", "2",
              "--hard-epochs", "1", "--lr", "3e-3", "--degree-lr", "2", "--limit-train", "64", "--limit-eval", "32",
              "--max-length", "32", "--seed", "1", "--device", "cpu", "--no-progress", "--glue-dir", GLUE_DIR]
    run_cli(common + ["--batch-size", "8", "--out", str(tmp_path / "one")], 1, tmp_path)
    out2 = run_cli(common + ["--batch-size", "4", "--out", str(tmp_path / "two")], 2, tmp_path)

    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one").iterdir()) == \
        ["degrees.png", "hard", "plan", "results.json", "soft_model"]
    assert out2.count("learned degrees (layers x heads)") == 1, out2  # rank 0 alone reports
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert two["distributed"]["global_batch_size"] == 8 and "distributed" not in one
    h1, h2 = one["learned"]["soft_history"], two["learned"]["soft_history"]
    assert [h["step"] for h in h2] == [h["step"] for h in h1] and len(h1) == 16  # 2 epochs x 8 global batches
    for key in ("loss", "expected_density", "degree_mean", "degree_min", "degree_max"):
        assert [h[key] for h in h2] == pytest.approx([h[key] for h in h1], rel=1e-3), key
    assert h1[-1]["degree_mean"] < h1[0]["degree_mean"]  # the penalty narrowed the windows: something was learned
    assert two["learned"]["degrees"] == one["learned"]["degrees"]
    assert two["learned"]["train_sparsity_of_exported_plan"] == one["learned"]["train_sparsity_of_exported_plan"]
    assert two["learned"]["plan_dir"] == str(tmp_path / "two" / "plan")
    assert abs(two["metrics"]["accuracy"] - one["metrics"]["accuracy"]) <= 0.05
