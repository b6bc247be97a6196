"""Attention Pruning for causal language models: statistics over token rows against a brute-force average of
the attention maps, one layer's maps at a time, the sink + window baseline at a target sparsity, and the
prune-lm method end to end on a tiny corpus (with `ap collect --corpus` on its dense model)."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from sparseattn.cli import main
from sparseattn.experiments.sweep import load_spec
from sparseattn.layout import TokenLayout
from sparseattn.plans.io import load_plan, plan_metadata
from sparseattn.pruning import collect as collect_mod
from sparseattn.pruning.baselines import row_sparsity, sink_window_for_sparsity, sink_window_plan
from sparseattn.pruning.collect import AttentionStats, collect_attention_rows
from sparseattn.pruning.lm import LMPruneConfig, prune_lm
from sparseattn.sparsity import measure_plan
from sparseattn.training.methods import config_from_dict

ROOT = Path(__file__).resolve().parents[1]


def rows(n=5, length=12, seed=0):
    return torch.randint(0, 120, (n, length), generator=torch.Generator().manual_seed(seed))


def test_row_statistics_equal_brute_force_average():
    model = tiny_llama()
    x = rows()
    stats = collect_attention_rows(model, x, batch_size=2, progress=False)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model(input_ids=x, output_attentions=True).attentions  # per layer (N, H, L, L)
    brute = torch.stack([a.double().mean(0) for a in maps])  # (layers, H, L, L)
    tril = torch.ones(12, 12, dtype=torch.bool).tril()
    assert stats.causal and stats.num_examples == 5
    assert torch.equal(stats.counts, tril.long() * 5)
    assert torch.allclose(stats.mean() * tril, brute * tril, atol=1e-6)
    assert float((stats.sums * ~tril).abs().max()) == 0.0
    # on a larger grid the rows land on its corner; the rest is unobserved
    big = collect_attention_rows(model.set_attn_implementation("sdpa") or model, x, length=16, progress=False)
    assert torch.allclose(big.cropped(12).mean(), stats.mean(), atol=1e-12) and big.longest == 12


def test_collector_holds_one_layer_of_maps_at_a_time(monkeypatch):
    """Whenever a layer's probabilities are added, no other (B, H, L, L) float storage is alive: the maps of
    earlier layers are gone (counted over every live tensor the garbage collector knows, views as their
    storage)."""
    model = tiny_llama(num_hidden_layers=4)
    B, H, L = 3, 4, 20
    seen = []
    add = collect_mod._Accumulator.add_layer

    def counting(self, layer, probs, layout):
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            live = {o.untyped_storage().data_ptr() for o in gc.get_objects()  # views share their storage
                    if isinstance(o, torch.Tensor) and o.is_floating_point() and o.dim() >= 3
                    and tuple(o.shape[-2:]) == (L, L) and o.numel() >= B * H * L * L}
        seen.append(len(live))
        return add(self, layer, probs, layout)

    monkeypatch.setattr(collect_mod._Accumulator, "add_layer", counting)
    collect_attention_rows(model, rows(6, L), batch_size=B, progress=False)
    assert seen == [1] * (4 * 2)  # 4 layers x 2 batches, each time only the layer's own maps


def test_sink_window_for_sparsity_is_the_nearest():
    n = 40
    for target in (0.2, 0.5, 0.8, 0.9):
        g, w, got = sink_window_for_sparsity(target, n, sinks=(1, 4))
        assert got == pytest.approx(row_sparsity(sink_window_plan(g, w), n))
        best = min(abs(row_sparsity(sink_window_plan(gg, ww), n) - target) for gg in (1, 4) for ww in range(n))
        assert abs(got - target) == pytest.approx(best)
    plan = sink_window_plan(4, 3)
    rep = measure_plan(plan.resolve(2, 2), TokenLayout.from_lengths([n], causal=True))
    assert rep.overall == pytest.approx(row_sparsity(plan, n))


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEATTN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "corpus"
    words = "a cat and a dog sat on the mat while the bird sang to the old man in the red house".split()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 600), ("valid", 150), ("test", 150)):
        (root / split).mkdir(parents=True)
        (root / split / "t.txt").write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (n,),
                                                                                            generator=g)))
    return root


def test_prune_lm_runs_and_baselines_match_measured_sparsity(corpus, tmp_path):
    base = dict(method="prune-lm", task=str(corpus), layers=2, hidden=32, heads=2, vocab_size=300, max_length=32,
                batch_size=8, epochs=1, precision="fp32")
    work = tmp_path / "work"
    got = {}
    for mask in ("ap", "random", "sink_window"):
        cfg = config_from_dict({**base, "prune": 60, "mask": mask})
        assert isinstance(cfg, LMPruneConfig)
        got[mask] = prune_lm(cfg, work_dir=work, progress=False)
    dense = prune_lm(config_from_dict({**base, "prune": 0}), work_dir=work, progress=False)
    assert dense["sparsity"]["overall"] == 0.0 and dense["pruning"]["mask"] is None
    ap, rnd, sw = (got[m]["sparsity"]["overall"] for m in ("ap", "random", "sink_window"))
    assert ap == pytest.approx(0.6, abs=1e-3) and rnd == ap  # the same number of pairs per layer
    assert abs(sw - ap) < 0.03  # the nearest window at a context of 32
    assert got["sink_window"]["pruning"]["measured_sparsity"] == pytest.approx(sw)
    assert got["ap"]["pruning"]["ap_sparsity"] == pytest.approx(ap)
    assert got["ap"]["config"]["method"] == "prune-lm" and got["ap"]["main_metric"] == "perplexity"
    # one dense model and one average, shared by the three masked runs
    (key_dir,) = [p for p in work.iterdir() if p.is_dir()]
    assert len(list(key_dir.glob("attention-*.safetensors"))) == 1
    plan = load_plan(got["ap"]["pruning"]["plan_folder"])
    assert len(plan.rules) == 2 and plan_metadata(got["ap"]["pruning"]["plan_folder"])["metadata"]["mask"] == "ap"

    # `ap collect --corpus` over the same training text with the dense model gives the same statistics
    stats_file = next(key_dir.glob("attention-*.safetensors"))
    out = tmp_path / "cli.safetensors"
    assert main(["ap", "collect", "--corpus", str(corpus / "train" / "t.txt"), "--model", str(key_dir / "dense" / "model"),
                 "--max-length", "32", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    a, b = AttentionStats.load(stats_file), AttentionStats.load(out)
    assert torch.equal(a.counts, b.counts) and torch.allclose(a.sums, b.sums, rtol=1e-5, atol=1e-7)
    # the masks come from it too: `ap mask` per head with 8 x 8 blocks
    assert main(["ap", "mask", str(out), "--prune", "50", "--scope", "head", "--blocks", "any", "--block-size", "8",
                 "--random", "--out", str(tmp_path / "masks")]) == 0
    summary = json.loads((tmp_path / "masks" / "summary.json").read_text())
    assert {r["method"] for r in summary} == {"ap", "random"}


def test_ap_collect_refuses_a_context_longer_than_the_model(corpus, tmp_path, capsys):
    folder = tmp_path / "m"
    model = tiny_llama(max_position_embeddings=8)
    model.save_pretrained(folder)
    from sparseattn.lm.corpus import bpe_tokenizer

    bpe_tokenizer([corpus / "train" / "t.txt"], 300).save_pretrained(folder)
    assert main(["ap", "collect", "--corpus", str(corpus / "train" / "t.txt"), "--model", str(folder),
                 "--max-length", "16", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "longer than" in capsys.readouterr().err


def test_the_lm_study_spec_expands():
    spec = load_spec(ROOT / "studies" / "lm_attention_pruning.yaml")
    cfgs = spec.configs
    assert all(isinstance(c, LMPruneConfig) and c.max_length == 1024 for c in cfgs)
    masked = [c for c in cfgs if c.prune > 0]
    assert {c.prune for c in masked} == {20, 40, 60, 80, 90, 95}
    assert {c.mask for c in masked} == {"ap", "random", "sink_window"}
    for p in (0, 80, 90):
        for mask in (("ap",) if p == 0 else ("ap", "random", "sink_window")):
            assert {c.seed for c in cfgs if c.prune == p and c.mask == mask} == {0, 1, 2}, (p, mask)


def test_the_lm_study_spec_passes_its_checks_whatever_the_default_model(tmp_path, monkeypatch):
    # a Llama made from scratch has the context's positions: the default model's 512 do not bound it
    from sparseattn.experiments.sweep import check_runs

    small = tmp_path / "small"
    tiny_llama(max_position_embeddings=16).save_pretrained(small)
    monkeypatch.setenv("SPARSEATTN_DEFAULT_MODEL", str(small))
    check_runs(load_spec(ROOT / "studies" / "lm_attention_pruning.yaml"))
    # a checkpoint's own positions still do
    spec = load_spec(ROOT / "studies" / "lm_attention_pruning.yaml")
    for cfg in spec.configs:
        cfg.model = str(small)
    with pytest.raises(Exception, match="max_length=1024 is more than the model's 16 positions"):
        check_runs(spec)
