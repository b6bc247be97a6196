"""Sweeps: a grid of runs (of any registered method, ``sparseattn.training.methods``), run by one or more
workers into a results database, and the report of that database.

A spec (YAML):

    name: breaking-bert-glue          # default: the file's name without .yaml
    db: results.sqlite                # default: <name>.sqlite beside the spec; --db overrides
    fixed:                            # options every run shares (FinetuneConfig fields, or a method's own)
      epochs: 3
      lr: 5.0e-5
      batch_size: 32
    grid:                             # the cross product of these lists (any FinetuneConfig field)
      task: [sst2, mrpc, rte]
      plan: ["dense", "later-half: neighbour(2)", "later-half: random(4)"]
      seed: [0, 1, 2]
                                      # (or a list of such grids, each expanded on its own)
    runs:                             # optional: further single runs, each over `fixed`
      - {task: cola, plan: "all: bigbird(1, 2, 3)", seed: 0}

Every run is identified by the hash of its complete configuration (defaults filled in, task and plan
canonical), so re-running a spec, or another spec that shares runs with it, never repeats a finished
run. See ``sparseattn.experiments.db`` for how workers share the database.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..errors import ConfigError, DependencyError, SparseattnError
from ..reports.report import write_report_files
from ..training.config import FinetuneConfig, model_shape
from ..training.methods import config_from_dict, run_config
from ..training.record import one_class_warning, package_versions, run_key
from ..training.tasks import score_text
from .db import STATUSES, Heartbeat, ResultsDB, WorkerId

SPEC_KEYS = {"name", "description", "db", "fixed", "grid", "runs", "seeds"}


class SweepSpecError(ConfigError):
    """A sweep spec that cannot be expanded; the message names the file and the offending entry."""


@dataclass
class SweepSpec:
    name: str
    configs: list[FinetuneConfig]
    db: Path
    path: Path | None = None  # the YAML file, if it came from one
    description: str = ""

    def config_dicts(self) -> list[dict]:
        return [c.to_dict() for c in self.configs]



@contextmanager
def ctrl_c_ignored():
    """Ctrl-C ignored while runs are given back (a second one must not cut that short); the caller's handler is
    back afterwards, for sweeps run from Python."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

def spec_from_dict(d: dict, *, name: str, where: str = "spec", base_dir: Path | None = None) -> SweepSpec:
    if not isinstance(d, dict):
        raise SweepSpecError(f"{where}: expected a mapping with keys {sorted(SPEC_KEYS)}, got {type(d).__name__}")
    unknown = sorted(map(repr, set(d) - SPEC_KEYS))
    if unknown:
        raise SweepSpecError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {sorted(SPEC_KEYS)}")
    for key, what in (("name", "a name"), ("description", "text"), ("db", "a database path")):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise SweepSpecError(f"{where}: '{key}' must be {what} (a string), got {d[key]!r}")
    name = str(d.get("name") or name)
    fixed = d.get("fixed") or {}
    grid = d.get("grid") or {}
    extra = d.get("runs") or []
    if not isinstance(fixed, dict):
        raise SweepSpecError(f"{where}: 'fixed' must be a mapping of fine-tune options")
    grids = grid if isinstance(grid, list) else [grid]
    for i, g in enumerate(grids):
        at = "grid" if not isinstance(grid, list) else f"grid[{i}]"
        if not isinstance(g, dict):
            raise SweepSpecError(f"{where}: '{at}' must be a mapping of option: [values]")
        for k, v in g.items():
            if not isinstance(k, str):
                raise SweepSpecError(f"{where}: '{at}' has the key {k!r}; expected option names")
            if not isinstance(v, list) or not v:
                raise SweepSpecError(f"{where}: {at}.{k} must be a non-empty list, got {v!r}")
    if not isinstance(extra, list) or not all(isinstance(r, dict) for r in extra):
        raise SweepSpecError(f"{where}: 'runs' must be a list of mappings")
    entries = []  # (the run's options, whether its grid or run entry names its own seed)
    for g in grids:
        if not g:
            continue
        keys = list(g)
        for values in itertools.product(*(g[k] for k in keys)):
            entries.append(({**fixed, **dict(zip(keys, values))}, "seed" in g))
    entries.extend(({**fixed, **r}, "seed" in r) for r in extra)
    if not entries:
        raise SweepSpecError(f"{where}: no runs; give a 'grid' and/or 'runs'")
    seeds = d.get("seeds")
    if seeds is None:
        dicts = [c for c, _ in entries]
    elif (not isinstance(seeds, list) or not seeds
          or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise SweepSpecError(f"{where}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    else:
        # every run once per seed, seed by seed, so that a study grown from one seed to three queues the new
        # seeds' runs after the ones it has; an entry that names its own seed keeps it
        dicts = [c for c, own in entries if own] + [{**c, "seed": x} for x in seeds for c, own in entries if not own]
    configs, seen = [], set()
    for i, c in enumerate(dicts):
        try:
            cfg = config_from_dict(c)
        except (ValueError, TypeError, SparseattnError) as e:
            raise SweepSpecError(f"{where}: run {i} {c}: {e}") from None
        key = run_key(cfg.to_dict())
        if key not in seen:  # the same run listed twice is one run
            seen.add(key)
            configs.append(cfg)
    db = d.get("db") or f"{name}.sqlite"
    db = Path(db)
    if not db.is_absolute() and base_dir is not None:
        db = base_dir / db
    return SweepSpec(name, configs, db, description=str(d.get("description") or ""))


def load_spec(path: str | os.PathLike) -> SweepSpec:
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepSpecError(f"{path}: not valid YAML: {e}") from None
    spec = spec_from_dict(d, name=path.stem, where=str(path), base_dir=path.parent)
    spec.path = path
    return spec


def check_runs(spec: SweepSpec) -> None:
    """What a run would only find out when it starts, checked for every run before any is queued: the model
    loads, max_length fits its positions, the plan's layers and heads are in range."""
    where = spec.path or spec.name
    shape_of = functools.cache(model_shape)  # one read of each model's config for the whole spec
    for i, cfg in enumerate(spec.configs):
        try:
            cfg.check_model_shape(*cfg.shape(shape_of))
        except SparseattnError as e:
            raise SweepSpecError(f"{where}: run {i} ({cfg.task} | {cfg.display_plan} | seed {cfg.seed}): {e}") from None


# -- one worker -------------------------------------------------------------------------------------------
def work_dir_of(db_path) -> Path:
    """Where a database's runs keep what they share (prune runs: dense checkpoints, averages, masks)."""
    p = Path(db_path)
    return p.with_name(p.name + ".work")


def format_duration(seconds: float) -> str:
    """45 s, 12 min, 2 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def parse_duration(text, *, what: str = "--run-timeout") -> float:
    """Seconds from 90, "90", "90s", "15m" or "2h"; a positive number, else an error naming ``what``."""
    raw = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(raw[-1:], None)
    try:
        seconds = float(raw[:-1] if scale else raw) * (scale or 1)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{what} must be a positive duration in seconds, or with m or h (90, 15m, 2h), got {text!r}")
    return seconds


# A worker that --run-timeout stopped exits with this code; the sweep that started it starts another in its place.
EXIT_TIMED_OUT = 75


class RunTimeout:
    """Fails the run a worker holds once it has run ``seconds``, then ends the worker's process: a run stuck in a
    GPU call, a collective or a deadlock cannot be interrupted from Python, only ended with its process. Cancelled
    (``cancel``) as soon as the run returns, before its result is recorded."""

    def __init__(self, db_path, key: str, worker: WorkerId, seconds: float, announce):
        self.db_path, self.key, self.worker, self.seconds, self.announce = db_path, key, worker, seconds, announce
        self._lock = threading.Lock()
        self._cancelled = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:  # held until the process ends: a run returning now waits in cancel() and goes with it
            if self._cancelled:
                return
            why = (f"timed out: still running after {format_duration(self.seconds)} (--run-timeout); its worker "
                   "process was stopped")
            try:
                db = ResultsDB(self.db_path)
                db.fail(self.key, self.worker, why, package_versions())
                db.close()
                self.announce(why)
            finally:
                os._exit(EXIT_TIMED_OUT)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            self._timer.cancel()


def progress_line(db: ResultsDB, sweep: str | None) -> str:
    """Where the sweep stands, from the database (so every worker's runs count): done / total, failed, running,
    and an estimate of the time left (the mean time of the finished runs, spread over the running workers)."""
    c = db.counts(sweep)
    total = sum(c.values())
    left = c["pending"] + c["running"]
    parts = [f"{c['done']}/{total} done"] + [f"{c[s]} {s}" for s in ("failed", "running") if c[s]]
    walls = [r["wall_seconds"] for r in db.runs(sweep, status="done") if r.get("wall_seconds")]
    if left and walls:
        parts.append(f"about {format_duration(left * sum(walls) / len(walls) / max(1, c['running']))} left")
    return ", ".join(parts)


def run_worker(db_path: str | os.PathLike, sweep: str | None = None, *, glue_dir=None, lease: float = 120.0,
               progress: bool = True, max_runs: int | None = None, echo=print, label: str | None = None,
               work_dir=None, run_timeout: float | None = None) -> dict:
    """Claim and run pending runs of ``sweep`` until none is left. Returns {'done': n, 'failed': n}.

    Prints a line when a run starts and when it ends (its metric, sparsity and time, then the whole sweep's
    count and time left); lines start with ``[label]`` when the worker has one (several workers). Interrupted
    (Ctrl-C, SIGTERM), it gives its run back as pending before it stops. ``run_timeout`` (seconds): a run still
    running after it is failed and this process ends with ``EXIT_TIMED_OUT`` (``RunTimeout``)."""
    import transformers  # here, not at the top: importing transformers takes seconds

    transformers.logging.set_verbosity_error()  # every run loads a new classification head: expected, not news
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    db = ResultsDB(db_path)
    work_dir = Path(work_dir) if work_dir else work_dir_of(db_path)
    worker = WorkerId(label)
    tag = f"[{label}] " if label else ""

    def say(line: str) -> None:
        echo(line)
        sys.stdout.flush()  # several workers share the terminal: each line as soon as it is made
    done = failed = 0
    held = None  # the key of the run this worker holds
    try:
        while max_runs is None or done + failed < max_runs:
            row = db.claim(worker, sweep, lease=lease)
            if row is None:
                break
            held = row["key"]
            cfg = config_from_dict(json.loads(row["config"]))
            what = f"{cfg.task} | {cfg.display_plan} | seed {cfg.seed}"
            again = f" (attempt {row['attempts']})" if row["attempts"] > 1 else ""
            say(f"{tag}started {what}{again}  [{progress_line(db, sweep)}]")
            t0 = time.perf_counter()
            timeout = RunTimeout(db.path, row["key"], worker, run_timeout,
                                 lambda why, what=what: say(f"{tag}FAILED {what}: {why}")) if run_timeout else None
            try:
                with Heartbeat(db, row["key"], worker, lease):
                    try:
                        result = run_config(cfg, glue_dir=glue_dir, progress=progress, work_dir=work_dir)
                    finally:
                        if timeout is not None:
                            timeout.cancel()
            except (KeyboardInterrupt, SystemExit):
                raise
            except DependencyError:  # no data for any run: stop here, the run is not to blame
                raise
            except Exception as e:
                db.fail(row["key"], worker, traceback.format_exc(), package_versions())
                held = None
                failed += 1
                say(f"{tag}FAILED {what}: {type(e).__name__}: {e}  [{progress_line(db, sweep)}]")
                continue
            seconds = time.perf_counter() - t0
            if db.finish(row["key"], worker, result):
                held = None
                done += 1
                sp = result["sparsity"]
                warn = one_class_warning(result)
                say(f"{tag}finished {what}: {score_text(cfg.task, result)}, sparsity "
                     f"{sp['overall']:.1%}, {format_duration(seconds)}  [{progress_line(db, sweep)}]"
                     + (f"\n{tag}  WARNING: {warn}" if warn else ""))
            else:
                held = None
                say(f"{tag}{what} was finished by another worker meanwhile; kept the first result")
    except (KeyboardInterrupt, SystemExit, DependencyError):
        if held is not None:
            with ctrl_c_ignored():
                db.release(held, worker)
                say(f"{tag}interrupted; its run is pending again")
        raise
    finally:
        db.close()
    return {"done": done, "failed": failed}


# -- a sweep: enqueue, then one worker here or several in subprocesses -------------------------------------
def enqueue(spec: SweepSpec, db_path=None, *, retry_failed: bool = False) -> ResultsDB:
    check_runs(spec)
    db = ResultsDB(db_path or spec.db)
    new, known = db.add_runs(spec.name, spec.config_dicts(), plans=[c.display_plan for c in spec.configs])
    again = db.retry_failed(spec.name) if retry_failed else 0
    print(f"sweep {spec.name}: {len(spec.configs)} runs ({new} new, {known} already in {db.path}"
          + (f", {again} failed ones to retry" if again else "") + ")")
    return db


def summary_lines(db: ResultsDB, sweep: str) -> list[str]:
    c = db.counts(sweep)
    lines = [f"sweep {sweep}: " + ", ".join(f"{n} {s}" for s, n in c.items())]
    for r in db.runs(sweep, status="failed"):
        last = (r["error"] or "").strip().splitlines()[-1:] or ["?"]
        lines.append(f"  failed {r['key'][:10]} {r['task']} | {r['plan']} | seed {r['seed']}: {last[0]}")
    if c["failed"]:
        lines.append("  (run again with --retry-failed to retry the failed runs)")
    return lines


def _die_with_parent():  # Linux: a worker ends when the sweep that started it is killed
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_workers(spec_path: Path, db_path: Path, gpus: list[str | None], *, glue_dir=None, lease: float = 120.0,
                  extra_args: list[str] = ()) -> int:
    """Run one worker process per entry of ``gpus`` (a CUDA_VISIBLE_DEVICES value, or None to leave it). A worker
    that --run-timeout stopped (``EXIT_TIMED_OUT``) is replaced by a new one on the same GPU."""
    def start(i: int, gpu: str | None) -> subprocess.Popen:
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        cmd = [sys.executable, "-m", "sparseattn.cli", "sweep", str(spec_path), "--db", str(db_path), "--workers", "1",
               "--no-enqueue", "--no-progress", "--lease", str(lease), "--worker-label", f"w{i}", *extra_args]
        if glue_dir:
            cmd += ["--glue-dir", str(glue_dir)]
        return subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    procs = [start(i, gpu) for i, gpu in enumerate(gpus)]
    codes: list[int | None] = [None] * len(procs)
    try:
        while None in codes:
            for i, p in enumerate(procs):
                if codes[i] is None and (code := p.poll()) is not None:
                    if code == EXIT_TIMED_OUT:
                        print(f"[w{i}] stopped by --run-timeout; a new worker takes its place", flush=True)
                        procs[i] = start(i, gpus[i])
                    else:
                        codes[i] = code
            time.sleep(0.2)
    except KeyboardInterrupt:
        # Ctrl-C reached the workers too (one process group): let them give their runs back undisturbed;
        # a worker still there after that (this process alone was interrupted) is asked, then told, to stop
        with ctrl_c_ignored():
            for sig, wait in ((None, 15), (signal.SIGINT, 30), (signal.SIGKILL, None)):
                for p in procs:
                    if sig is not None and p.poll() is None:
                        p.send_signal(sig)
                try:
                    for p in procs:
                        p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        raise
    return max(codes) if codes else 0


def visible_gpus(workers: int, gpus: str | None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of ``workers`` workers: from --gpus, else one visible GPU each."""
    if gpus:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if workers > len(ids):
            ids = [ids[i % len(ids)] for i in range(workers)]  # several workers share a GPU
        return ids[:workers]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [g for g in visible.split(",") if g]
    else:
        try:
            ids = [str(i) for i in range(torch.cuda.device_count())]
        except Exception:
            ids = []
    if not ids:
        return [None] * workers
    return [ids[i % len(ids)] for i in range(workers)]


def write_report(db_paths, out_dir, *, sweep: str | None = None, title: str | None = None) -> dict:
    """Write report.md, report.html, results.csv and plots/ under ``out_dir`` from the database at ``db_paths`` (its
    runs of ``sweep``, or all), or from several pooled: the databases of one study's sweeps run apart (two specs,
    two machines). A run in several of them counts once, by its key, the finished copy first."""
    paths = [Path(db_paths)] if isinstance(db_paths, (str, Path)) else [Path(p) for p in db_paths]
    runs: dict[str, dict] = {}
    without = {}
    for path in paths:
        db = ResultsDB(path, readonly=True)  # says so when there is none
        try:
            if sweep is not None and sweep not in db.sweeps():
                without[path] = db.sweeps()
                continue
            for run in db.runs(sweep):
                kept = runs.get(run["key"])
                if kept is None or (kept["status"] != "done" and run["status"] == "done"):
                    runs[run["key"]] = run
        finally:
            db.close()
    if len(without) == len(paths):
        raise ValueError("; ".join(f"{p} has no sweep {sweep!r}; it has {names}" for p, names in without.items()))
    statuses = [run["status"] for run in runs.values()]
    counts = {s: statuses.count(s) for s in STATUSES}
    title = title or f"sparseattn results: {sweep or ' + '.join(p.name for p in paths)}"
    return write_report_files(list(runs.values()), out_dir, title=title, counts=counts)
