"""Faults: the disk filling up while a finished run is recorded (the result is kept, recorded later, never
redone), a results database that cannot be written (--status and report still read it), dead workers
that linger as zombies."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sparseattn.cli import main
from sparseattn.experiments import sweep as sweep_module
from sparseattn.experiments.db import ResultsDB, _pid_alive
from sparseattn.models import packaged_model_path

pytestmark = pytest.mark.skipif(packaged_model_path() is None, reason="needs the packaged MiniLM's config")


def _spec(tmp_path: Path, seeds=(0, 1)) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "s", "fixed": {"task": "sst2", "epochs": 1},
                                 "grid": {"plan": ["dense"], "seed": list(seeds)}}))
    return p


@pytest.fixture
def fake_runs(monkeypatch):
    """Runs that finish at once with a result as large as a real one; counts how often each run ran."""
    calls: dict[int, int] = {}

    def run_config(cfg, **kw):
        calls[cfg.seed] = calls.get(cfg.seed, 0) + 1
        score = 0.8 + cfg.seed / 100
        return {"score": score, "main_metric": "accuracy", "metrics": {"accuracy": score},
                "timing": {"train_seconds": 1.0, "total_seconds": 1.0}, "padding": "x" * 20000,
                "sparsity": {"overall": 0.0, "applied": 0.0, "per_layer": [0.0] * 6}}

    monkeypatch.setattr(sweep_module, "run_config", run_config)
    return calls


def _full_disk_sqlite(monkeypatch):
    """SQLite's own 'database or disk is full' (SQLITE_FULL): the database may not grow by a page."""
    original = ResultsDB._finish

    def finish(self, key, worker, result):
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        self.conn.execute(f"PRAGMA max_page_count={pages}")
        return original(self, key, worker, result)
    monkeypatch.setattr(ResultsDB, "_finish", finish)


def _full_disk_oserror(monkeypatch):
    def finish(self, key, worker, result):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ResultsDB, "_finish", finish)


@pytest.mark.parametrize("fill", [_full_disk_sqlite, _full_disk_oserror])
def test_disk_full_while_recording_keeps_the_result(tmp_path, fake_runs, monkeypatch, capsys, fill):
    spec = _spec(tmp_path)
    with monkeypatch.context() as m:
        fill(m)
        assert main(["sweep", str(spec), "--no-progress"]) == 1  # the worker stops: nothing more can be recorded
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    assert "s.sqlite: cannot record the finished run" in err and "its result is kept in" in err
    kept = list((tmp_path / "s.sqlite.kept").glob("*.json"))
    assert len(kept) == 1 and fake_runs == {0: 1}
    # the disk has room again: the kept result is recorded, not run again; the other run runs
    assert main(["sweep", str(spec), "--no-progress"]) == 0
    assert fake_runs == {0: 1, 1: 1}
    db = ResultsDB(tmp_path / "s.sqlite", readonly=True)
    runs = db.runs("s")
    assert [(r["seed"], r["status"], r["score"], r["attempts"]) for r in runs] == [(0, "done", 0.8, 1),
                                                                                   (1, "done", 0.81, 1)]
    assert runs[0]["result"]["padding"] == "x" * 20000
    db.close()
    assert not list((tmp_path / "s.sqlite.kept").glob("*"))


def test_a_result_that_cannot_be_kept_nor_recorded_says_so(tmp_path, fake_runs, monkeypatch, capsys):
    (tmp_path / "s.sqlite.kept").write_text("a file where the folder would go")  # the folder cannot be made
    _full_disk_oserror(monkeypatch)
    assert main(["sweep", str(_spec(tmp_path, seeds=[0])), "--no-progress"]) == 1
    assert "its result is NOT kept" in capsys.readouterr().err


def _finished_sweep(tmp_path: Path) -> tuple[Path, Path]:
    spec = _spec(tmp_path)
    assert main(["sweep", str(spec), "--no-progress"]) == 0
    return spec, tmp_path / "s.sqlite"


def test_readonly_database_status_and_report(tmp_path, fake_runs, capsys):
    """--status and report on a read-only copy of a finished sweep's database, in a read-only folder. Tests
    run as root, whom file modes do not stop; the CLI then runs without the capabilities that override them
    (setpriv), so the modes hold as for any user."""
    spec, db = _finished_sweep(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(db, ro / "s.sqlite")
    shutil.copy(spec, ro / "s.yaml")
    before = (ro / "s.sqlite").read_bytes()
    out = tmp_path / "report"
    for f in ro.iterdir():
        f.chmod(0o444)
    ro.chmod(0o555)
    try:
        prefix = []
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: a read-only file cannot be simulated")
            prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
        code = ("import sys; from sparseattn.cli import main; "
                f"sys.exit(main(['sweep', {str(ro / 's.yaml')!r}, '--status']) or "
                f"main(['report', {str(ro / 's.sqlite')!r}, '--out', {str(out)!r}]))")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
        p = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        assert "sweep s: 0 pending, 0 running, 2 done, 0 failed" in p.stdout
        assert (out / "report.md").is_file() and "2 done" in (out / "report.md").read_text()
        if prefix:  # the folder really is read-only to that process
            p = subprocess.run([*prefix, sys.executable, "-c", f"open({str(ro / 'x')!r}, 'w')"], capture_output=True)
            assert p.returncode != 0
        assert sorted(f.name for f in ro.iterdir()) == ["s.sqlite", "s.yaml"]  # no -wal or -shm made
        assert (ro / "s.sqlite").read_bytes() == before
    finally:
        ro.chmod(0o755)


def test_a_readonly_connection_never_writes_and_writing_says_where(tmp_path, fake_runs):
    _, db_path = _finished_sweep(tmp_path)
    db = ResultsDB(db_path, readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db.conn.execute("DELETE FROM runs")
    db.close()
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    from sparseattn.errors import StorageError

    with pytest.raises(StorageError, match="junk.sqlite"):
        ResultsDB(tmp_path / "junk.sqlite", readonly=True)
    with pytest.raises(StorageError, match="junk.sqlite: cannot open the results database for writing"):
        ResultsDB(tmp_path / "junk.sqlite")


def test_a_zombie_worker_is_dead():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while Path(f"/proc/{p.pid}/stat").read_bytes().rpartition(b")")[2].split()[0] != b"Z":
            assert time.time() < deadline
            time.sleep(0.05)
        assert not _pid_alive(p.pid)  # ended, not yet reaped by its parent
    finally:
        p.wait()
    assert _pid_alive(os.getpid())
