"""Fuzzing the inputs users write: any string as a plan spec, any bytes as a data file, any object in a sweep
spec or a plan.json. Each gives a result or one of sparseattn's own errors (SparseattnError), never
another exception."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseattn.errors import SparseattnError
from sparseattn.experiments.sweep import SPEC_KEYS, SweepSpec, spec_from_dict
from sparseattn.plans import Plan, as_plan, load_plan, save_plan
from sparseattn.plans.io import FORMAT
from sparseattn.training.config import FinetuneConfig
from sparseattn.training.files import read_examples
from sparseattn.training.glue import TASKS, read_tsv

# SPARSEATTN_FUZZ_EXAMPLES=5000 for a longer search than the test suite's
FUZZ = settings(max_examples=int(os.environ.get("SPARSEATTN_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# pieces of plan specs, so that random strings reach past the first error often
SPEC_PIECES = ["neighbour", "random", "global_tokens", "strided", "bigbird", "static_mask", "syntax", "lexical",
               "similar", "full", "causal", "dense", "none", "(", ")", "|", "&", ":", ";", "\n", "#", " ", ",", "@",
               "=", "-", "'", '"', "all", "later-half", "first-half", "layers=", "heads=", "0", "1", "3", "0-3",
               "5-2", "2**63", "10**23", "9223372036854775808", "-'x'", "'special'", "1e400", "1.5", "k=", "seed=",
               "by='lower'", "special='global'", "x", "\x00", "\u00e9", "٣"]
spec_text = st.one_of(st.text(max_size=60), st.lists(st.sampled_from(SPEC_PIECES), max_size=25).map("".join))


@FUZZ
@given(spec_text)
def test_any_string_is_a_plan_or_a_plan_error(text):
    for parse in (Plan.parse, as_plan):
        try:
            plan = parse(text)
        except SparseattnError:
            continue
        assert isinstance(plan, Plan)
        assert Plan.parse(plan.spec()) == plan  # what parses round-trips


TSV_PIECES = [b"sentence", b"label", b"sentence1", b"sentence2", b"score", b"#1 String", b"#2 String", b"Quality",
              b"\t", b"\n", b"\r\n", b"\r", b"0", b"1", b"2", b"-7", b"nan", b"inf", b"3.5", b"positive", b"a film",
              b'"', b"\xef\xbb\xbf", b"\xff\xfe", b"\x00", b"\xc3\xa9", b"\xc3", b"\xe2\x80\xa8", b" "]
tsv_bytes = st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(TSV_PIECES), max_size=40).map(b"".join))


@FUZZ
@given(tsv_bytes, st.sampled_from(["sst2", "mrpc", "cola", "stsb"]), st.sampled_from(["error", "skip"]),
       st.sampled_from([None, True]))
def test_any_bytes_are_examples_or_a_data_error(data, task, on_malformed, labeled):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.tsv"
        path.write_bytes(data)
        try:
            examples = read_tsv(TASKS[task], path, on_malformed=on_malformed, labeled=labeled)
        except SparseattnError:
            return
        assert all(e.text.strip() for e in examples)
        if labeled:
            assert all(e.label is not None for e in examples)


@FUZZ
@given(tsv_bytes, st.sampled_from(["data.tsv", "data.csv", "data.jsonl"]), st.sampled_from(["sst2", "stsb"]))
def test_any_bytes_in_any_format_are_examples_or_a_data_error(data, name, task):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data.replace(b"\t", b",") if name.endswith(".csv") else data)
        try:
            examples = read_examples(path, TASKS[task])
        except SparseattnError:
            return
        assert examples and all(e.label is not None for e in examples)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
yaml_values = st.recursive(  # YAML mappings may have keys of any scalar type
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.integers() | st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)
FIELDS = sorted(FinetuneConfig.__dataclass_fields__)
field_values = st.one_of(yaml_values, st.sampled_from(["sst2", "dense", "later-half: neighbour(2)", "dev", "test",
                                                       "reference", "block", "fp32", "prune", "learn", 1, 0, -1,
                                                       0.5, 1e-4, "5e-5", None]))
options = st.dictionaries(st.sampled_from(FIELDS + ["sed"]), field_values, max_size=4)
spec_dicts = st.one_of(
    yaml_values,
    st.dictionaries(st.sampled_from(sorted(SPEC_KEYS)), yaml_values, max_size=4),
    st.fixed_dictionaries({}, optional={
        "name": st.one_of(st.text(max_size=8), yaml_values), "db": st.one_of(st.text(max_size=8), yaml_values),
        "fixed": st.one_of(options, yaml_values),
        "grid": st.one_of(st.dictionaries(st.sampled_from(FIELDS), st.lists(field_values, min_size=1, max_size=2),
                                          max_size=2), yaml_values),
        "runs": st.one_of(st.lists(options, max_size=2), yaml_values)}),
)


@FUZZ
@given(spec_dicts)
def test_any_sweep_spec_is_runs_or_a_spec_error(d):
    try:
        spec = spec_from_dict(d, name="fuzz", where="fuzz.yaml")
    except SparseattnError:
        return
    assert isinstance(spec, SweepSpec) and spec.configs and isinstance(spec.name, str)


plan_infos = st.one_of(
    json_values,
    st.fixed_dictionaries({"format": st.just(FORMAT)}, optional={
        "spec": st.one_of(spec_text, json_values), "length": json_values, "num_layers": json_values,
        "num_heads": json_values, "materialized_layers": st.one_of(st.lists(st.integers(-1, 3), max_size=3),
                                                                   json_values),
        "table_digests": json_values, "sparseattn_version": json_values}),
)


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    return save_plan(Plan.parse("layers=0: neighbour(1)"), tmp_path_factory.mktemp("plan") / "p", num_layers=2,
                     num_heads=2, length=5)


@FUZZ
@given(info=plan_infos)
def test_any_plan_json_is_a_plan_or_a_plan_error(saved_folder, info):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "masks.safetensors").write_bytes((saved_folder / "masks.safetensors").read_bytes())
        (folder / "plan.json").write_text(json.dumps(info))
        try:
            plan = load_plan(folder)
        except SparseattnError:
            return
        assert isinstance(plan, Plan)
