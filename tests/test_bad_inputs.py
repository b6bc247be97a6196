"""Issue 19's bad inputs, each a clear error of sparseattn's own (the bad value, what was expected, where
it came from) or a correct result; none silently wrong, none a traceback."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import yaml

import sparseattn as sa
from sparseattn.errors import ConfigError, DataError, DependencyError, NotFoundError, SparseattnError
from sparseattn.experiments.sweep import SweepSpecError, check_runs, load_spec, spec_from_dict
from sparseattn.plans import Plan, PlanSpecError
from sparseattn.training.batching import encode_split
from sparseattn.training.glue import Example, GlueDataError, get_task, load_split

from conftest import make_layout


def _glue(tmp_path, folder, split, text):
    (tmp_path / folder).mkdir(exist_ok=True)
    path = tmp_path / folder / f"{split}.tsv"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


# -- GLUE files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header,message", [
    ("sentence\tlabl", r"SST-2/train.tsv:1: header \['sentence', 'labl'\] has no label column 'label' for SST-2 "
                       r"\(is 'labl' it, misspelt\?\); a train or dev file needs its labels"),
    ("sentence\tstars", r"has no label column 'label' for SST-2; a train or dev file needs its labels"),
])
def test_a_train_file_without_its_label_column(tmp_path, header, message):
    _glue(tmp_path, "SST-2", "train", f"{header}\na fine film\t1\n")
    with pytest.raises(GlueDataError, match=message):
        load_split("sst2", "train", tmp_path)
    _glue(tmp_path, "SST-2", "test", "index\tsentence\n0\ta fine film\n")  # test files have no labels: fine
    assert load_split("sst2", "test", tmp_path) == [Example("a fine film", None, None)]


@pytest.mark.parametrize("score,message", [
    ("nan", "label 'nan' is not a finite number"), ("inf", "label 'inf' is not a finite number"),
    ("-7", "score '-7' is outside 0-5"), ("5.5", "score '5.5' is outside 0-5"), ("high", "label 'high' is not a number"),
])
def test_stsb_scores_must_be_finite_and_in_range(tmp_path, score, message):
    _glue(tmp_path, "STS-B", "train", f"index\tsentence1\tsentence2\tscore\n0\ta\tb\t3.2\n1\tc\td\t{score}\n")
    with pytest.raises(GlueDataError, match=rf"STS-B/train.tsv:3: {message}"):
        load_split("stsb", "train", tmp_path)
    assert load_split("stsb", "train", tmp_path, on_malformed="skip") == [Example("a", "b", 3.2)]


@pytest.mark.parametrize("content,message", [
    ("sentence\tlabel\nfine\t1\n" + "x" * 140_000 + "\t0\n", r"train.tsv:3: field larger than field limit"),
    ("sentence\tlabel\nfine\t1\n".encode("utf-16"), r"train.tsv:1: the file is UTF-16"),
    ("sentence\tlabel\nfine\t1\n".encode("utf-16-le"), r"train.tsv:1: a NUL byte at offset 1"),
    (b"sentence\tlabel\nfine\t1\ncaf\xe9\t0\n", r"train.tsv:3: byte 0xe9 at offset 25 is not UTF-8"),
])
def test_unreadable_text_names_file_and_line(tmp_path, content, message):
    _glue(tmp_path, "SST-2", "train", content)
    with pytest.raises(DataError, match=message):
        load_split("sst2", "train", tmp_path)


def test_partly_labeled_or_non_finite_examples_are_refused(tokenizer):
    with pytest.raises(DataError, match="mine: 1 of 2 examples have no label"):
        encode_split(tokenizer, [Example("a", None, 1), Example("b", None, None)], 16, what="mine")
    with pytest.raises(DataError, match="mine: example 1 has the score nan; expected a finite number"):
        encode_split(tokenizer, [Example("a", "b", 1.0), Example("c", "d", float("nan"))], 16, regression=True,
                     what="mine")


def test_no_glue_dir_and_no_datasets_is_a_one_line_error(monkeypatch, capsys):
    from sparseattn.cli import main
    from sparseattn.training import glue

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails
    glue._load_hub.cache_clear()
    with pytest.raises(DependencyError, match="install 'datasets'"):
        load_split("sst2", "dev")
    assert main(["finetune", "--limit-train", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sparseattn finetune: error: no GLUE data: set GLUE_DIR") and "install 'datasets'" in err
    assert err.count("\n") == 1


# -- patterns and plan specs --------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [sa.neighbour, sa.global_tokens, sa.random, sa.strided])
def test_pattern_integers_past_int64_are_refused(factory):
    with pytest.raises(ConfigError, match=r"must be <= 2147483647 \(2\*\*31 - 1, longer than any sequence\), got "
                                          "9223372036854775808"):
        factory(2**63)


def test_a_pattern_degree_past_any_sequence_keeps_everything():
    layout = make_layout([7, 4])
    assert torch.equal(sa.neighbour(2**31 - 1).mask(layout), layout.allowed())
    assert torch.equal(sa.global_tokens(2**31 - 1).mask(layout), layout.allowed())


@pytest.mark.parametrize("text,message,target", [
    ("neighbour(100000000000000000000000)", "neighbour degree k must be <= 2147483647", None),
    ("neighbour(10**23)", "pattern arguments must be numbers or quoted strings", "10**23"),
    ("neighbour(-'x')", "pattern arguments must be numbers or quoted strings", "-'x'"),
    ("", "empty plan spec", None),
    ("   ", "empty plan spec", None),
    ("# only a comment", "empty plan spec", None),
    ("all: neighbour(1) |", "missing pattern", None),
    ("layers=0-100000: neighbour(1)", "bad layers '0-100000': indices go up to 65535", "0-100000"),
    ("(" * 5000 + "neighbour(1)" + ")" * 5000, "it is nested too deeply", None),
    ("neighbour(1) | (random(1) & " * 3000 + "neighbour(2)" + ")" * 3000, "it is nested too deeply", None),
])
def test_bad_specs(text, message, target):
    with pytest.raises(PlanSpecError, match=re.escape(message)) as e:
        Plan.parse(text)
    if target is not None:
        line, caret = str(e.value).splitlines()[-2:]
        assert line[caret.index("^"):][:caret.count("^")] == target


def test_a_long_chain_of_patterns_parses():
    long = " | ".join(f"neighbour({i % 7})" for i in range(5000)) + " & global_tokens(1) | random(2)"
    plan = Plan.parse("all: " + long)
    assert Plan.parse(plan.spec()) == plan
    short = Plan.parse("all: neighbour(6) | random(2)")  # neighbour(1) & global_tokens(1) is within neighbour(6)
    assert Plan.parse("all: " + "(" * 300 + "neighbour(6)" + ")" * 300 + " | random(2)") == short
    layout = make_layout([9, 5])
    assert torch.equal(plan.resolve(1, 2)[0].mask(layout), short.resolve(1, 2)[0].mask(layout))


def test_missing_paths_say_they_are_missing(tmp_path, capsys):
    from sparseattn.cli import main

    with pytest.raises(NotFoundError, match="model path '.*/nope' does not exist"):
        sa.models.resolve_model(str(tmp_path / "nope")) if hasattr(sa, "models") else \
            __import__("sparseattn.models").models.resolve_model(str(tmp_path / "nope"))
    assert main(["inspect", "A man.", "--plan", str(tmp_path / "gone")]) == 1
    assert "no saved plan at '" in capsys.readouterr().err


# -- sweep specs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,message", [
    ({"name": ["a", "b"], "grid": {"seed": [0]}}, r"'name' must be a name \(a string\), got \['a', 'b'\]"),
    ({"db": 42, "grid": {"seed": [0]}}, r"'db' must be a database path \(a string\), got 42"),
    ({1: 2, "grid": {"seed": [0]}}, r"unknown key\(s\) 1"),
    ({"grid": {"seed": [0], "eval_split": ["tset"]}}, r"unknown split 'tset' for SST-2"),
    ({"grid": {"seed": [0]}, "fixed": {"backend": "fast"}}, r"unknown backend 'fast'; expected one of block, "
                                                            "reference"),
    ({"grid": {"seed": [0]}, "fixed": {"model": "./no/such/model"}}, r"model path './no/such/model' does not exist"),
    ({"grid": {"seed": [0]}, "fixed": {"weight_decay": [1]}}, r"weight_decay must be a finite number >= 0"),
    ({"grid": {"plan": ["runs/missing-plan"]}}, r"no saved plan at 'runs/missing-plan'"),
])
def test_bad_sweep_specs(spec, message):
    with pytest.raises(SweepSpecError, match=message):
        spec_from_dict(spec, name="x", where="x.yaml")


def test_runs_that_do_not_fit_the_model_fail_at_sweep_time(tmp_path):
    from sparseattn.models import packaged_model_path

    if packaged_model_path() is None:
        pytest.skip("needs the packaged MiniLM's config")
    p = tmp_path / "s.yaml"
    for fixed, message in [({"max_length": 1000}, "max_length=1000 is more than the model's 512 positions"),
                           ({"plan": "layers=9: neighbour(1)"}, "layer 9 is out of range for a model with 6 layers"),
                           ({"plan": "heads=12: neighbour(1)"}, "head 12 is out of range for a model with 12 heads")]:
        p.write_text(yaml.safe_dump({"fixed": fixed, "grid": {"seed": [0, 1]}}))
        with pytest.raises(SweepSpecError, match=rf"s.yaml: run 0 \(sst2 \| .* \| seed 0\): .*{re.escape(message)}"):
            check_runs(load_spec(p))


def test_every_error_is_a_sparseattn_error():
    for cls in (ConfigError, DataError, NotFoundError, DependencyError, sa.StorageError, sa.PlanError,
                sa.PlanSpecError, sa.PlanFileError, SweepSpecError, GlueDataError):
        assert issubclass(cls, SparseattnError)
    with pytest.raises(ConfigError):
        get_task("sst3")
