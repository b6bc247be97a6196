"""The report renders from a small results database; its plots are valid PNG and SVG files."""

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from sparseattn.experiments.db import ResultsDB, WorkerId
from sparseattn.training.finetune import FinetuneConfig
from sparseattn.experiments.sweep import write_report
from sparseattn.reports.report import plan_family

# (task, plan, seed) -> (main metric, other metric, overall sparsity, applied sparsity)
RUNS = {
    ("sst2", "dense", 0): (0.90, None, 0.0, 0.0),
    ("sst2", "dense", 1): (0.88, None, 0.0, 0.0),
    ("sst2", "later-half: neighbour(2)", 0): (0.86, None, 0.40, 0.80),
    ("sst2", "later-half: neighbour(2)", 1): (0.85, None, 0.40, 0.80),
    ("sst2", "later-half: random(4)", 0): (0.80, None, 0.41, 0.82),
    ("mrpc", "dense", 0): (0.85, 0.78, 0.0, 0.0),
    ("mrpc", "all: (neighbour(2) | global_tokens(1))", 0): (0.80, 0.70, 0.6, 0.6),  # canonical spec
}


def _fill(path):
    db = ResultsDB(path)
    cfgs = [FinetuneConfig(task=t, plan=p, seed=s, epochs=1).to_dict() for (t, p, s) in RUNS]
    db.add_runs("small", cfgs)
    w = WorkerId("test")
    while (row := db.claim(w, "small")) is not None:
        main, other, overall, applied = RUNS[row["task"], row["plan"], row["seed"]]
        metrics = {"accuracy": main} if row["task"] == "sst2" else {"f1": main, "accuracy": other}
        labels = ("negative", "positive") if row["task"] == "sst2" else ("not_equivalent", "equivalent")
        one_class = row["plan"] == "later-half: random(4)"
        db.finish(row["key"], w, {"score": main, "metrics": metrics, "timing": {"train_seconds": 1.0},
                                  "sparsity": {"overall": overall, "applied": applied, "per_layer": [overall] * 6},
                                  "main_metric": "accuracy" if row["task"] == "sst2" else "f1",
                                  "data": {"train_examples": 500, "eval_examples": 200 if row["task"] == "sst2" else 100},
                                  "predicted_classes": {labels[0]: 0 if one_class else 90, labels[1]: 110},
                                  "majority_reference": {"class": labels[1], "metrics": dict.fromkeys(metrics, 0.51)}})
    db.add_runs("small", [FinetuneConfig(task="rte", seed=0).to_dict()])  # one pending run
    db.close()


def test_report_tables_and_plots(tmp_path):
    _fill(tmp_path / "r.sqlite")
    paths = write_report(tmp_path / "r.sqlite", tmp_path / "rep", title="t")
    md = paths["markdown"].read_text()
    assert "7 done, 1 pending" in md.replace("Runs: ", "")
    # SST-2 dense: mean 89.00, sample std of (90, 88) = 1.41; neighbour: 85.50 ± 0.71, delta -3.50
    assert "| dense | dense | 2 | 0.0 | 0.0 | 89.00 ± 1.41 | baseline |" in md
    assert "| later-half: neighbour(2) | neighbour | 2 | 40.0 | 80.0 | 85.50 ± 0.71 | -3.50 |" in md
    assert "| later-half: random(4) | random | 1 | 41.0 | 82.0 | 80.00 (n = 1) | -9.00 | predicts one class |" in md
    # the run setup, the majority-class reference and the warning, per task
    assert ("Setup: the packaged all-MiniLM-L6-v2; 500 training examples x 1 epoch(s), lr 5e-05, batch 32, max length "
            "128; evaluated on 200 dev examples; seeds 0, 1 (mean ± sample std).") in md
    assert "Reference: always predicting the majority class 'positive' scores accuracy 51.00" in md
    assert "Warning: 1 of 3 plans have runs that predict one class" in md
    # MRPC: f1 is the main metric, accuracy listed beside it
    assert "| all: (neighbour(2) \\| global_tokens(1)) | global_tokens\\|neighbour | 1 | 60.0 | 60.0 | 80.00 (n = 1) | -5.00 | 70.00 |  |" in md
    html = paths["html"].read_text()
    assert html.startswith("<!doctype html>") and "85.50 ± 0.71" in html and "<img src='plots/task_sst2.svg'" in html
    import csv

    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 8 and sum(r["status"] == "done" for r in rows) == 7  # every run, the pending one too
    nb = [r for r in rows if r["plan"] == "later-half: neighbour(2)" and r["seed"] == "1"][0]
    assert (float(nb["score"]), float(nb["sparsity"]), float(nb["sparsity_applied"])) == (0.85, 0.40, 0.80)
    assert nb["main_metric"] == "accuracy" and nb["train_seconds"] == "1.0"
    import json

    assert json.loads(nb["config"])["plan"] == "later-half: neighbour(2)" and len(json.loads(nb["sparsity_per_layer"])) == 6
    names = sorted(p.name for p in paths["plots"])
    # no family has two plans on a task: a family plot would be one point, so there is none
    assert names == sorted(["task_sst2.png", "task_sst2.svg", "task_mrpc.png", "task_mrpc.svg"])
    for p in paths["plots"]:
        data = p.read_bytes()
        if p.suffix == ".png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            import matplotlib.image

            img = matplotlib.image.imread(p)
            assert img.ndim == 3 and img.shape[0] > 100 and np.ptp(img) > 0  # decodes, and is not blank
        else:
            assert ET.fromstring(data).tag.endswith("svg")
    # the same results make the same files, byte for byte (no date, no random SVG ids): a report kept in git
    # changes only where its numbers do
    write_report(tmp_path / "r.sqlite", tmp_path / "again", title="t")
    for p in [*paths["plots"], paths["markdown"], paths["html"], paths["csv"]]:
        assert (tmp_path / "again" / p.relative_to(tmp_path / "rep")).read_bytes() == p.read_bytes(), p.name


def test_a_report_pools_several_databases_counting_a_run_once(tmp_path):
    """The databases of one study's sweeps run apart (two specs, two machines) make one report; a run that both
    hold counts once, its finished copy first."""
    _fill(tmp_path / "a.sqlite")  # 7 done, rte pending
    db = ResultsDB(tmp_path / "b.sqlite")
    rte = FinetuneConfig(task="rte", seed=0).to_dict()
    db.add_runs("other", [rte, FinetuneConfig(task="rte", seed=1).to_dict()])
    w = WorkerId("b")
    row = db.claim(w, "other")
    db.finish(row["key"], w, {"score": 0.6, "metrics": {"accuracy": 0.6}, "main_metric": "accuracy",
                              "sparsity": {"overall": 0.0, "applied": 0.0, "per_layer": [0.0] * 6}})
    db.close()
    paths = write_report([tmp_path / "a.sqlite", tmp_path / "b.sqlite"], tmp_path / "rep")
    md = paths["markdown"].read_text()
    assert "8 done, 1 pending" in md.replace("Runs: ", "")
    import csv

    rows = list(csv.DictReader(paths["csv"].open()))
    rte_rows = [r for r in rows if r["task"] == "rte"]
    assert len(rows) == 9 and sorted(r["status"] for r in rte_rows) == ["done", "pending"]
    assert [r["seed"] for r in rte_rows if r["status"] == "done"] == ["0"]  # b's finished copy, not a's pending one
    with pytest.raises(ValueError, match=r"a.sqlite has no sweep 'x'.*b.sqlite has no sweep 'x'"):
        write_report([tmp_path / "a.sqlite", tmp_path / "b.sqlite"], tmp_path / "rep", sweep="x")


def test_plan_family_names():
    assert plan_family("dense") == "dense"
    assert plan_family("later-half: bigbird(1, 2, 3)") == "bigbird"
    assert plan_family("layers=0: neighbour(2); layers=1: random(3) | global_tokens(1)") == \
        "global_tokens|random; neighbour"


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results database"):
        write_report(tmp_path / "none.sqlite", tmp_path / "rep")
    _fill(tmp_path / "r.sqlite")
    with pytest.raises(ValueError, match="no sweep 'other'"):
        write_report(tmp_path / "r.sqlite", tmp_path / "rep", sweep="other")


def test_pareto_front_keeps_only_undominated_points():
    from sparseattn.reports.report import pareto_front

    pts = [(0.1, 0.90), (0.5, 0.85), (0.5, 0.80), (0.6, 0.86), (0.9, 0.70), (0.3, 0.84), (0.9, 0.70)]
    assert pareto_front(pts) == [(0.1, 0.90), (0.6, 0.86), (0.9, 0.70)]
    assert pareto_front([]) == []


def test_report_of_language_model_runs(tmp_path):
    """Perplexity prints as is (not x100), Δ in perplexity, lower is better on the Pareto front."""
    from sparseattn.lm.train import LMConfig
    from sparseattn.reports.report import pareto_front

    db = ResultsDB(tmp_path / "lm.sqlite")
    runs = {("dense", 0): (30.0, 0.0), ("dense", 1): (32.0, 0.0), ("all: neighbour(8)", 0): (33.5, 0.8)}
    db.add_runs("lm", [LMConfig(plan=p, seed=s).to_dict() for p, s in runs])
    w = WorkerId("test")
    while (row := db.claim(w, "lm")) is not None:
        ppl, sp = runs[row["plan"], row["seed"]]
        db.finish(row["key"], w, {"score": ppl, "metrics": {"perplexity": ppl, "loss": float(np.log(ppl))},
                                  "timing": {"train_seconds": 1.0},
                                  "sparsity": {"overall": sp, "applied": sp, "per_layer": [sp] * 6},
                                  "model": "llama (new): 6 layers, hidden 384, 6 heads",
                                  "data": {"train_rows": 1990, "context": 1024, "eval_scored_tokens": 109918}})
    db.close()
    md = write_report(tmp_path / "lm.sqlite", tmp_path / "rep", title="t")["markdown"].read_text()
    assert "## books (language modelling)" in md
    # the model as the runs describe it, rows of the context and tokens scored (not GLUE's examples)
    assert ("Setup: llama (new): 6 layers, hidden 384, 6 heads; 1990 training rows of 1024 tokens x 2 epoch(s), lr "
            "0.001, batch 16; perplexity over 109918 scored tokens of the valid split; seeds 0, 1") in md
    assert "| dense | dense | 2 | 0.0 | 0.0 | 31.00 ± 1.41 | baseline | 3.43 |" in md
    assert "| all: neighbour(8) | neighbour | 1 | 80.0 | 80.0 | 33.50 (n = 1) | +2.50 | 3.51 |" in md
    assert pareto_front([(0, 30.0), (50, 29.0), (80, 35.0), (60, 40.0)], higher_is_better=False) == \
        [(50, 29.0), (80, 35.0)]
