"""Round trip: collect, mask, save, load, sparsify; the model runs with the sparsity `ap mask` reported."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_bert, tiny_llama
from sparseattn import encode, load_plan, measure_sparsity, save_plan, sparsify, unsparsify
from sparseattn.cli import main
from sparseattn.pruning import Example, attention_pruning_mask, collect_attention, grid_report, mask_plan, random_like

SENTENCES = [
    "a gripping , funny film .", "it is not a good movie", "the acting is wooden and the plot goes nowhere .",
    "charming", "an utterly predictable story told with warmth", "bad .", "one of the year 's best .",
    "the soundtrack alone is worth the ticket", "too long by half", "i laughed , i cried , i left happy .",
]


def test_cli_collect_mask_load_sparsify(tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    tiny_bert(vocab_size=tokenizer.vocab_size).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "train.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    stats = tmp_path / "attn.safetensors"
    assert main(["ap", "collect", "--model", str(model_dir), "--text-file", str(data), "--max-length", "24",
                 "--batch-size", "4", "--out", str(stats), "--png", str(tmp_path / "attn.png"), "--quiet"]) == 0
    assert (tmp_path / "attn.png").stat().st_size > 0
    out = tmp_path / "plans"
    assert main(["ap", "mask", str(stats), "--prune", "30", "60", "--random", "--block-size", "4", "--png",
                 "--measure-text-file", str(data), "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["plan"] for r in rows] == ["ap-layer-p30", "random-layer-p30", "ap-layer-p60", "random-layer-p60"]

    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    enc = encode(tokenizer, SENTENCES)
    N = rows[0]["grid_length"]
    assert N == enc["input_ids"].shape[1]  # the grid is the longest collected example
    full = {"input_ids": torch.randint(1000, 2000, (2, N)), "attention_mask": torch.ones(2, N, dtype=torch.long)}
    for row in rows:
        folder = out / row["plan"]
        assert (folder / "mask.png").stat().st_size > 0
        plan = load_plan(folder)
        assert plan.spec().startswith(f"layers=0: static_mask('{row['method']}_l0')")
        sparsify(model, str(folder))  # a plan folder is a plan
        on_full = measure_sparsity(model, full, block_size=4)
        assert on_full.overall == pytest.approx(row["grid_sparsity"], abs=1e-12)
        assert on_full.block_density == pytest.approx(row["grid_block_density"], abs=1e-12)
        assert on_full.overall == pytest.approx(row["requested_percent"] / 100, abs=1 / (4 * N * N))
        on_data = measure_sparsity(model, enc)  # the collected examples, cropped: what `ap mask` reported
        assert on_data.overall == pytest.approx(row["collected_sparsity"], abs=1e-12)
        assert on_data.overall == pytest.approx(row["measured_sparsity"], abs=1e-12)
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        assert torch.isfinite(h).all()
        too_long = {"input_ids": torch.randint(1000, 2000, (1, N + 1))}
        with pytest.raises(ValueError, match=f"at most {N} tokens"):
            model(**too_long)
        unsparsify(model)
    ap60, rand60 = rows[2], rows[3]
    assert ap60["grid_sparsity"] == rand60["grid_sparsity"]


def test_decoder_round_trip(tokenizer, tmp_path):
    llama = tiny_llama(vocab_size=tokenizer.vocab_size)
    stats = collect_attention(llama, tokenizer, [Example(s) for s in SENTENCES], length=20, batch_size=4,
                              progress=False)
    assert stats.causal
    stats = stats.cropped(stats.longest)
    N = stats.length
    for scope in ("layer", "head"):
        keep = attention_pruning_mask(stats, 0.5, scope=scope)
        for prefix, k in (("ap", keep), ("random", random_like(keep, stats, scope=scope))):
            plan = mask_plan(k, prefix=prefix)
            reported = grid_report(plan, stats)
            folder = save_plan(plan, tmp_path / f"{prefix}-{scope}", num_layers=2, num_heads=4, length=N)
            sparsify(llama, load_plan(folder))
            ids = torch.randint(1000, 2000, (1, N))
            measured = measure_sparsity(llama, {"input_ids": ids})
            assert measured.overall == pytest.approx(reported.overall, abs=1e-12)
            assert measured.overall == pytest.approx(0.5, abs=4 / (8 * N * (N + 1) // 2))
            with torch.no_grad():
                logits = llama(input_ids=ids).logits
            assert torch.isfinite(logits).all()
            unsparsify(llama)
