"""Saving a plan with its masks (plan.json + masks.safetensors) and loading it back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparseattn as sa
from sparseattn.plans import Plan, load_plan, save_plan
from sparseattn.plans.io import FORMAT, plan_metadata

from conftest import make_layout


def _static_plan():
    g = torch.Generator().manual_seed(0)
    per_head = torch.rand(4, 12, 12, generator=g) < 0.3
    shared = torch.rand(12, 12, generator=g) < 0.5
    return Plan.parse("layers=0: static_mask('ap_l0'); heads=0-1@layers=2: static_mask('ap_l2') | neighbour(1); "
                      "layers=3: random(2, seed=3)", tables={"ap_l0": per_head, "ap_l2": shared}), per_head, shared


def test_round_trip_positional_plan(tmp_path):
    plan = Plan.parse("layers=0-1: neighbour(2) | global_tokens(1); heads=0-2@later-half: bigbird(1, 1, 2, seed=5)")
    folder = save_plan(plan, tmp_path / "p", num_layers=4, num_heads=6, length=11, metadata={"task": "sst2"})
    loaded = load_plan(folder)
    assert loaded == plan and loaded.spec() == plan.spec()
    assert load_plan(folder / "plan.json") == plan
    info = plan_metadata(folder)
    assert info["format"] == FORMAT and info["spec"] == plan.spec() and info["metadata"] == {"task": "sst2"}
    assert info["materialized_layers"] == [0, 1, 2, 3]
    # the stored per-layer masks are the plan's masks for one example of 11 tokens, per head
    stored = load_file(str(folder / "masks.safetensors"))
    layout = make_layout([11])
    for lp in loaded.resolve(4, 6):
        assert torch.equal(stored[f"layer/{lp.layer}"], lp.mask(layout)[0].expand(6, -1, -1))


def test_round_trip_static_tables_is_exact(tmp_path):
    plan, per_head, shared = _static_plan()
    folder = save_plan(plan, tmp_path / "ap", num_layers=4, num_heads=4, length=12)
    loaded = load_plan(folder)
    assert loaded == plan
    tables = loaded.tensors()
    assert tables.keys() == {"ap_l0", "ap_l2"}
    assert tables["ap_l0"].dtype == torch.bool and torch.equal(tables["ap_l0"], per_head)
    assert torch.equal(tables["ap_l2"], shared[None])
    layout = make_layout([12, 7, 3], "left")
    for a, b in zip(plan.resolve(4, 4), loaded.resolve(4, 4)):
        assert torch.equal(a.mask(layout), b.mask(layout))


def test_a_plan_without_a_model_shape_and_input_dependent_rules(tmp_path):
    plan = Plan.parse("layers=0: syntax(2); layers=1: lexical() | neighbour(1)")
    folder = save_plan(plan, tmp_path / "s")
    assert load_plan(folder) == plan
    save_plan(plan, tmp_path / "s2", num_layers=3, num_heads=2, length=8)
    assert plan_metadata(tmp_path / "s2")["materialized_layers"] == [2]  # input-dependent layers are skipped
    assert load_plan(tmp_path / "s2") == plan


def test_sparsify_accepts_a_saved_plan(tmp_path):
    from conftest import tiny_bert

    plan, _, _ = _static_plan()
    folder = save_plan(plan, tmp_path / "ap", num_layers=4, num_heads=4, length=12)
    plan2 = Plan.parse("layers=0: static_mask('ap_l0')", tables=plan.tensors())
    model = tiny_bert(num_hidden_layers=4)
    sa.sparsify(model, str(folder))
    assert sa.plan_of(model) == plan
    with torch.no_grad():
        model(input_ids=torch.randint(5, 100, (2, 12)))
        with pytest.raises(ValueError, match="at most 12 tokens"):
            model(input_ids=torch.randint(5, 100, (2, 13)))
    sa.sparsify(model, plan2)
    assert sa.plan_of(model) == plan2


def test_tampered_masks_are_caught_on_load(tmp_path):
    plan = Plan.parse("later-half: neighbour(2)")
    folder = save_plan(plan, tmp_path / "p", num_layers=4, num_heads=2, length=9)
    f = folder / "masks.safetensors"
    tensors = load_file(str(f))
    tensors["layer/3"][1, 0, 8] = True
    save_file(tensors, str(f), metadata={"format": FORMAT})
    with pytest.raises(ValueError, match=r"layer 3's mask differs from the one saved"):
        load_plan(folder)
    assert load_plan(folder, verify=False) == plan


def test_a_changed_spec_is_caught_on_load(tmp_path):
    folder = save_plan(Plan.parse("later-half: neighbour(2)"), tmp_path / "p", num_layers=4, num_heads=2, length=9)
    info = json.loads((folder / "plan.json").read_text())
    info["spec"] = "later-half: neighbour(3)"
    (folder / "plan.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="layer 2's mask differs"):
        load_plan(folder)


def test_a_tampered_static_table_is_caught_on_load(tmp_path):
    plan, _, _ = _static_plan()
    folder = save_plan(plan, tmp_path / "ap", num_layers=4, num_heads=4, length=12)
    f = folder / "masks.safetensors"
    tensors = load_file(str(f))
    tensors["table/ap_l0"][2, 5, 1] = ~tensors["table/ap_l0"][2, 5, 1]
    save_file(tensors, str(f), metadata={"format": FORMAT})
    with pytest.raises(sa.PlanFileError, match="the table 'ap_l0' differs from the one saved"):
        load_plan(folder)


def test_a_table_changed_beyond_the_saved_length_is_caught(tmp_path):
    """The materialized masks cover the reference length only; the table's digest covers all of it."""
    plan, _, _ = _static_plan()
    folder = save_plan(plan, tmp_path / "ap", num_layers=4, num_heads=4, length=8)
    f = folder / "masks.safetensors"
    tensors = load_file(str(f))
    tensors["table/ap_l2"][0, 11, 10] = ~tensors["table/ap_l2"][0, 11, 10]  # rows and columns 8-11: past length 8
    save_file(tensors, str(f), metadata={"format": FORMAT})
    with pytest.raises(sa.PlanFileError, match=r"masks.safetensors: the table 'ap_l2' differs"):
        load_plan(folder)


def test_broken_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="plan.json does not exist"):
        load_plan(tmp_path / "nothing")
    folder = save_plan(Plan.parse("all: neighbour(1)"), tmp_path / "p")
    (folder / "plan.json").write_text('{"format": "sparseattn-plan/1",\n "spec": }\n')
    with pytest.raises(ValueError, match=r"plan.json:2: not valid JSON"):
        load_plan(folder)
    (folder / "plan.json").write_text(json.dumps({"format": "something-else/9", "spec": "dense"}))
    with pytest.raises(ValueError, match=r"format 'something-else/9', expected 'sparseattn-plan/1'"):
        load_plan(folder)


@pytest.mark.parametrize("info,message", [
    ([1, 2], "plan.json: expected a JSON object with 'format' and 'spec', got a list"),
    ({"format": FORMAT}, "plan.json: 'spec' must be the plan's spec as a string, got '\\(none\\)'"),
    ({"format": FORMAT, "spec": 3}, "'spec' must be the plan's spec as a string, got 3"),
    ({"format": FORMAT, "spec": "all: neighbour(1)", "materialized_layers": [0], "num_layers": 2, "num_heads": 2,
      "length": "9"}, "plan.json: 'length' must be a positive integer \\(the reference length\\), got '9'"),
    ({"format": FORMAT, "spec": "all: neighbour(1)", "materialized_layers": [0], "num_layers": 2, "num_heads": 2,
      "length": 9}, "masks.safetensors: the saved mask 'layer/0' is missing"),
    ({"format": FORMAT, "spec": "all: neighbor(1)"}, "plan.json: 'spec': unknown pattern 'neighbor'"),
    ({"format": FORMAT, "spec": "dense", "table_digests": {"ap": "x"}}, "the table 'ap' that plan.json lists"),
])
def test_malformed_plan_json(tmp_path, info, message):
    folder = save_plan(Plan.parse("all: neighbour(1)"), tmp_path / "p")
    (folder / "plan.json").write_text(json.dumps(info))
    with pytest.raises(sa.PlanError, match=message):
        load_plan(folder)


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_truncated_or_garbage_masks_file(tmp_path, content):
    plan, _, _ = _static_plan()
    folder = save_plan(plan, tmp_path / "ap", num_layers=4, num_heads=4, length=12)
    f = folder / "masks.safetensors"
    f.write_bytes(f.read_bytes()[:100] if content is None else content)
    with pytest.raises(sa.PlanFileError, match=r"ap/masks.safetensors: cannot be read as safetensors"):
        load_plan(folder)


def test_a_missing_plan_path_says_so(tmp_path):
    from sparseattn.plans import as_plan

    with pytest.raises(sa.NotFoundError, match="no saved plan at '.*/gone': the path does not exist"):
        as_plan(str(tmp_path / "gone"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(sa.PlanFileError, match="empty: this folder has no plan.json"):
        as_plan(str(tmp_path / "empty"))
    with pytest.raises(sa.PlanSpecError, match="unknown pattern"):  # not a path: still the spec's error
        as_plan("all: neighbor(1)")


def test_a_static_table_missing_from_the_file(tmp_path):
    plan, _, _ = _static_plan()
    folder = save_plan(plan, tmp_path / "ap")
    tensors = load_file(str(folder / "masks.safetensors"))
    del tensors["table/ap_l2"]
    save_file(tensors, str(folder / "masks.safetensors"))
    with pytest.raises(sa.PlanFileError, match=r"masks.safetensors: the table 'ap_l2' that plan.json lists is missing"):
        load_plan(folder)
    with pytest.raises(sa.PlanSpecError, match=r"static_mask\('ap_l2'\) names a table that is not loaded"):
        load_plan(folder, verify=False)
