"""Sweeps: spec expansion, atomic claims and leases, failed runs, and resuming after SIGKILL mid-run."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sparseattn.errors import StorageError
from sparseattn.experiments.db import Heartbeat, ResultsDB, WorkerId, run_key
from sparseattn.experiments.sweep import SweepSpecError, load_spec, run_worker, spec_from_dict

from test_finetune import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
GLUE_DIR = os.environ.get("GLUE_DIR")


def test_spec_expands_grid_and_runs(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({
        "fixed": {"epochs": 1, "lr": "5e-5"},  # YAML 1.1 reads 5e-5 as text; it still means a number
        "grid": {"task": ["sst2", "MRPC"], "plan": ["dense", "later-half:neighbour(2)"], "seed": [0, 1]},
        "runs": [{"task": "rte", "plan": "dense", "seed": 0}, {"task": "sst2", "plan": "dense", "seed": 0}],
    }))
    spec = load_spec(p)
    assert spec.name == "s" and spec.db == tmp_path / "s.sqlite"
    assert len(spec.configs) == 2 * 2 * 2 + 1  # the repeated sst2/dense/0 run is one run
    c = spec.configs[0]
    assert (c.task, c.plan, c.seed, c.lr, c.epochs) == ("sst2", "dense", 0, 5e-5, 1)
    assert {c.plan for c in spec.configs} == {"dense", "later-half: neighbour(2)"}
    assert len({run_key(c.to_dict()) for c in spec.configs}) == len(spec.configs)


def test_seeds_repeat_every_run_seed_by_seed_and_keep_the_old_keys():
    one = spec_from_dict({"fixed": {"epochs": 1, "seed": 0}, "grid": {"task": ["sst2", "mrpc"]},
                          "runs": [{"task": "rte"}]}, name="t")
    three = spec_from_dict({"fixed": {"epochs": 1, "seed": 0}, "grid": {"task": ["sst2", "mrpc"]},
                            "runs": [{"task": "rte"}, {"task": "cola", "seed": 7}], "seeds": [0, 1, 2]}, name="t")
    assert [(c.task, c.seed) for c in three.configs] == [
        ("cola", 7), ("sst2", 0), ("mrpc", 0), ("rte", 0), ("sst2", 1), ("mrpc", 1), ("rte", 1),
        ("sst2", 2), ("mrpc", 2), ("rte", 2)]
    # the one-seed study's runs are the same runs (same keys): a database of it resumes with only the new seeds
    old = {run_key(c.to_dict()) for c in one.configs}
    assert old == {run_key(c.to_dict()) for c in three.configs if c.seed == 0}


@pytest.mark.parametrize("spec,msg", [
    ({"grid": {"seed": 0}}, "grid.seed must be a non-empty list"),
    ({"grid": {"task": ["sst2"]}, "seeds": [0, "1"]}, r"'seeds' must be a non-empty list of integers, got \[0, '1'\]"),
    ({"grid": {"task": ["sst2"]}, "seeds": 3}, "'seeds' must be a non-empty list of integers, got 3"),
    ({"grid": {"sed": [0]}}, "unknown fine-tune option.*'sed'"),
    ({"grids": {}}, "unknown key"),
    ({"grid": {"plan": ["later-half: neighbor(2)"]}}, "neighbor"),
    ({"fixed": {"epochs": 1}}, "no runs"),
])
def test_bad_specs_say_what_is_wrong(spec, msg):
    with pytest.raises((SweepSpecError, ValueError), match=msg):
        spec_from_dict(spec, name="x", where="x.yaml")


def _configs(n):
    return [spec_from_dict({"grid": {"seed": list(range(n))}}, name="t").configs[i].to_dict() for i in range(n)]


def test_claims_are_exclusive_and_dead_workers_runs_are_reclaimed(tmp_path):
    db_a, db_b = ResultsDB(tmp_path / "r.sqlite"), ResultsDB(tmp_path / "r.sqlite")
    assert db_a.add_runs("t", _configs(3)) == (3, 0)
    assert db_b.add_runs("t", _configs(3)) == (0, 3)  # idempotent
    a, b = WorkerId("a"), WorkerId("b")
    ra, rb = db_a.claim(a, "t"), db_b.claim(b, "t")
    assert ra["key"] != rb["key"] and ra["seed"] == 0 and rb["seed"] == 1
    rc = db_a.claim(a, "t")
    assert db_b.claim(b, "t") is None  # all three taken, leases alive
    # worker a's lease on rc runs out (a hung or vanished on another host): b takes it over
    db_a.conn.execute("UPDATE runs SET lease_until=0 WHERE key=?", (rc["key"],))
    again = db_b.claim(b, "t")
    assert again["key"] == rc["key"] and again["attempts"] == 2
    assert not db_a.heartbeat(rc["key"], a, 60)  # a learns it lost the run
    # a worker process on this host that is gone: its run is taken at once, lease or not
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    db_a.conn.execute("UPDATE runs SET pid=?, worker='ghost' WHERE key=?", (int(gone.stdout), ra["key"]))
    assert db_b.claim(b, "t")["key"] == ra["key"]
    # first result wins; a late duplicate is not written
    assert db_b.finish(rc["key"], b, {"score": 0.5, "metrics": {"accuracy": 0.5}, "sparsity": {}})
    assert not db_a.finish(rc["key"], a, {"score": 0.9, "metrics": {"accuracy": 0.9}, "sparsity": {}})
    assert db_a.runs("t", "done")[0]["score"] == 0.5
    db_a.close()
    db_b.close()


def test_a_run_cut_off_is_taken_up_in_its_place_in_the_sweeps_order(tmp_path):
    """A machine that went away left its runs 'running' with a lease that lapses: the next worker takes such a run
    before the pending runs after it in the spec's order (so a spec that queues seeds 1 and 2 before 0 finishes
    them first), and a pending run before it first."""
    db = ResultsDB(tmp_path / "r.sqlite")
    db.add_runs("t", _configs(4))
    gone, w = WorkerId("gone"), WorkerId("w")
    first, second = db.claim(gone, "t"), db.claim(gone, "t")
    db.conn.execute("UPDATE runs SET lease_until=0, host='elsewhere' WHERE key=?", (second["key"],))
    db.conn.execute("UPDATE runs SET status='pending' WHERE key=?", (first["key"],))
    assert [db.claim(w, "t")["seed"] for _ in range(3)] == [0, 1, 2]
    db.close()


def test_a_database_replaced_under_a_running_sweep_is_not_written(tmp_path):
    """A copy of an older state put in the database's place (a synced or carried file) while workers run: a worker
    that opened the first file writes nothing more, neither claims (which would run finished runs again) nor
    results, and a result it finishes meanwhile waits in ``<db>.kept`` for the database now at that path."""
    path = tmp_path / "r.sqlite"
    db = ResultsDB(path)
    db.add_runs("t", _configs(3))
    w = WorkerId("w")
    old = tmp_path / "old.sqlite"
    db.conn.execute("VACUUM INTO ?", (str(old),))  # the state before any claim: three runs pending
    first = db.claim(w, "t")
    assert db.finish(first["key"], w, {"score": 0.5, "metrics": {"accuracy": 0.5}, "sparsity": {}})
    second = db.claim(w, "t")
    # what a file sync or the device tool's carry does: a new file at the same path. (The old file's write-ahead log
    # is emptied first: SQLite applies a log left beside a replaced file to the new one, which no check can stop.)
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.replace(old, path)
    with pytest.raises(StorageError, match=r"r\.sqlite: the results database this process opened is another file "):
        db.claim(w, "t")
    with pytest.raises(StorageError, match=rf"cannot record the finished run {second['key'][:10]}.*kept in "):
        db.finish(second["key"], w, {"score": 0.7, "metrics": {"accuracy": 0.7}, "sparsity": {}})
    beat = Heartbeat(db, second["key"], w, lease=0.1)
    with beat:  # renewing leases in the other file would hold its runs away from the sweep that works on it
        beat._thread.join(timeout=10)
        assert not beat._thread.is_alive()
    db.close()
    # a sweep started again works on the file now there, and takes the kept result in before its first claim
    again = ResultsDB(path)
    got = again.claim(w, "t")
    assert {r["key"]: r["score"] for r in again.runs("t", "done")} == {second["key"]: 0.7}
    assert got["key"] == first["key"]  # the copy had lost the first result: that run is the one to do again
    assert not list(again.kept_dir.glob("*.json"))
    # a result kept for a run this database does not hold (a database of another sweep put at the path) stays
    stray = again.kept_dir / f"{'0' * 20}.json"
    stray.write_text('{"score": 0.1, "metrics": {}, "sparsity": {}}')
    assert again.take_kept() == 0 and stray.exists()
    path.unlink()
    with pytest.raises(StorageError, match="opened is gone"):
        again.claim(w, "t")
    again.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


def _spec(tmp_path, model, plans):
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump({
        "name": "t", "fixed": {"model": model, "task": "sst2", "epochs": 2, "limit_train": 48, "limit_eval": 16,
                               "batch_size": 8, "max_length": 64},
        "grid": {"plan": plans, "seed": [0, 1]}}))
    return p


def test_what_a_run_would_find_out_late_fails_at_sweep_time(tmp_path, tiny_model, capsys):
    from sparseattn.cli import main

    spec = _spec(tmp_path, tiny_model, ["dense", "layers=5: neighbour(1)"])  # the tiny model has 2 layers
    assert main(["sweep", str(spec), "--no-progress"]) == 1
    assert "run 2 (sst2 | layers=5: neighbour(1) | seed 0): in rule 'layers=5: neighbour(1)': layer 5 is out of " \
           "range for a model with 2 layers" in capsys.readouterr().err
    assert not (tmp_path / "t.sqlite").exists()  # nothing queued


@pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set")
def test_failed_runs_are_recorded_and_retried_on_request(tmp_path, tiny_model, monkeypatch):
    from sparseattn.cli import main
    from sparseattn.training import finetune

    def broken(*a, **k):
        raise RuntimeError("the model broke")

    monkeypatch.setattr(finetune, "load_classifier", broken)
    spec = _spec(tmp_path, tiny_model, ["layers=1: neighbour(1)"])
    assert main(["sweep", str(spec), "--no-progress"]) == 0
    db = ResultsDB(tmp_path / "t.sqlite")
    rows = db.runs("t")
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "RuntimeError: the model broke" in rows[0]["error"] and rows[0]["versions"]["torch"]
    main(["sweep", str(spec), "--no-progress"])  # not retried unless asked
    assert [r["attempts"] for r in db.runs("t")] == [1, 1]
    main(["sweep", str(spec), "--no-progress", "--retry-failed"])
    assert [(r["status"], r["attempts"]) for r in db.runs("t")] == [("failed", 2), ("failed", 2)]
    db.close()


@pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set")
def test_sigkill_mid_run_then_rerun_finishes_each_run_exactly_once(tmp_path, tiny_model):
    from sparseattn.cli import main

    spec = _spec(tmp_path, tiny_model, ["dense", "later-half: neighbour(1)"])
    db_path = tmp_path / "t.sqlite"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "sparseattn.cli", "sweep", str(spec), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:  # wait until one run is finished and another one is running
            assert proc.poll() is None, "the sweep ended before it could be killed mid-run"
            assert time.time() < deadline, "no run started within 180 s"
            if db_path.exists():
                try:
                    with sqlite3.connect(db_path, timeout=5) as c:
                        st = dict(c.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
                except sqlite3.OperationalError:
                    st = {}
                if st.get("done", 0) >= 1 and st.get("running", 0) == 1:
                    break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    db = ResultsDB(db_path)
    before = {r["key"]: r for r in db.runs("t")}
    killed = [k for k, r in before.items() if r["status"] == "running"]
    finished = {k: r["finished"] for k, r in before.items() if r["status"] == "done"}
    assert len(killed) == 1 and finished

    assert main(["sweep", str(spec), "--no-progress"]) == 0  # run it again
    after = {r["key"]: r for r in db.runs("t")}
    assert len(after) == 4 and db.conn.execute("SELECT COUNT(*) FROM sweep_runs").fetchone()[0] == 4
    assert all(r["status"] == "done" and r["score"] is not None for r in after.values())
    for k, t in finished.items():  # finished runs were not redone
        assert after[k]["attempts"] == 1 and after[k]["finished"] == t
    assert after[killed[0]]["attempts"] == 2  # the killed run ran again, once
    assert sum(r["attempts"] for r in after.values()) == 5
    db.close()


def test_a_saved_plan_is_identified_by_its_contents(tmp_path):
    """A rewritten plan folder is a different run, and a queued run whose folder changed fails loudly."""
    import sparseattn as sa
    from sparseattn.training.finetune import FinetuneConfig

    folder = tmp_path / "plan"
    sa.save_plan(sa.Plan.parse("later-half: neighbour(2)"), folder)
    first = FinetuneConfig(task="sst2", plan=str(folder))
    assert first.plan_digest is not None
    sa.save_plan(sa.Plan.parse("later-half: neighbour(3)"), folder)  # same path, other plan
    second = FinetuneConfig(task="sst2", plan=str(folder))
    assert run_key(first.to_dict()) != run_key(second.to_dict())
    with pytest.raises(ValueError, match="changed since this run was configured"):
        FinetuneConfig.from_dict(first.to_dict())


@pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set")
def test_learn_is_a_sweep_axis_and_reports_as_its_own_family(tmp_path):
    from sparseattn.reports.report import summarize

    model = make_tiny_model(tmp_path / "tiny")
    fixed = {"task": "mrpc", "model": model, "epochs": 1, "batch_size": 16, "max_length": 64, "limit_train": 64,
             "limit_eval": 32, "lr": 1e-3}
    spec = spec_from_dict({"fixed": fixed, "runs": [
        {"plan": "dense"},
        {"method": "learn", "lam": 0.05, "init_degree": 4.0},
        {"method": "learn", "target_sparsity": 0.5, "init_degree": 4.0},
    ]}, name="lrn", base_dir=tmp_path)
    assert [c.display_plan for c in spec.configs] == ["dense", "learned(lam=0.05)", "learned(target=0.5)"]
    from sparseattn.experiments.sweep import enqueue

    enqueue(spec).close()
    assert run_worker(spec.db, "lrn", progress=False, echo=lambda *_: None) == {"done": 3, "failed": 0}
    db = ResultsDB(spec.db)
    rows = db.runs("lrn")
    db.close()
    groups = summarize(rows)["mrpc"]
    learned = [g for g in groups if g.family == "learned"]
    assert len(learned) == 2 and all(g.baseline is not None and g.baseline.is_dense for g in learned)
    assert all(0 < g.mean_sparsity < 1 for g in learned)


@pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set")
def test_attention_pruning_is_a_sweep_method_sharing_one_dense_checkpoint(tmp_path):
    """prune runs: p = 0 is the dense fine-tune, whose checkpoint, averages and masks the other runs share
    (made once, under <db>.work); AP and random masks prune what they say on the training data, and the
    report links them to the dense baseline as their own families."""
    from sparseattn.experiments.sweep import enqueue, work_dir_of
    from sparseattn.reports.report import summarize

    model = make_tiny_model(tmp_path / "tiny")
    fixed = {"method": "prune", "task": "rte", "model": model, "epochs": 1, "batch_size": 16, "max_length": 64,
             "limit_train": 48, "limit_eval": 32, "lr": 1e-3}
    spec = spec_from_dict({"fixed": fixed, "grid": [{"prune": [0], "mask": ["ap", "random"]},  # one run
                                                    {"prune": [50], "mask": ["ap", "random"]}]},
                          name="ap", base_dir=tmp_path)
    assert [c.display_plan for c in spec.configs] == ["dense", "attention_pruning(50%, layer)",
                                                      "random_pruning(50%, layer)"]
    enqueue(spec).close()
    assert run_worker(spec.db, "ap", progress=False, echo=lambda *_: None) == {"done": 3, "failed": 0}
    work = work_dir_of(spec.db)
    (root,) = [p for p in work.iterdir() if p.is_dir()]
    assert (root / "dense" / "model" / "config.json").exists() and not list(root.rglob("*.partial"))
    assert len(list(root.glob("attention-*.safetensors"))) == 1 and len(list(root.glob("plans-*/*/plan.json"))) == 2
    db = ResultsDB(spec.db)
    rows = {r["plan"]: r for r in db.runs("ap")}
    db.close()
    for name in ("attention_pruning(50%, layer)", "random_pruning(50%, layer)"):
        pr = rows[name]["result"]["pruning"]
        assert pr["train_sparsity"] == pytest.approx(0.5, abs=0.02)  # the data budget: 50% of the pairs seen
        assert 0.3 < rows[name]["sparsity"] < 0.7  # measured on dev by the fine-tune
    groups = {g.family: g for g in summarize(list(rows.values()))["rte"]}
    assert set(groups) == {"dense", "attention_pruning", "random_pruning"}
    assert groups["attention_pruning"].baseline is groups["dense"]
    with pytest.raises(SweepSpecError, match="prune is a percentage"):
        spec_from_dict({"fixed": fixed, "runs": [{"prune": 100}]}, name="bad", base_dir=tmp_path)
    with pytest.raises(SweepSpecError, match="mask must be one of ap, random"):
        spec_from_dict({"fixed": fixed, "runs": [{"prune": 50, "mask": "bigbird"}]}, name="bad", base_dir=tmp_path)
    with pytest.raises(SweepSpecError, match=r"grid\[1\].prune must be a non-empty list"):
        spec_from_dict({"fixed": fixed, "grid": [{"prune": [0]}, {"prune": 5}]}, name="bad", base_dir=tmp_path)


def test_progress_lines_and_ctrl_c_gives_the_run_back(tmp_path, monkeypatch):
    """A line per run started and finished, with the sweep's count and time left; Ctrl-C during a run leaves
    it pending (not running), the finished one done."""
    import sparseattn.experiments.sweep as sweep

    calls = []

    def fake_run(cfg, **_):
        calls.append(cfg.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"main_metric": "accuracy", "score": 0.8125, "metrics": {"accuracy": 0.8125},
                "sparsity": {"overall": 0.25, "applied": 0.5, "per_layer": [0.25]},
                "predicted_classes": {"negative": 0, "positive": 10},
                "majority_reference": {"class": "positive", "metrics": {"accuracy": 0.5}}}

    monkeypatch.setattr(sweep, "run_config", fake_run)
    db = ResultsDB(tmp_path / "r.sqlite")
    db.add_runs("t", _configs(3))
    db.close()
    lines = []
    with pytest.raises(KeyboardInterrupt):
        run_worker(tmp_path / "r.sqlite", "t", progress=False, echo=lines.append, label="w0")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the worker ignores a second Ctrl-C; undo that
    assert lines[0] == "[w0] started sst2 | dense | seed 0  [0/3 done, 1 running]"
    assert lines[1].startswith("[w0] finished sst2 | dense | seed 0: accuracy 81.25, sparsity 25.0%, ")
    assert "[1/3 done, about " in lines[1] and " left]" in lines[1]
    assert "WARNING: predicts 'positive' for every one of the 10 evaluation examples" in lines[1]
    assert lines[2].startswith("[w0] started sst2 | dense | seed 1")
    assert lines[-1] == "[w0] interrupted; its run is pending again"
    db = ResultsDB(tmp_path / "r.sqlite")
    assert db.counts("t") == {"pending": 2, "running": 0, "done": 1, "failed": 0}
    db.close()
