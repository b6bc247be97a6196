"""studies/ablation_summary.py, studies/ap_summary.py and studies/lm_summary.py: the studies' tables and figures, from the
results.csv that `sparseattn report` writes."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name="ablation_summary"):
    if str(ROOT / "studies") not in sys.path:  # as `python studies/NAME.py` has it: the scripts share summaries.py
        sys.path.insert(0, str(ROOT / "studies"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "studies" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_dicts(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _write(path, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "plan", "seed", "status", "score", "sparsity_applied"])
        w.writerows(rows)


def test_changes_against_dense_with_spread_and_sparsity(tmp_path):
    mod = _module()
    _write(tmp_path / "r.csv", [
        ("sst2", "dense", 0, "done", 0.90, 0.0), ("sst2", "dense", 1, "done", 0.88, 0.0),
        ("sst2", "all: (neighbour(1) | global_tokens(1))", 0, "done", 0.86, 0.80),
        ("sst2", "all: (neighbour(1) | global_tokens(1))", 1, "done", 0.84, 0.82),
        ("sst2", "later-half: (syntax(1) | global_tokens(1))", 0, "done", 0.89, 0.81),
        ("sst2", "later-half: (lexical() | global_tokens(1))", 0, "pending", "", ""),  # not finished: left out
    ])
    text = mod.table(mod.load(tmp_path / "r.csv"))
    assert "| SST-2 acc (89.00 ± 1.41) | later-half | - | - | +0.00 ± 0.00 @ 81% | - |" in text
    assert "|  | all | -4.00 ± 1.41 @ 81% | - | - | - |" in text
    mod.plot(mod.load(tmp_path / "r.csv"), tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_a_plan_outside_the_study_and_a_broken_row_are_named(tmp_path):
    mod = _module()
    _write(tmp_path / "a.csv", [("sst2", "all: bigbird(1, 1, 1)", 0, "done", 0.8, 0.9)])
    with pytest.raises(ValueError, match="bigbird"):
        mod.load(tmp_path / "a.csv")
    _write(tmp_path / "b.csv", [("sst2", "dense", 0, "done", 0.8, 0.0), ("sst2", "dense", 1, "done", "n/a", 0.0)])
    with pytest.raises(ValueError, match=r"b\.csv:3.*'n/a'"):
        mod.load(tmp_path / "b.csv")


def test_ap_summary_tables_prune_runs_by_level_and_mask(tmp_path):
    import json

    mod = _module("ap_summary")

    def row(p, mask, score, sp, status="done"):
        cfg = {"method": "prune", "task": "stsb", "prune": p, "mask": mask}
        return {"task": "stsb", "plan": "x", "status": status, "main_metric": "pearson", "score": score,
                "sparsity": sp, "config": json.dumps(cfg)}

    rows = [row(0.0, "ap", 0.84, 0.0), row(60.0, "ap", 0.82, 0.62), row(60.0, "random", 0.49, 0.60),
            row(80.0, "ap", "", "", status="pending")]
    _write_dicts(tmp_path / "r.csv", rows)
    text = mod.table(mod.load(tmp_path / "r.csv"))
    assert "| stsb (pearson) | ap | 0.8400 | 0.8200 (62%) |" in text
    assert "| stsb (pearson) | random | 0.8400 | 0.4900 (60%) |" in text
    assert "| stsb (pearson) | ap − random | - | +0.3300 |" in text  # one seed: no spread to compare with
    _write_dicts(tmp_path / "bad.csv", [row(0.0, "ap", 0.84, 0.0), row(60.0, "ap", "n/a", 0.62)])
    with pytest.raises(ValueError, match=r"bad\.csv:3: .*'n/a'"):
        mod.load(tmp_path / "bad.csv")
    mod.plot(mod.load(tmp_path / "r.csv"), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # two seeds: the difference's spread is the two stds in quadrature; inside it, the cell says so
    two = [{**r, "seed": 0} for r in rows] + [{**row(60.0, "ap", 0.52, 0.62), "seed": 1},
                                              {**row(60.0, "random", 0.51, 0.60), "seed": 1}]
    _write_dicts(tmp_path / "s.csv", two)
    text = mod.table(mod.load(tmp_path / "s.csv"))
    assert "| stsb (pearson) | ap − random | - | +0.1700 ± 0.2126 *inside* |" in text
    # seeds: mean ± sample std, every seed counted (not the first row found)
    rows = [dict(r, seed=0) for r in rows] + [dict(row(0.0, "ap", 0.82, 0.0), seed=1),
                                              dict(row(60.0, "ap", 0.78, 0.58), seed=1)]
    _write_dicts(tmp_path / "s.csv", rows)
    text = mod.table(mod.load(tmp_path / "s.csv"))
    assert "| stsb (pearson) | ap | 0.8300 ± 0.0141 | 0.8000 ± 0.0283 (60%) |" in text
    assert "mean ± sample std over seeds 0, 1" in text
    mod.plot(mod.load(tmp_path / "s.csv"), tmp_path / "s.png")
    other = dict(rows[0], config=json.dumps({"method": "finetune", "task": "stsb"}))
    _write_dicts(tmp_path / "b.csv", [other])
    with pytest.raises(ValueError, match=r"b\.csv:2: a 'finetune' run"):
        mod.load(tmp_path / "b.csv")


def test_lm_summary_pairs_each_run_with_the_dense_run_of_its_seed(tmp_path):
    import json

    mod = _module("lm_summary")

    def row(p, mask, seed, ppl, sp, status="done"):
        cfg = {"method": "prune-lm", "task": "books", "prune": p, "mask": mask}
        return {"task": "books", "plan": "x", "seed": seed, "status": status, "main_metric": "perplexity",
                "score": ppl, "sparsity": sp, "config": json.dumps(cfg)}

    rows = [row(0.0, "ap", 0, 40.0, 0.0), row(0.0, "ap", 1, 50.0, 0.0),
            row(80.0, "ap", 0, 42.0, 0.8), row(80.0, "ap", 1, 51.0, 0.8),  # +5% and +2%
            row(80.0, "sink_window", 0, 44.0, 0.79), row(90.0, "random", 0, "", "", status="running")]
    _write_dicts(tmp_path / "r.csv", rows)
    text = mod.table(mod.load(tmp_path / "r.csv"))
    assert "| 0% | dense | 0.0% | 45.00 ± 7.07 (n = 2) | baseline |" in text
    # the mean of +5% and +2%, not 46.5 against the two-seed dense mean 45 (+3.3%)
    assert "| 80% | ap | 80.0% | 46.50 ± 6.36 (n = 2) | +3.5% ± 2.1 |" in text
    assert "| 80% | sink_window | 79.0% | 44.00 (n = 1) | +10.0% |" in text
    assert "random" not in text.split("\n\n")[0]  # the unfinished run is left out
    mod.plot(mod.load(tmp_path / "r.csv"), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bigbird_summary_gives_the_study_2_numbers_and_the_seeds_spread(tmp_path):
    mod = _module("bigbird_summary")
    # the study's own results (three seeds) give the table docs/results.md quotes
    text = mod.removal_table(mod.load(ROOT / "docs" / "learned-sparsity" / "study" / "results.csv"))
    assert ("| SST-2 accuracy (88.88 ± 0.23) | -6.22 ± 0.27 (median -2.75) | -7.03 ± 0.20 (median -4.64) | "
            "-4.21 ± 0.17 (median -0.57) |") in text
    # two seeds: per seed the mean change over the grid, then mean ± sample std over the seeds
    rows = [("sst2", "dense", s, 0.9, 0.0) for s in (0, 1)]
    rows += [("sst2", "all: bigbird(1, 1, 0)", 0, 0.85, 0.8), ("sst2", "all: bigbird(1, 1, 0)", 1, 0.83, 0.8),
             ("sst2", "all: bigbird(0, 1, 0)", 0, 0.80, 0.9), ("sst2", "all: bigbird(0, 1, 0)", 1, 0.82, 0.9),
             ("sst2", "all: bigbird(1, 0, 0)", 0, 0.75, 0.9)]  # seed 1 of this one never ran
    with (tmp_path / "r.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "plan", "seed", "score", "sparsity"])
        w.writerows(rows)
    data = mod.load(tmp_path / "r.csv")
    text = mod.removal_table(data)
    # remove global from (1,1,0): -5 (seed 0), -1 (seed 1); remove neighbour: -10 (seed 0 only)
    assert "| SST-2 accuracy (90.00 ± 0.00) | -3.00 ± 2.83 (median -3.00) | -10.00 (median -10.00) | - |" in text
    assert "81.0 ± 1.4@90%" in mod.neighbour_table(data)
    assert "(1, 0) 75.0 (n=1)@90%" in mod.neighbour_table(data)  # a point whose other seed is not in yet says so


def test_learned_summary_sets_each_learned_plan_against_the_best_bigbird_at_least_as_sparse(tmp_path):
    mod = _module("learned_summary")
    # the study's own results (three seeds): the SST-2 row behind docs/results.md's verdict
    text = mod.table(mod.load([ROOT / "docs" / "learned-sparsity" / "study" / "results.csv"]))
    assert ("|  | learned(target=0.8) | 85.2% | 88.0 ± 0.8 | bigbird(1, 0, 1) @ 87% | 84.1 ± 0.3 | +4.0 ± 0.9 | no |"
            in text)
    # two seeds: the spread of the difference is the two cells' stds in quadrature
    rows = [("sst2", "dense", s, 0.90, 0.0) for s in (0, 1)]
    rows += [("sst2", "learned(lam=0.1)", 0, 0.86, 0.850), ("sst2", "learned(lam=0.1)", 1, 0.84, 0.852),
             ("sst2", "all: bigbird(0, 1, 1)", 0, 0.80, 0.845), ("sst2", "all: bigbird(0, 1, 1)", 1, 0.82, 0.845),
             ("sst2", "all: bigbird(2, 2, 0)", 0, 0.89, 0.70), ("sst2", "all: bigbird(2, 2, 0)", 1, 0.89, 0.70),
             ("sst2", "learned(lam=3)", 0, 0.70, 0.95), ("sst2", "learned(lam=3)", 1, 0.60, 0.95),
             ("sst2", "learned(lam=0.5)", 0, 0.88, 0.90),  # its seed 1 not in yet
             ("sst2", "all: neighbour(2)", 0, 0.5, 0.9)]  # no plan of the study: left out
    with (tmp_path / "r.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "plan", "seed", "score", "sparsity"])
        w.writerows(rows)
    text = mod.table(mod.load([tmp_path / "r.csv"]))
    # 85.0 ± 1.4 against 81.0 ± 1.4 (85.1% meets BigBird from 84.1%): +4.0 ± 2.0, beyond the spread
    assert ("| SST-2 accuracy (90.0 ± 0.0) | learned(lam=0.1) | 85.1% | 85.0 ± 1.4 | bigbird(0, 1, 1) @ 84% | "
            "81.0 ± 1.4 | +4.0 ± 2.0 | no |") in text
    assert "|  | learned(lam=3) | 95.0% | 65.0 ± 7.1 | none as sparse | - | - | - |" in text
    assert "|  | learned(lam=0.5) | 90.0% | 88.0 (n=1) | none as sparse | - | - | - |" in text
    assert "mean ± sample std over seeds 0, 1" in text
    inside = mod.comparisons({"learned(x)": {0: (0.80, 0.9), 1: (0.84, 0.9)},
                              "all: bigbird(1, 0, 0)": {0: (0.81, 0.9), 1: (0.82, 0.9)}})
    assert inside[0]["inside"] is True and inside[0]["difference"] == pytest.approx(0.005)
