"""GLUE loading: every task present under GLUE_DIR with its official row counts, and malformed files."""

import os
from pathlib import Path

import pytest

from sparseattn.training.glue import (
    TASKS, Example, GlueDataError, examples_from_records, get_task, load_split, read_tsv,
)

GLUE_DIR = os.environ.get("GLUE_DIR")
COUNTS = {"sst2": (67349, 872), "mrpc": (3668, 408), "rte": (2490, 277), "cola": (8551, 1043), "stsb": (5749, 1500)}


def _present(task):
    return GLUE_DIR and (Path(GLUE_DIR) / TASKS[task].folder / "train.tsv").is_file()


@pytest.mark.parametrize("task", sorted(COUNTS))
def test_row_counts_and_labels(task):
    if not _present(task):
        pytest.skip(f"{task} not under GLUE_DIR={GLUE_DIR}")
    t = get_task(task)
    train, dev = load_split(task, "train"), load_split(task, "validation")
    assert (len(train), len(dev)) == COUNTS[task]
    for ex in train + dev:
        assert ex.text.strip() and (ex.pair is not None) == t.is_pair
        if t.is_regression:
            assert 0.0 <= ex.label <= 5.0
        else:
            assert ex.label in range(t.num_labels)
    if not t.is_regression:  # both classes occur
        assert {ex.label for ex in dev} == set(range(t.num_labels))
    test = load_split(task, "test")
    assert test and all(ex.label is None for ex in test)


def test_known_first_rows():
    if not (_present("mrpc") and _present("cola")):
        pytest.skip("MRPC/CoLA not under GLUE_DIR")
    # MRPC's header starts with a byte-order mark; its label column is 'Quality'
    ex = load_split("MRPC", "train")[0]
    assert ex.text.startswith("Amrozi accused his brother") and ex.label == 1
    # CoLA has no header: source, label, original label, sentence
    ex = load_split("CoLA", "train")[0]
    assert ex == Example("Our friends won't buy this analysis, let alone the next one we propose.", None, 1)


def test_other_tasks_present():
    """Any further task under GLUE_DIR (QNLI dev here; QQP, MNLI, WNLI where present) reads cleanly."""
    if not GLUE_DIR:
        pytest.skip("GLUE_DIR not set")
    seen = 0
    for t in TASKS.values():
        if t.name in COUNTS:
            continue
        for split in t.splits:
            if (Path(GLUE_DIR) / t.folder / f"{split}.tsv").is_file():
                exs = load_split(t.name, split)
                assert exs and all(e.text and (e.pair is not None) == t.is_pair for e in exs)
                seen += 1
    if not seen:
        pytest.skip("no other task under GLUE_DIR")


def test_task_names_and_splits():
    assert get_task("SST-2") is get_task("sst2") is get_task("sst-2")
    assert get_task("STS-B").num_labels == 1 and get_task("mnli").num_labels == 3
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'"):
        get_task("sst3")
    with pytest.raises(ValueError, match="unknown split 'dev_matched' for SST-2"):
        load_split("sst2", "dev_matched", "/nonexistent")


def _write(tmp_path, task, split, text, bom=False):
    d = tmp_path / TASKS[task].folder
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{split}.tsv"
    p.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return p


def test_local_layouts(tmp_path):
    _write(tmp_path, "mrpc", "dev", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA \"quoted\tB.\n", bom=True)
    _write(tmp_path, "cola", "dev", "gj04\t0\t*\tBad sentence him.\r\ngj04\t1\t\tGood sentence.\r\n")
    _write(tmp_path, "rte", "dev", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tnot_entailment\n")
    _write(tmp_path, "stsb", "dev", "index\tsentence1\tsentence2\tscore\n0\tA.\tB.\t3.800\n")
    assert load_split("mrpc", "dev", tmp_path) == [Example('A "quoted', "B.", 1)]  # quotes are text
    assert load_split("cola", "dev", tmp_path) == [Example("Bad sentence him.", None, 0),
                                                   Example("Good sentence.", None, 1)]
    assert load_split("rte", "dev", tmp_path) == [Example("A.", "B.", 1)]
    assert load_split("stsb", "dev", tmp_path) == [Example("A.", "B.", 3.8)]


@pytest.mark.parametrize("body,line,why", [
    ("sentence\tlabel\ngood .\t1\nbad\t0\textra\n", 3, "3 tab-separated fields, expected 2"),
    ("sentence\tlabel\ngood .\t1\n\nfine\t0\n", 3, "blank line"),
    ("sentence\tlabel\ngood .\t7\n", 2, "label '7' is not one of"),
    ("sentence\tlabel\n \t1\n", 2, "empty text"),
    ("text\tlabel\ngood .\t1\n", 1, "expected a header with the column 'sentence'"),
    ("", 1, "the file is empty"),
])
def test_malformed_files_name_file_and_line(tmp_path, body, line, why):
    p = _write(tmp_path, "sst2", "train", body)
    with pytest.raises(GlueDataError, match=f"{p}:{line}: .*{why}"):
        load_split("sst2", "train", tmp_path)


def test_skip_malformed_rows(tmp_path, caplog):
    p = _write(tmp_path, "stsb", "train", "index\tsentence1\tsentence2\tscore\n0\tA.\tB.\tfive\n1\tC.\tD.\t1.5\n"
                                          "2\tE.\tbroken\n")
    with pytest.raises(GlueDataError, match=f"{p}:2: label 'five' is not a number"):
        read_tsv(TASKS["stsb"], p)
    assert read_tsv(TASKS["stsb"], p, on_malformed="skip") == [Example("C.", "D.", 1.5)]
    assert "skipped 2 malformed rows" in caplog.text


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="QQP/train.tsv does not exist"):
        load_split("qqp", "train", tmp_path)


def test_hub_records_convert_like_local_files():
    rows = [{"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 0},
            {"premise": "P2.", "hypothesis": "H2.", "label": -1, "idx": 1}]
    assert examples_from_records(TASKS["mnli"], rows) == [Example("P.", "H.", 2), Example("P2.", "H2.", None)]
    assert examples_from_records(TASKS["stsb"], [{"sentence1": "a", "sentence2": "b", "label": 4.2}]) == \
        [Example("a", "b", 4.2)]
