"""Sweeps on Ray (``sparseattn sweep SPEC --ray``), on a local Ray instance: the same database as a plain sweep,
a worker killed mid-run retried by Ray (none lost, none redone), a driver killed and started again resumes,
Ctrl-C gives runs back, fractional GPUs pack runs (Ray's logical GPUs; no GPU needed)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import ray_methods  # noqa: F401 (registers the sleep-test method here; the Ray workers import it by name)
from ray_methods import executions
from sparseattn.errors import ConfigError, DependencyError
from sparseattn.experiments.db import ResultsDB
from sparseattn.experiments.ray_sweep import run_ray_sweep
from sparseattn.experiments.sweep import enqueue, load_spec, run_worker

from test_finetune import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).parents[1]
GLUE_DIR = os.environ.get("GLUE_DIR")
PATH = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray for the module: 4 logical CPUs and 2 logical GPUs (Ray only counts them; the runs use the
    CPU). Its workers inherit PYTHONPATH, so they import this checkout and the test method."""
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'sparseattn[ray]' (make installs it)")

    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = PATH + (os.pathsep + before if before else "")
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def _sleep_spec(tmp_path, seeds, *, sleep=0.5, die_once=(), name="s", meet=0):
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({
        "name": name, "fixed": {"method": "sleep-test", "sleep": sleep, "marks": str(marks), "meet": meet},
        "runs": [{"seed": s, "die_once": s in die_once} for s in seeds]}))
    return p, marks


def _statuses(db_path):
    try:
        with sqlite3.connect(db_path, timeout=5) as c:
            return dict(c.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
    except sqlite3.OperationalError:
        return {}


@pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set")
def test_a_ray_sweep_writes_the_database_a_plain_sweep_writes(tmp_path, ray_instance):
    model = make_tiny_model(tmp_path / "tiny")
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({
        "name": "t", "fixed": {"model": model, "task": "sst2", "epochs": 2, "limit_train": 48, "limit_eval": 16,
                               "batch_size": 8, "max_length": 64, "lr": 1e-3},
        "grid": {"plan": ["dense", "later-half: neighbour(1)"], "seed": [0, 1]}}))
    spec = load_spec(p)
    enqueue(spec, tmp_path / "plain.sqlite").close()
    run_worker(tmp_path / "plain.sqlite", "t", progress=False)
    enqueue(spec, tmp_path / "ray.sqlite").close()
    lines = []
    assert run_ray_sweep(tmp_path / "ray.sqlite", "t", echo=lines.append) == {"done": 4, "failed": 0}
    plain, on_ray = (ResultsDB(tmp_path / f"{n}.sqlite", readonly=True) for n in ("plain", "ray"))
    a, b = plain.runs("t"), on_ray.runs("t")
    assert [r["key"] for r in a] == [r["key"] for r in b]
    assert [(r["status"], r["attempts"], r["task"], r["plan"], r["seed"]) for r in a] == \
           [(r["status"], r["attempts"], r["task"], r["plan"], r["seed"]) for r in b]
    for x, y in zip(a, b):
        assert y["score"] == pytest.approx(x["score"], abs=1e-6)
        assert y["metrics"] == pytest.approx(x["metrics"], abs=1e-6)
        assert y["sparsity"] == pytest.approx(x["sparsity"], abs=1e-9)
        assert y["result"]["train_loss_curve"]["values"] == pytest.approx(x["result"]["train_loss_curve"]["values"],
                                                                          rel=1e-5)  # the same training, step by step
        assert y["result"]["predicted_classes"] == x["result"]["predicted_classes"]
        assert y["result"]["ray"]["gpu_ids"] and y["result"]["ray"]["resources"] == {"GPU": 1.0, "CPU": 1.0}
    assert on_ray.sweeps() == plain.sweeps() == ["t"]
    assert sum(line.startswith("started ") for line in lines) == 4
    assert sum(line.startswith("finished sst2 | ") for line in lines) == 4 and "4/4 done" in lines[-1]
    plain.close()
    on_ray.close()


def test_a_worker_killed_mid_run_is_retried_and_nothing_is_lost_or_redone(tmp_path, ray_instance):
    spec_path, marks = _sleep_spec(tmp_path, range(4), die_once={2})
    enqueue(load_spec(spec_path), tmp_path / "s.sqlite").close()
    assert run_ray_sweep(tmp_path / "s.sqlite", "s", echo=lambda _: None) == {"done": 4, "failed": 0}
    db = ResultsDB(tmp_path / "s.sqlite", readonly=True)
    rows = db.runs("s")
    assert [(r["seed"], r["status"], r["attempts"], r["score"]) for r in rows] == \
           [(s, "done", 1, s / 10) for s in range(4)]
    runs = {s: executions(marks, s) for s in range(4)}
    assert [len(runs[s]) for s in range(4)] == [1, 1, 2, 1]  # the killed run ran again, once; no other did
    assert runs[2][0][2] == 0 and runs[2][1][2] > 0  # its first execution never ended: the process died
    assert rows[2]["result"]["ray"]["pid"] == runs[2][1][0] != runs[2][0][0]  # a new worker process ran it
    db.close()


def test_a_worker_that_dies_past_its_retries_is_a_failed_run(tmp_path, ray_instance):
    spec_path, marks = _sleep_spec(tmp_path, [0, 1], die_once={1}, sleep=0.1)
    enqueue(load_spec(spec_path), tmp_path / "s.sqlite").close()
    lines = []
    assert run_ray_sweep(tmp_path / "s.sqlite", "s", max_retries=0, echo=lines.append) == {"done": 1, "failed": 1}
    db = ResultsDB(tmp_path / "s.sqlite", readonly=True)
    failed = db.runs("s", status="failed")
    assert [r["seed"] for r in failed] == [1] and "Ray could not run it (1 attempt(s))" in failed[0]["error"]
    assert any(line.startswith("FAILED sst2 | dense | seed 1: Ray could not run it") for line in lines)
    db.close()


def _driver(spec_path, *args):
    """A sweep driver in its own process, joining the module's Ray instance."""
    import ray

    code = "import sys, ray_methods; from sparseattn.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=PATH, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, "sweep", str(spec_path), "--ray",
                             ray.get_runtime_context().gcs_address, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, db_path, ready, what, timeout=120):
    deadline = time.time() + timeout
    while not ready(_statuses(db_path)):
        assert proc.poll() is None, f"the driver ended before {what}: {proc.stdout.read()}"
        assert time.time() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.05)


def test_a_killed_driver_resumes_without_redoing_finished_runs(tmp_path, ray_instance):
    spec_path, marks = _sleep_spec(tmp_path, range(5), sleep=1.5)
    db_path = tmp_path / "s.sqlite"
    proc = _driver(spec_path)
    try:
        _wait_for(proc, db_path, lambda st: st.get("done", 0) >= 2 and st.get("running", 0) >= 1,
                  "two runs were done and one was running")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    db = ResultsDB(db_path)
    before = {r["seed"]: r for r in db.runs("s")}
    killed = [s for s, r in before.items() if r["status"] == "running"]
    finished = {s: r["finished"] for s, r in before.items() if r["status"] == "done"}
    assert killed and len(finished) >= 2

    assert run_ray_sweep(db_path, "s", echo=lambda _: None)["failed"] == 0  # the same sweep, started again
    after = {r["seed"]: r for r in db.runs("s")}
    assert all(r["status"] == "done" and r["score"] == s / 10 for s, r in after.items()) and len(after) == 5
    for s, t in finished.items():  # finished runs were neither redone nor rewritten
        assert after[s]["attempts"] == 1 and after[s]["finished"] == t and len(executions(marks, s)) == 1
    for s in killed:  # the killed runs were taken up again at once (this host, the driver's process gone)
        assert after[s]["attempts"] == 2
    db.close()


def test_ctrl_c_cancels_the_tasks_and_gives_their_runs_back(tmp_path, ray_instance):
    spec_path, marks = _sleep_spec(tmp_path, range(4), sleep=30)
    db_path = tmp_path / "s.sqlite"
    proc = _driver(spec_path)
    try:
        _wait_for(proc, db_path, lambda st: st.get("running", 0) == 2, "two runs were running")
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the driver did not end within 60 s of Ctrl-C; it printed:\n{proc.communicate()[0]}")
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert _statuses(db_path) == {"pending": 4}
    assert "interrupted; its 2 running run(s) are pending again" in out and f"sparseattn sweep {spec_path}" in out
    time.sleep(1)
    for s in range(4):  # the cancelled tasks were stopped, not left sleeping
        assert all(end == 0 for _, _, end in executions(marks, s))


def test_fractional_gpus_pack_runs_on_one_gpu(tmp_path, ray_instance):
    spec_path, marks = _sleep_spec(tmp_path, range(8), sleep=1.0, meet=4)  # the first four wait for each other
    enqueue(load_spec(spec_path), tmp_path / "s.sqlite").close()
    lines = []
    run_ray_sweep(tmp_path / "s.sqlite", "s", gpus_per_run=0.5, cpus_per_run=0.5, echo=lines.append)
    assert lines[0] == "Ray: 4 CPUs, 2 GPUs; each run takes 0.5 GPU and 0.5 CPU: 4 at once"
    db = ResultsDB(tmp_path / "s.sqlite", readonly=True)
    placed = [r["result"]["ray"] for r in db.runs("s", status="done")]
    assert len(placed) == 8
    for p in placed:  # each run got half of one GPU, and only that GPU visible
        assert p["resources"] == {"GPU": 0.5, "CPU": 0.5} and len(p["gpu_ids"]) == 1
        assert p["cuda_visible_devices"] == p["gpu_ids"][0]
    def most_at_once(spans):
        return max(sum(a <= t < b for a, b in spans) for t, _ in spans)

    per_gpu = [most_at_once([(p["started"], p["ended"]) for p in placed if p["gpu_ids"][0] == gpu])
               for gpu in ("0", "1")]
    assert max(per_gpu) == 2  # two runs shared a GPU, never more
    assert most_at_once([(p["started"], p["ended"]) for p in placed]) == 4  # more runs at once than GPUs
    db.close()


def test_bad_ray_options_say_what_is_expected(tmp_path, monkeypatch, capsys):
    from sparseattn.cli import main

    spec_path, _ = _sleep_spec(tmp_path, [0])
    for share in (1.5, 2, -0.5, float("nan")):
        with pytest.raises(ConfigError, match=rf"--gpus-per-run must be a share of one GPU in \(0, 1\] .* got {share}"):
            run_ray_sweep(tmp_path / "s.sqlite", "s", gpus_per_run=share)
    with pytest.raises(ConfigError, match=r"--cpus-per-run must be .* got 0"):
        run_ray_sweep(tmp_path / "s.sqlite", "s", cpus_per_run=0)
    assert main(["sweep", str(spec_path), "--ray", "--workers", "2"]) == 1
    assert "--workers 2 with --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    with pytest.raises(DependencyError, match=r"pip install 'sparseattn\[ray\]'"):
        run_ray_sweep(tmp_path / "s.sqlite", "s")


class _StandInRay:
    """Enough of Ray for the driver's loop, without starting Ray: one CPU, every task ready at once; getting a
    result raises ``get_raises`` (Ctrl-C arriving while the driver records a finished task), or returns it when
    it is a task's value (a dict)."""

    class exceptions:
        RayError = RuntimeError

    def __init__(self, get_raises):
        self.get_raises, self.cancelled = get_raises, []

    def cluster_resources(self):
        return {"CPU": 1.0}

    def wait(self, refs, num_returns, timeout):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if isinstance(self.get_raises, dict):  # a task's value
            return self.get_raises
        raise self.get_raises

    def cancel(self, ref, force):
        self.cancelled.append(ref)


class _Remote:
    def remote(self, *args):
        return object()


def _drive_stand_in(tmp_path, ray, raises, match=None) -> list[str]:
    """The driver's loop over one sleep-test run with ``ray`` standing in for Ray; it must raise ``raises``.
    Returns the run's status afterwards."""
    from sparseattn.experiments import ray_sweep
    from sparseattn.experiments.db import WorkerId

    spec_path, _ = _sleep_spec(tmp_path, [0])
    db = enqueue(load_spec(spec_path), tmp_path / "s.sqlite")
    with pytest.raises(raises, match=match):
        ray_sweep._drive(ray, db, WorkerId("ray"), "s", _Remote(), {"num_cpus": 1.0, "num_gpus": 0.0},
                         glue_dir=None, work_dir=str(tmp_path), lease=30.0, max_runs=None, max_retries=0,
                         say=lambda _: None)
    statuses = [r["status"] for r in db.runs("s")]
    db.close()
    return statuses


def test_ctrl_c_while_a_finished_task_is_recorded_gives_its_run_back(tmp_path):
    """Interrupted between a task's end and its record, the driver gives that run back as pending too (it is
    not left 'running' under a driver that has stopped)."""
    ray = _StandInRay(KeyboardInterrupt())
    mine = signal.getsignal(signal.SIGINT)
    assert _drive_stand_in(tmp_path, ray, KeyboardInterrupt) == ["pending"] and len(ray.cancelled) == 1
    assert signal.getsignal(signal.SIGINT) is mine  # a sweep run from Python leaves the caller's Ctrl-C as it was


class _InterruptedWait(_StandInRay):
    """Ctrl-C arrives while the driver waits on Ray (here: the stand-in's wait signals the process itself); nothing
    is ready, as when ray.wait times out."""

    def __init__(self):
        super().__init__(get_raises=AssertionError("nothing was ready"))
        self.wait_returned = False

    def wait(self, refs, num_returns, timeout):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # room for a handler to run inside this call, as it would inside Ray's
        self.wait_returned = True
        return [], refs


def test_ctrl_c_during_a_ray_call_is_raised_after_it_returns(tmp_path):
    """A Ctrl-C that comes while the driver is inside a Ray call is noted and raised once the call has returned
    (cut short inside, Ray's client may never answer the cancellations that follow); the run is given back."""
    ray = _InterruptedWait()
    mine = signal.getsignal(signal.SIGINT)
    assert _drive_stand_in(tmp_path, ray, KeyboardInterrupt) == ["pending"]
    assert ray.wait_returned and len(ray.cancelled) == 1
    assert signal.getsignal(signal.SIGINT) is mine


def test_a_run_missing_a_dependency_stops_the_ray_sweep_and_is_not_failed(tmp_path):
    """A run whose method raises DependencyError (no data, a missing extra) stops the sweep, as in a plain
    sweep, with the error's message; the run is pending again, not failed."""
    ray = _StandInRay({"error": "Traceback ...", "summary": "DependencyError: no GLUE data here", "versions": {},
                       "dependency": True})
    assert _drive_stand_in(tmp_path, ray, DependencyError, match="^no GLUE data here$") == ["pending"]


def _stuck_spec(tmp_path, stuck=1, seeds=(0, 1, 2)):
    """Sleep runs of 0.2 s, but run ``stuck`` sleeps 120 s (a run that never returns, as far as a test waits)."""
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({
        "name": "s", "fixed": {"method": "sleep-test", "sleep": 0.2, "marks": str(marks)},
        "runs": [{"seed": s, **({"sleep": 120} if s == stuck else {})} for s in seeds]}))
    return p


def _outcomes(db_path):
    db = ResultsDB(db_path, readonly=True)
    try:
        return {r["seed"]: (r["status"], r["error"] or "") for r in db.runs("s")}
    finally:
        db.close()


def test_run_timeout_fails_a_stuck_run_and_a_new_worker_goes_on(tmp_path, monkeypatch, capfd):
    """`sweep --run-timeout`: the stuck run is failed with the reason, its worker process ends (a run stuck in a GPU
    call cannot be interrupted), and the sweep starts another worker, which runs the rest."""
    from sparseattn.cli import main

    # the workers the sweep starts are `python -m sparseattn.cli`; this one imports the test method first
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys, ray_methods; from sparseattn.cli import "
                       "main; sys.exit(main(sys.argv[3:]))' \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(wrapper))
    monkeypatch.setenv("PYTHONPATH", PATH)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = _stuck_spec(tmp_path)
    t0 = time.time()
    assert main(["sweep", str(spec), "--run-timeout", "4"]) == 0
    assert time.time() - t0 < 100
    out = _outcomes(tmp_path / "s.sqlite")
    assert out[0][0] == out[2][0] == "done"
    assert out[1][0] == "failed" and "timed out: still running after 4 s (--run-timeout)" in out[1][1]
    text = capfd.readouterr().out  # the workers' lines too
    assert "[w0] FAILED sst2 | dense | seed 1: timed out" in text and "[w0] stopped by --run-timeout" in text
    assert "1 failed" in text


def test_run_timeout_on_ray_cancels_the_stuck_task(tmp_path, ray_instance):
    spec = _stuck_spec(tmp_path)
    enqueue(load_spec(spec), tmp_path / "s.sqlite").close()
    lines = []
    t0 = time.time()
    assert run_ray_sweep(tmp_path / "s.sqlite", "s", run_timeout=3, echo=lines.append) == {"done": 2, "failed": 1}
    assert time.time() - t0 < 60
    out = _outcomes(tmp_path / "s.sqlite")
    assert out[1][0] == "failed" and "timed out: still running after 3 s (--run-timeout); Ray killed" in out[1][1]
    assert any(line.startswith("FAILED sst2 | dense | seed 1: timed out") for line in lines)


def test_run_timeout_takes_seconds_minutes_or_hours():
    from sparseattn.experiments.sweep import parse_duration

    assert [parse_duration(x) for x in (90, "90", "90s", "1.5m", "2h")] == [90, 90, 90, 90, 7200]
    for bad in ("0", "-3", "soon", "5d", "inf", ""):
        with pytest.raises(ConfigError, match=rf"--run-timeout must be a positive duration .* got '{bad}'"):
            parse_duration(bad)
