"""The results database of sweeps: one SQLite row per run, keyed by a hash of its full configuration.

A run moves pending -> running -> done | failed. Workers (processes, one per GPU, possibly on several
hosts sharing the file) claim a run in one ``BEGIN IMMEDIATE`` transaction, so no two claim the same
run, and hold it with a lease they renew (heartbeat). A run whose worker died is claimed again: at once
when that worker was on this host and its process is gone, else when its lease has run out. (A Ray sweep's
driver, ``ray_sweep``, is one such worker holding every run it has handed to Ray.) A finished
run is never run again; a failed run keeps its error and runs again only when asked (retry_failed).

SQLite runs in WAL mode with synchronous=FULL: a commit survives the process being killed at any
moment. (SQLite's locking needs a local file system, not NFS.)

A finished run's result is first written to a file of its own (``<db>.kept/<key>.json``) and then taken
into the database; the file goes once the database holds it. When the database cannot be written (the disk
is full), the file stays and the next claim on the database takes it in, so finished work is never lost
and never redone.

A database file replaced while a sweep runs (a copy put in its place, say by a tool that syncs files) would
show the sweep an older state: finished runs pending again, results written where nobody reads them. A writer
notes which file it opened and refuses to write once another file stands at its path (``StorageError``); a
result finished meanwhile stays in ``<db>.kept`` for the database now at that path.

``ResultsDB(path, readonly=True)`` only reads (``--status``, ``report``): it works on a database that cannot
be written, on read-only media too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from ..errors import NotFoundError, StorageError
from ..training.record import run_key

log = logging.getLogger("sparseattn")

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
    """Whether process ``pid`` of this host is running; a zombie (ended, not yet reaped) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]  # the field after the command name
    except (OSError, IndexError):  # no /proc (not Linux): kill's answer stands
        return True
    return state not in (b"Z", b"X")


class ResultsDB:
    """One SQLite results database. Safe to open from several processes at once."""

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0, readonly: bool = False):
        self.path = Path(path)
        self.timeout = timeout
        self.readonly = readonly
        self._file_id = None  # (device, inode) of the file this writer opened: see check_same_file
        if readonly:
            self.conn = self._connect_readonly()
            self._check_schema()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = self._connect()
            with self.transaction():
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                self._check_schema(create=True)
            self._file_id = self._stat_id()
        except (sqlite3.Error, OSError) as e:
            why = str(e) if isinstance(e, StorageError) else \
                f"{self.path}: cannot open the results database for writing ({e})"
            raise StorageError(f"{why} (--status and report only read it: they work on a read-only database)") \
                from None

    def _stat_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def same_file(self) -> bool:
        """Whether the file at ``path`` is still the one this writer opened (always, for a reader)."""
        return self._file_id is None or self._stat_id() == self._file_id

    def check_same_file(self) -> None:
        """StorageError when the file at ``path`` is no longer the one this writer opened (replaced or removed)."""
        if not self.same_file():
            now = "is gone" if self._stat_id() is None else "is another file now (a copy put in its place?)"
            raise StorageError(f"{self.path}: the results database this process opened {now}; not writing to it, so "
                               "that no finished run is run again or recorded where nobody reads it. Start the sweep "
                               "again: it works on the database now at that path")

    def _check_schema(self, create: bool = False) -> None:
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StorageError(f"{self.path}: not a sparseattn results database ({e})") from None
        if row is None and create:
            self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif row is None or str(row[0]) != str(SCHEMA_VERSION):
            raise StorageError(f"{self.path} has results schema version {row[0] if row else None}, this sparseattn "
                               f"reads version {SCHEMA_VERSION}")

    def _connect_readonly(self) -> sqlite3.Connection:
        """A connection that never writes. A WAL database needs its -shm file, which a read-only folder cannot
        hold; then the file is opened as immutable (it must not be written meanwhile: a finished sweep)."""
        if not self.path.is_file():
            raise NotFoundError(f"no results database at {self.path}")
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        error = None
        for suffix in ("", "&immutable=1"):
            try:
                conn = sqlite3.connect(uri + suffix, uri=True, timeout=self.timeout, check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
                conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            except sqlite3.DatabaseError as e:
                error = e
                continue
            conn.row_factory = sqlite3.Row
            return conn
        raise StorageError(f"{self.path}: cannot open the results database to read it ({error})")

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
        self.check_same_file()
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StorageError(f"{self.path}: cannot write the results database ({e})") from None
        try:
            yield c
            c.execute("COMMIT")
        except BaseException as e:
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # COMMIT failed and SQLite rolled back itself
            if isinstance(e, sqlite3.Error):  # a full disk, a read-only file, a busy database past the timeout
                raise StorageError(f"{self.path}: cannot write the results database ({e})") from None
            raise

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
        self.take_kept()  # results finished earlier but not recorded then: never run them again
        now = time.time()
        scope = "" if sweep is None else " AND r.key IN (SELECT key FROM sweep_runs WHERE sweep=:sweep)"
        order = " ORDER BY r.rowid" if sweep is None else \
            " ORDER BY (SELECT position FROM sweep_runs s WHERE s.sweep=:sweep AND s.key=r.key)"
        with self.transaction() as c:
            # the first run in the sweep's order that is pending or whose worker died (lease over, or its process
            # gone from this host): a run cut off when a machine went away is taken up in its place in the order,
            # not after every pending run (a spec that puts seeds 1 and 2 before 0 gets them first)
            row = None
            for cand in c.execute(f"SELECT r.* FROM runs r WHERE r.status IN ('pending', 'running'){scope}{order}",
                                  {"sweep": sweep}):
                if cand["status"] == "pending":
                    row = cand
                    break
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

    # -- finished results: a file first, then the database ---------------------------------------------
    @property
    def kept_dir(self) -> Path:
        """Where finished results wait until the database holds them."""
        return self.path.with_name(self.path.name + ".kept")

    def _keep(self, key: str, result: dict) -> Path | None:
        """Write ``result`` to its own file (atomically, synced); None when that fails too (the disk is full)."""
        path = self.kept_dir / f"{key}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.kept_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(result))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return path
        except (OSError, TypeError, ValueError) as e:
            log.warning("could not keep the result of run %s in %s: %s", key[:10], path, e)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            return None

    def take_kept(self) -> int:
        """Take results waiting in ``kept_dir`` into the database (each once); returns how many."""
        try:
            files = sorted(self.kept_dir.glob("*.json"))
        except OSError:
            return 0
        taken = 0
        for f in files:
            try:
                result = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                log.warning("cannot read the kept result %s (%s); left there", f, e)
                continue
            if self.conn.execute("SELECT 1 FROM runs WHERE key=?", (f.stem,)).fetchone() is None:
                # another database at this path (one put in its place) that does not hold the run: its result
                # stays for the database it belongs to
                log.warning("the kept result %s is of a run that %s does not hold; left there", f, self.path)
                continue
            try:
                taken += self._finish(f.stem, None, result)
            except StorageError as e:
                raise StorageError(f"{e}; the finished result {f} waits there") from None
            f.unlink(missing_ok=True)
        return taken

    def finish(self, key: str, worker: "WorkerId", result: dict) -> bool:
        """Record a finished run. The first result of a run is kept: False (nothing written) if the run is
        already done (another worker reclaimed it and finished first). The result goes to a file first; if
        the database cannot take it (StorageError), the file stays and ``take_kept`` records it later."""
        kept = self._keep(key, result)
        try:
            done = self._finish(key, worker, result)
        except (sqlite3.Error, OSError) as e:
            where = f"kept in {kept}; it goes into the database when the sweep runs again" if kept else \
                f"NOT kept: {self.kept_dir} could not be written either"
            raise StorageError(f"{self.path}: cannot record the finished run {key[:10]} ({e}); its result is "
                               f"{where}") from None
        if kept is not None:
            kept.unlink(missing_ok=True)
        return done

    def _finish(self, key: str, worker: "WorkerId | None", result: dict) -> bool:
        now = time.time()
        sp = result.get("sparsity", {})
        with self.transaction() as c:
            row = c.execute("SELECT status, started, worker FROM runs WHERE key=?", (key,)).fetchone()
            if row is None or row["status"] == "done":
                return False
            started = row["started"] if worker is not None and row["worker"] == worker.name else None
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
    """Renews the leases of runs from a background thread (own connection) until stopped: one run (a worker),
    or the changing set of runs a Ray sweep's driver holds (``add`` / ``discard``)."""

    def __init__(self, db: ResultsDB, key: str | None, worker: WorkerId, lease: float):
        self.db, self.worker, self.lease = db, worker, lease
        self.keys: set[str] = {key} if key is not None else set()
        self.lost: set[str] = set()  # runs whose lease another worker has taken over
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{key[:8] if key else 'runs'}", daemon=True)

    def add(self, key: str) -> None:
        with self._lock:
            self.keys.add(key)

    def discard(self, key: str) -> None:
        with self._lock:
            self.keys.discard(key)

    def _run(self):
        # a replaced database: the worker's next write says so; leases renewed in another file would hold its runs
        if not self.db.same_file():
            return
        conn = self.db._connect()
        try:
            while not self._stop.wait(max(0.5, self.lease / 4)):
                with self._lock:
                    keys = list(self.keys)
                if not self.db.same_file():
                    return
                for key in keys:
                    try:
                        if not self.db.heartbeat(key, self.worker, self.lease, conn) and key in self.keys:
                            self.lost.add(key)  # (a run discarded meanwhile is finished, not lost)
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
