"""The results database of sweeps: one SQLite row per run, keyed by a hash of its full configuration.

A run moves pending -> running -> done | failed. Workers (processes, one per GPU, possibly on several
hosts sharing the file) claim a run in one ``BEGIN IMMEDIATE`` transaction, so no two claim the same
run, and hold it with a lease they renew (heartbeat). A run whose worker died is claimed again: at once
when that worker was on this host and its process is gone, else when its lease has run out. A finished
run is never run again; a failed run keeps its error and runs again only when asked (retry_failed).

SQLite runs in WAL mode with synchronous=FULL: a commit survives the process being killed at any
moment. (SQLite's locking needs a local file system, not NFS.)
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..training.record import run_key

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,               -- hash of the run's full configuration
    task TEXT NOT NULL,
    plan TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,               -- JSON: every fine-tune option
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, -- how many times a worker started it
    worker TEXT, host TEXT, pid INTEGER,
    lease_until REAL, heartbeat REAL,
    created REAL NOT NULL, started REAL, finished REAL,
    wall_seconds REAL,                  -- of the last attempt
    score REAL,                         -- the task's main metric
    metrics TEXT,                       -- JSON {metric: value}
    sparsity REAL,                      -- overall, sparseattn.sparsity's definition
    sparsity_applied REAL,              -- over the sparsified heads only
    sparsity_per_layer TEXT,            -- JSON list
    result TEXT,                        -- JSON: everything finetune() returned
    versions TEXT,                      -- JSON: package versions
    error TEXT                          -- traceback of the last failure
);
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep TEXT NOT NULL,
    key TEXT NOT NULL REFERENCES runs(key),
    position INTEGER NOT NULL,          -- order in the sweep's grid
    PRIMARY KEY (sweep, key)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

STATUSES = ("pending", "running", "done", "failed")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ResultsDB:
    """One SQLite results database. Safe to open from several processes at once."""

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.conn = self._connect()
        with self.transaction():
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    self.conn.execute(stmt)
            row = self.conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise ValueError(f"{self.path} has results schema version {row[0]}, this sparseattn reads "
                                 f"version {SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        return conn

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self, conn: sqlite3.Connection | None = None):
        """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front, so read-then-write is atomic."""
        c = conn or self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    # -- filling -----------------------------------------------------------------------------------
    def add_runs(self, sweep: str, configs: list[dict], plans: list[str] | None = None) -> tuple[int, int]:
        """Register a sweep's runs (idempotent). Returns (new runs, runs already known). ``plans``: how tables
        name each run's plan (default its config's plan; learned runs name their method and penalty)."""
        now = time.time()
        new = 0
        plans = plans or [cfg["plan"] for cfg in configs]
        with self.transaction() as c:
            for pos, (cfg, plan) in enumerate(zip(configs, plans)):
                key = run_key(cfg)
                cur = c.execute("INSERT OR IGNORE INTO runs (key, task, plan, seed, config, created) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                (key, cfg["task"], plan, cfg["seed"], json.dumps(cfg, sort_keys=True), now))
                new += cur.rowcount
                c.execute("INSERT OR IGNORE INTO sweep_runs (sweep, key, position) VALUES (?, ?, ?)",
                          (sweep, key, pos))
        return new, len(configs) - new

    def retry_failed(self, sweep: str | None = None) -> int:
        """Put failed runs (of ``sweep``, or all) back to pending; returns how many."""
        with self.transaction() as c:
            q = "UPDATE runs SET status='pending' WHERE status='failed'"
            if sweep is not None:
                q += " AND key IN (SELECT key FROM sweep_runs WHERE sweep=?)"
                return c.execute(q, (sweep,)).rowcount
            return c.execute(q).rowcount

    # -- claiming and running ----------------------------------------------------------------------
    def claim(self, worker: "WorkerId", sweep: str | None = None, *, lease: float = 120.0) -> sqlite3.Row | None:
        """Atomically take the next pending run (or one whose worker died) of ``sweep``; None when none."""
        now = time.time()
        scope = "" if sweep is None else " AND r.key IN (SELECT key FROM sweep_runs WHERE sweep=:sweep)"
        order = " ORDER BY r.rowid" if sweep is None else \
            " ORDER BY (SELECT position FROM sweep_runs s WHERE s.sweep=:sweep AND s.key=r.key)"
        with self.transaction() as c:
            row = c.execute(f"SELECT r.* FROM runs r WHERE r.status='pending'{scope}{order} LIMIT 1",
                            {"sweep": sweep}).fetchone()
            if row is None:  # a run of a dead worker: lease over, or its process gone from this host
                for cand in c.execute(f"SELECT r.* FROM runs r WHERE r.status='running'{scope}{order}",
                                      {"sweep": sweep}).fetchall():
                    dead_here = cand["host"] == worker.host and cand["pid"] is not None and \
                        cand["pid"] != worker.pid and not _pid_alive(cand["pid"])
                    if (cand["lease_until"] or 0) < now or dead_here:
                        row = cand
                        break
            if row is None:
                return None
            c.execute("UPDATE runs SET status='running', worker=?, host=?, pid=?, attempts=attempts+1, "
                      "started=?, heartbeat=?, lease_until=?, finished=NULL WHERE key=?",
                      (worker.name, worker.host, worker.pid, now, now, now + lease, row["key"]))
            return c.execute("SELECT * FROM runs WHERE key=?", (row["key"],)).fetchone()

    def heartbeat(self, key: str, worker: "WorkerId", lease: float, conn: sqlite3.Connection | None = None) -> bool:
        """Renew the lease; False if the run is no longer this worker's."""
        now = time.time()
        cur = (conn or self.conn).execute(
            "UPDATE runs SET heartbeat=?, lease_until=? WHERE key=? AND worker=? AND status='running'",
            (now, now + lease, key, worker.name))
        return cur.rowcount == 1

    def finish(self, key: str, worker: "WorkerId", result: dict) -> bool:
        """Record a finished run. The first result of a run is kept: False (nothing written) if the run is
        already done (another worker reclaimed it and finished first)."""
        now = time.time()
        sp = result.get("sparsity", {})
        with self.transaction() as c:
            row = c.execute("SELECT status, started, worker FROM runs WHERE key=?", (key,)).fetchone()
            if row is None or row["status"] == "done":
                return False
            started = row["started"] if row["worker"] == worker.name else None
            c.execute("UPDATE runs SET status='done', finished=?, wall_seconds=?, score=?, metrics=?, sparsity=?, "
                      "sparsity_applied=?, sparsity_per_layer=?, result=?, versions=?, error=NULL, lease_until=NULL "
                      "WHERE key=?",
                      (now, (now - started) if started else result.get("timing", {}).get("total_seconds"),
                       result.get("score"), json.dumps(result.get("metrics")), sp.get("overall"), sp.get("applied"),
                       json.dumps(sp.get("per_layer")), json.dumps(result), json.dumps(result.get("versions")), key))
            return True

    def fail(self, key: str, worker: "WorkerId", error: str, versions: dict | None = None) -> None:
        now = time.time()
        with self.transaction() as c:
            c.execute("UPDATE runs SET status='failed', finished=?, wall_seconds=?-started, error=?, versions=?, "
                      "lease_until=NULL WHERE key=? AND worker=? AND status='running'",
                      (now, now, error, json.dumps(versions) if versions else None, key, worker.name))

    def release(self, key: str, worker: "WorkerId") -> None:
        """Give a run back unfinished (the worker was interrupted): pending again, for anyone."""
        with self.transaction() as c:
            c.execute("UPDATE runs SET status='pending', lease_until=NULL WHERE key=? AND worker=? AND "
                      "status='running'", (key, worker.name))

    # -- reading -----------------------------------------------------------------------------------
    def counts(self, sweep: str | None = None) -> dict[str, int]:
        q = "SELECT status, COUNT(*) FROM runs"
        args: tuple = ()
        if sweep is not None:
            q += " WHERE key IN (SELECT key FROM sweep_runs WHERE sweep=?)"
            args = (sweep,)
        got = dict(self.conn.execute(q + " GROUP BY status", args).fetchall())
        return {s: got.get(s, 0) for s in STATUSES}

    def runs(self, sweep: str | None = None, status: str | None = None) -> list[dict]:
        """Rows as dicts with JSON columns decoded, in the sweep's order (or insertion order)."""
        where, args = [], []
        if sweep is not None:
            where.append("r.key IN (SELECT key FROM sweep_runs WHERE sweep=?)")
            args.append(sweep)
        if status is not None:
            where.append("r.status=?")
            args.append(status)
        q = "SELECT r.* FROM runs r" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY r.rowid"
        out = []
        for row in self.conn.execute(q, args).fetchall():
            d = dict(row)
            for k in ("config", "metrics", "sparsity_per_layer", "result", "versions"):
                if d.get(k) is not None:
                    d[k] = json.loads(d[k])
            out.append(d)
        return out

    def sweeps(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT sweep FROM sweep_runs ORDER BY sweep")]


class WorkerId:
    """Who holds a run: a unique name, the host and the process id."""

    def __init__(self, label: str | None = None):
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.name = f"{self.host}:{self.pid}:{label or uuid.uuid4().hex[:8]}"

    def __repr__(self) -> str:
        return self.name


class Heartbeat:
    """Renews a run's lease from a background thread (own connection) until stopped."""

    def __init__(self, db: ResultsDB, key: str, worker: WorkerId, lease: float):
        self.db, self.key, self.worker, self.lease = db, key, worker, lease
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{key[:8]}", daemon=True)

    def _run(self):
        conn = self.db._connect()
        try:
            while not self._stop.wait(max(0.5, self.lease / 4)):
                try:
                    if not self.db.heartbeat(self.key, self.worker, self.lease, conn):
                        self.lost = True
                except sqlite3.OperationalError:
                    pass  # database busy for longer than the timeout: try again next beat
        finally:
            conn.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
