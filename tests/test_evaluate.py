"""`sparseattn evaluate`: a saved run (or a fine-tuned model) scored with its plan on a TSV, CSV, JSON-lines
file or a GLUE split; the same numbers as scoring each example alone, and as the run's own evaluation."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from sparseattn.cli import main
from sparseattn.models import packaged_model_path
from sparseattn.plans import Plan, save_plan

from test_finetune import make_tiny_model

pytestmark = [pytest.mark.skipif(packaged_model_path() is None, reason="needs the packaged MiniLM's tokenizer"),
              pytest.mark.usefixtures("one_thread")]
GLUE_DIR = os.environ.get("GLUE_DIR")
PLAN = "all: neighbour(1) | global_tokens(1)"
ROWS = [("a gripping, funny film", 1), ("dull and far too long", 0), ("i loved every minute of it", 1),
        ("a mess", 0), ("the cast is wonderful and the story moves", 1), ("boring", 0),
        ("not worth the ticket , sadly", 0), ("sharp writing , great fun", 1), ("it never comes alive", 0)]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run folder as `finetune --out DIR --save-model` writes it, with a tiny random sst2 classifier."""
    from transformers import BertConfig, BertForSequenceClassification

    from sparseattn.models import load_tokenizer

    run = tmp_path_factory.mktemp("run")
    tok = load_tokenizer()
    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    save_plan(Plan.parse(PLAN), run / "plan")
    (run / "results.json").write_text(json.dumps({"task": "sst2", "config": {"max_length": 32,
                                                                              "backend": "reference"}}))
    return run


def _write(tmp_path: Path, fmt: str, rows=ROWS, text="sentence", label="label") -> Path:
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({text: t, label: y}) + "\n" for t, y in rows))
    else:
        with path.open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            w.writerow([text, label])
            w.writerows(rows)
    return path


def _evaluate(capsys, *args) -> dict:
    assert main(["evaluate", *map(str, args), "--no-progress", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def _alone(run: Path, rows) -> float:
    """Accuracy from running each example alone (no padding, no batching) through the sparsified model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import sparseattn as sa

    tok = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    sa.sparsify(model, sa.Plan.parse(PLAN), tokenizer=tok)
    right = 0
    with torch.no_grad():
        for text, label in rows:
            enc = tok(text, truncation=True, max_length=32, return_tensors="pt")
            right += int(model(**enc).logits.argmax(-1).item() == label)
    return right / len(rows)


def test_a_run_on_tsv_csv_and_jsonl(saved_run, tmp_path, capsys):
    results = {fmt: _evaluate(capsys, saved_run, "--data", _write(tmp_path, fmt)) for fmt in ("tsv", "csv", "jsonl")}
    r = results["tsv"]
    assert r["task"] == "sst2" and r["plan"] == Plan.parse(PLAN).spec() and r["examples"] == len(ROWS)
    assert set(r["metrics"]) == {"accuracy"} and r["score"] == r["metrics"]["accuracy"]
    assert r["metrics"]["accuracy"] == pytest.approx(_alone(saved_run, ROWS))
    assert 0.0 < r["sparsity"]["overall"] < 1.0 and r["sparsity"]["examples"] == len(ROWS)
    for other in ("csv", "jsonl"):
        assert results[other]["metrics"] == r["metrics"] and results[other]["sparsity"] == r["sparsity"]
    # named columns and class names as labels; --plan overrides the run's plan; --out keeps the JSON
    named = [(t, ["negative", "positive"][y]) for t, y in ROWS]
    out = tmp_path / "eval.json"
    d = _evaluate(capsys, saved_run, "--data", _write(tmp_path, "csv", named, "review", "stars"),
                  "--text-column", "review", "--label-column", "stars", "--plan", "dense", "--out", out)
    assert d["metrics"] != {} and d["sparsity"]["overall"] == 0.0 and json.loads(out.read_text()) == d


def test_a_model_folder_needs_a_task(saved_run, tmp_path, capsys):
    data = _write(tmp_path, "tsv")
    assert main(["evaluate", str(saved_run / "model"), "--data", str(data)]) == 1
    assert "give --task" in capsys.readouterr().err
    d = _evaluate(capsys, saved_run / "model", "--data", data, "--task", "SST-2", "--plan", PLAN, "--max-length", "32")
    assert d["run"] is None and d["metrics"]["accuracy"] == pytest.approx(_alone(saved_run, ROWS))


@pytest.mark.parametrize("make,message", [
    (lambda p: _write(p, "tsv", ROWS[:3] + [("fine", "7")]), r"data.tsv:5: label '7' is not one of \['negative', "
                                                            r"'positive'\] or 0-1"),
    (lambda p: _write(p, "csv", label="labl"), r"data.csv:1: no label column \(looked for \['label', 'labels', "
                                               r"'score'\]\); the file has \['sentence', 'labl'\]"),
    (lambda p: _write(p, "jsonl", [("ok", 1), ("", 0)]), r"data.jsonl:2: 'sentence' is ''; expected a non-empty text"),
    (lambda p: (p / "x.jsonl").write_text('{"sentence": "ok", "label": 1}\n[1, 2]\n') and p / "x.jsonl",
     r"x.jsonl:2: a JSON list; expected one object a line"),
    (lambda p: (p / "x.csv").write_bytes("sentence,label\nfine,1\n".encode("utf-16")) and p / "x.csv",
     r"x.csv:1: the file is UTF-16"),
    (lambda p: (p / "x.txt").write_text("a") and p / "x.txt", r"x.txt: unknown data format '.txt'"),
    (lambda p: p / "missing.tsv", r"--data '.*missing.tsv': no such file"),
    (lambda p: "sst3", r"--data 'sst3' is neither a file nor a GLUE task"),
    (lambda p: "mrpc:dev", r"--data 'mrpc:dev' is MRPC, but the model is a SST-2 classifier"),
])
def test_bad_data_is_a_one_line_error(saved_run, tmp_path, capsys, make, message):
    import re

    data = make(tmp_path)
    assert main(["evaluate", str(saved_run), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sparseattn evaluate: error: ") and err.count("\n") == 1 and re.search(message, err), err


def test_bad_sources(saved_run, tmp_path, capsys):
    data = str(_write(tmp_path, "tsv"))
    (tmp_path / "unsaved").mkdir()
    (tmp_path / "unsaved" / "results.json").write_text(json.dumps({"task": "sst2", "config": {}}))
    for source, message in [(tmp_path / "unsaved", "has results.json but no model/ folder: the run was not saved"),
                            (tmp_path / "nowhere" / "run", "model path '.*nowhere/run' does not exist"),
                            (tmp_path, "is neither a run \\(results.json\\) nor a model \\(config.json\\)")]:
        assert main(["evaluate", str(source), "--data", data, "--task", "sst2"]) == 1
        err = capsys.readouterr().err
        import re

        assert re.search(message, err) and err.count("\n") == 1, err
    assert main(["evaluate", str(saved_run), "--data", data, "--task", "rte"]) == 1
    assert "was fine-tuned on sst2; --task 'rte' does not fit" in capsys.readouterr().err


@pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set")
def test_evaluate_reproduces_the_runs_own_score(tmp_path, capsys):
    from sparseattn.training.finetune import FinetuneConfig, finetune

    model = make_tiny_model(tmp_path / "tiny")
    cfg = FinetuneConfig(task="sst2", plan="later-half: neighbour(1) | global_tokens(1)", model=model, epochs=1,
                         lr=3e-3, batch_size=8, limit_train=32, limit_eval=40, max_length=64)
    r = finetune(cfg, out_dir=tmp_path / "run", progress=False, device="cpu", save_model=True)
    d = _evaluate(capsys, tmp_path / "run", "--data", "sst2:dev", "--limit", "40")
    assert d["data"] == "GLUE SST-2 dev" and d["examples"] == 40 and d["plan"] == r["plan"]
    assert d["metrics"] == pytest.approx(r["metrics"])
    assert d["sparsity"]["overall"] == pytest.approx(r["sparsity"]["overall"])
