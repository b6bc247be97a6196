"""Learned neighbour degrees: gradients, penalty behaviour, export to a hard plan, target sparsity."""

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import sparseattn as sa
from sparseattn.learned import SoftNeighbourDegrees, attach_degrees, detach_degrees
from sparseattn.layout import TokenLayout
from sparseattn.learned.train import LearnConfig, calibrate_offset, hard_sparsity, learn

V, L = 60, 24


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def make_batches(n_batches=4, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, V, (batch, L), generator=g)
        lengths = torch.randint(L // 2, L + 1, (batch,), generator=g)
        am = (torch.arange(L)[None] < lengths[:, None]).long()
        labels = (ids[:, 1] > V // 2).long()  # learnable from token 1
        out.append({"input_ids": ids * am, "attention_mask": am, "labels": labels})
    return out


def layouts(batches):
    return [sa.TokenLayout(real=b["attention_mask"].bool()) for b in batches]


def test_gradients_reach_degrees_from_task_loss_and_density():
    m = tiny_model()
    deg = attach_degrees(m, init_degree=4.0, temperature=2.0)
    b = make_batches(1)[0]
    m(**b).loss.backward()
    assert deg.degree.grad is not None and deg.degree.grad.abs().sum() > 0
    deg.degree.grad = None
    deg.expected_density(layouts([b])[0]).backward()
    assert (deg.degree.grad > 0).all()  # wider windows always mean more density


def test_low_temperature_equals_exported_plan():
    m = tiny_model().eval()
    b = make_batches(1)[0]
    deg = attach_degrees(m, init_degree=3.0, temperature=1e-3)
    with torch.no_grad():
        deg.degree.copy_(torch.tensor([[0.2, 1.7, 3.0, 5.9], [2.4, 0.0, 7.1, 1.0]]))
        soft = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states[-1]
    lay = layouts([b])[0]
    expected = deg.expected_density(lay).item()
    detach_degrees(m)
    plan = deg.to_plan()
    assert deg.hard_degrees().tolist() == [[0, 2, 3, 6], [2, 0, 7, 1]]  # d rounded to the nearest integer
    sa.sparsify(m, plan)
    with torch.no_grad():
        hard = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states[-1]
    real = b["attention_mask"].bool()
    torch.testing.assert_close(soft[real], hard[real], atol=1e-5, rtol=1e-5)
    # and the rounding matters: a plan with floor(d) instead differs
    sa.sparsify(m, "layers=0-1: neighbour(1)")
    with torch.no_grad():
        other = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states[-1]
    assert (other[real] - hard[real]).abs().max() > 1e-3
    measured = sa.measure_plan(plan.resolve(2, 4), lay).overall
    assert abs((1 - expected) - measured) < 1e-4


def test_exported_plan_saves_loads_and_gives_identical_masks(tmp_path):
    deg = SoftNeighbourDegrees(2, 4, init_degree=2.0, global_tokens=1)
    with torch.no_grad():
        deg.degree.copy_(torch.tensor([[0.0, 1.0, 2.0, 9.0], [3.0, 3.0, 3.0, 3.0]]))
    plan = deg.to_plan()
    sa.save_plan(plan, tmp_path / "learned", num_layers=2, num_heads=4, length=L)
    back = sa.load_plan(tmp_path / "learned")
    assert back == plan
    lay = sa.TokenLayout.from_lengths([L, 9])
    for a, b in zip(plan.resolve(2, 4), back.resolve(2, 4)):
        assert torch.equal(a.mask(lay), b.mask(lay))
    # the plan runs on the reference backend
    m = tiny_model()
    sa.sparsify(m, back)
    m(**make_batches(1)[0]).loss.backward()


def _train(lam=None, target=None, steps=60):
    m = tiny_model()
    deg = attach_degrees(m, init_degree=6.0, global_tokens=1)
    data = make_batches()
    cfg = LearnConfig(lam=lam, target_sparsity=target, steps=steps, lr=1e-3, degree_lr=0.2, t_start=2.0,
                      t_end=0.1, dual_lr=20.0, log_every=10)
    res = learn(m, deg, lambda: data, cfg)
    return m, deg, data, res


def test_no_penalty_keeps_degrees_and_large_penalty_shrinks_them():
    _, deg0, _, _ = _train(lam=0.0)
    _, deg1, _, res1 = _train(lam=50.0)
    assert deg0.degrees().mean() > 4.5  # lambda = 0: no collapse (started at 6)
    assert deg1.degrees().mean() < 2.0  # a large lambda shrinks the windows
    assert res1.history[-1]["expected_density"] < res1.history[0]["expected_density"]


def test_target_sparsity_is_met_after_calibration():
    target = 0.6
    m, deg, data, res = _train(target=target, steps=80)
    lay = layouts(data)
    # dual ascent gets the expected density close; calibration makes the hard plan meet it
    calibrate_offset(deg, lay, target)
    measured = hard_sparsity(deg, lay)
    assert abs(measured - target) < 0.05, measured


def test_target_mode_follows_the_exported_plan_and_keeps_degrees_revivable():
    """The target is a budget on the exported (hard) plan: the multiplier follows the hard density, so it
    relaxes to 0 once the hard plan is sparser than asked (here the tiny model's own loss narrows the
    windows further), and degrees stay >= -1 so a head can widen again when it does."""
    from sparseattn.learned.train import TARGET_MODE_DEGREE_FLOOR

    target = 0.6
    _, deg, data, res = _train(target=target, steps=80)
    assert deg.degree.min().item() >= TARGET_MODE_DEGREE_FLOOR
    last = res.history[-1]
    assert abs((1 - last["hard_density"]) - hard_sparsity(deg, layouts(data))) < 0.05
    assert last["hard_density"] < 1 - target and last["lambda"] == 0.0
    assert max(h["lambda"] for h in res.history) > 0.0


def test_hard_kept_is_the_exported_plans_measured_density():
    m = tiny_model()
    deg = attach_degrees(m, init_degree=6.0, global_tokens=1)
    with torch.no_grad():
        deg.degree.copy_(torch.tensor([[0.2, 1.6, -3.0, 30.0], [2.4, 2.6, 9.0, -0.4]]))
    for lay in layouts(make_batches()) + [sa.TokenLayout.from_lengths([7, 19, 3])]:
        kept, allowed = deg.hard_kept(lay)
        assert abs((1 - kept / allowed).item() - hard_sparsity(deg, [lay])) < 1e-6


def test_unreachable_target_is_refused_with_the_reachable_maximum():
    from sparseattn.learned.train import DegreeTable, check_reachable, max_sparsity

    deg = SoftNeighbourDegrees(2, 4, init_degree=3.0, global_tokens=1)
    lays = [sa.TokenLayout.from_lengths([6, 10, 4])]
    top = max_sparsity(DegreeTable(lays, 1), deg)
    with torch.no_grad():
        deg.degree.fill_(-5.0)
    assert abs(top - hard_sparsity(deg, lays)) < 1e-12  # every degree 0: itself and the global token
    check_reachable(DegreeTable(lays, 1), deg, top)  # the maximum itself is fine
    with pytest.raises(ValueError, match=rf"target_sparsity 0.95 cannot be reached on .*is {top:.4f} sparse"):
        calibrate_offset(deg, lays, 0.95)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="target_sparsity must be in"):
        LearnConfig(target_sparsity=1.5)
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        LearnConfig(lam=-1.0)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        SoftNeighbourDegrees(2, 4, layers=[7])


def test_a_head_below_zero_still_gets_gradients():
    deg = SoftNeighbourDegrees(1, 2, init_degree=0.0, temperature=1.0)
    with torch.no_grad():
        deg.degree.copy_(torch.tensor([[-0.7, 2.0]]))
    lay = sa.TokenLayout.from_lengths([12])
    deg.expected_density(lay).backward()
    assert deg.degree.grad[0, 0] > 0
    assert deg.hard_degrees().tolist() == [[0, 2]]


def test_degree_table_counts_like_measure_plan():
    from sparseattn.learned.train import DegreeTable

    lays = layouts(make_batches(2))
    deg = SoftNeighbourDegrees(2, 4, global_tokens=2)
    with torch.no_grad():
        deg.degree.copy_(torch.tensor([[0.0, 1.0, 5.0, 30.0], [2.0, 3.0, 3.0, 9.0]]))
    table = DegreeTable(lays, global_tokens=2)
    assert abs(table.sparsity(deg.hard_degrees(), [0, 1]) - hard_sparsity(deg, lays)) < 1e-12
    deg.layers = [1]
    assert abs(table.sparsity(deg.hard_degrees(), [1]) - hard_sparsity(deg, lays)) < 1e-12


@pytest.mark.skipif(not __import__("os").environ.get("GLUE_DIR"), reason="GLUE_DIR not set")
@pytest.mark.parametrize("task,ask", [("mrpc", {"lam": 0.05}), ("stsb", {"target_sparsity": 0.5})])
def test_learn_glue_end_to_end(tmp_path, task, ask):
    """sparseattn learn on a GLUE slice with a tiny model: soft phase, export, hard fine-tune, results."""
    import json

    from test_finetune import make_tiny_model

    from sparseattn.learned.glue import LearnGlueConfig, learn_glue

    torch.set_num_threads(1)
    model = make_tiny_model(tmp_path / "tiny")
    cfg = LearnGlueConfig(task=task, model=model, epochs=1, batch_size=16, max_length=64, limit_train=96,
                          limit_eval=48, init_degree=6.0, lr=1e-3, **ask)
    r = learn_glue(cfg, out_dir=tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert (out / "degrees.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["plan_name"] == cfg.label and len(saved["learned"]["degrees"]) == 2
    # the model the run started from, not the hard phase's copy of the soft phase's weights (kept in out_dir)
    assert r["model"] == str(model) and r["learned"]["soft_model"] == str(out / "soft_model")
    plan = sa.load_plan(out / "plan")
    hard = torch.tensor(r["learned"]["degrees"])
    # the reported degrees are the exported plan's windows
    for lp in plan.resolve(2, 4):
        for heads, pat in lp.entries:
            for h in (range(4) if heads is None else heads):
                assert pat.spec() == f"(neighbour({int(hard[lp.layer, h])}) | global_tokens(1))"
    assert 0.0 < r["sparsity"]["overall"] < 1.0 and r["main_metric"] in r["metrics"]
    if "target_sparsity" in ask:
        assert abs(r["learned"]["train_sparsity_of_exported_plan"] - ask["target_sparsity"]) < 0.05


@pytest.mark.skipif(not __import__("os").environ.get("GLUE_DIR"), reason="GLUE_DIR not set")
def test_learn_glue_trains_fp32_master_weights_from_an_fp16_checkpoint(tmp_path):
    """The device bundle stores the model in fp16. Learning degrees must upcast it, as finetune does: trained
    in fp16, every gradient was NaN from the second step (found on the H100, all lambda runs failed)."""
    import json

    from safetensors import safe_open
    from transformers import BertConfig, BertModel

    from sparseattn.learned.glue import LearnGlueConfig, learn_glue
    from sparseattn.models import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).half().save_pretrained(tmp_path / "fp16")
    tok.save_pretrained(tmp_path / "fp16")
    run = LearnGlueConfig(task="mrpc", model=str(tmp_path / "fp16"), epochs=1, batch_size=16, max_length=64,
                          limit_train=64, limit_eval=32, init_degree=6.0, lr=1e-3, lam=0.05)
    r = learn_glue(run, out_dir=tmp_path / "out", progress=False)
    with safe_open(str(tmp_path / "out" / "soft_model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert all(np.isfinite(h["loss"]) for h in r["learned"]["soft_history"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["score"] == r["score"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibration_with_degrees_on_the_gpu():
    """The kept-pairs table lives on the CPU; degrees on the GPU must still calibrate (failed on the H100)."""
    lays = [TokenLayout(real=torch.tensor([[True] * 20 + [False] * 4, [True] * 24]))]
    deg = SoftNeighbourDegrees(2, 4, init_degree=6.0, global_tokens=1).cuda()
    calibrate_offset(deg, lays, 0.7)
    assert abs(hard_sparsity(deg, lays) - 0.7) < 0.05


@pytest.mark.skipif(not __import__("os").environ.get("GLUE_DIR"), reason="GLUE_DIR not set")
def test_learn_command_takes_lambda_as_the_issue_spells_it(tmp_path, capsys):
    """`sparseattn learn --task ... --lambda ...` (and --lam), printing the degrees and writing the plan."""
    from test_finetune import make_tiny_model

    from sparseattn.cli import main

    torch.set_num_threads(1)
    model = make_tiny_model(tmp_path / "tiny")
    rc = main(["learn", "--task", "rte", "--lambda", "0.05", "--model", model, "--epochs", "1", "--batch-size", "16",
               "--max-length", "64", "--limit-train", "32", "--limit-eval", "16", "--init-degree", "4",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "learned(lam=0.05)" in out and "layer 1:" in out
    assert (tmp_path / "out" / "plan" / "plan.json").exists()
    with pytest.raises(SystemExit):  # one of --lambda and --target-sparsity, not both
        main(["learn", "--task", "rte", "--lambda", "0.1", "--target-sparsity", "0.5", "--out", str(tmp_path / "x")])
