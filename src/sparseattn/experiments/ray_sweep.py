"""A sweep's runs as Ray tasks (``sparseattn sweep SPEC --ray [ADDRESS]``): one driver, a cluster of workers.

The driver is an ordinary sweep worker of the results database that, instead of running the runs it claims,
hands each to Ray as a task asking for its share of a GPU (``gpus_per_run``: a whole GPU, or a fraction such
as 0.25 to pack four small fine-tunes on one GPU) and of the CPUs. It claims only as many runs
as the cluster has room for, so a run is 'running' in the database while it runs, and the sweep's progress
lines mean what they mean in a plain sweep.

The database stays the single record and the driver alone writes it: a task returns its results record (or
its failure) to the driver, which keeps it as a plain worker does (``<db>.kept/<key>.json`` first, then the
database). The database therefore lives on the driver's disk (SQLite wants a local file system); nothing
on the workers needs to reach it.

Faults:

- A task's run that raises is a failed run, recorded with its traceback as in a plain sweep (not retried;
  ``--retry-failed`` runs it again).
- A worker process or node that dies takes its task with it: Ray runs the task again, up to ``max_retries``
  times, and only then is the run recorded as failed, with Ray's account of the death. Within one claim by
  the driver, so the database's ``attempts`` does not count these; the result's ``ray`` section says where
  the attempt that finished ran.
- The driver killed at any moment: its tasks end with it (Ray's tasks belong to the process that submitted
  them), its runs are still 'running' under its process id, and the next sweep on the same host takes them
  up at once (another host: when their lease, renewed by the driver, runs out). Runs the driver had recorded
  stay done; a result that had reached no file yet is lost with the driver and the run is done again, as in
  a plain sweep killed between a run's end and its record.
- Ctrl-C (or SIGTERM): at the driver loop's next turn (within 5 s), the running tasks are cancelled and their runs
  given back as pending.

What a run writes besides its record (prune runs: the shared dense checkpoint, attention averages and masks)
goes to ``work_dir`` (default ``<db>.work/``), which every node must see at the same path (shared storage)
for runs on several nodes to share it; each node would otherwise make its own copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from ..errors import ConfigError, DependencyError
from ..training.methods import Method, config_from_dict, get_method
from ..training.record import one_class_warning, package_versions
from ..training.tasks import score_text
from .db import Heartbeat, ResultsDB, WorkerId
from .sweep import ctrl_c_ignored, format_duration, progress_line, work_dir_of

INSTALL = "pip install 'sparseattn[ray]'"
TASK_NAME = "sparseattn_run"  # a worker process running a run is titled ray::sparseattn_run


def import_ray():
    """Ray, imported on first use (an optional extra); DependencyError naming the install line without it."""
    try:
        import ray
    except ImportError as e:
        raise DependencyError(f"--ray needs Ray, which is not installed ({e}); install it with: {INSTALL}") from None
    return ray


def check_share(gpus_per_run: float | None, cpus_per_run: float) -> None:
    """A run is one process on at most one GPU: its share is a fraction of a GPU in (0, 1], or 0 (CPU only)."""
    g = gpus_per_run
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)
                          or not 0 <= g <= 1):
        raise ConfigError(f"--gpus-per-run must be a share of one GPU in (0, 1] (0.25: four runs a GPU) or 0 (CPU "
                          f"only), got {gpus_per_run!r}; a run is one process on one GPU (several GPUs for one run: "
                          "torchrun, docs/cluster.md)")
    c = cpus_per_run
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
        raise ConfigError(f"--cpus-per-run must be a number of CPUs > 0 (a fraction too), got {cpus_per_run!r}")


def connect(ray, address: str | None) -> bool:
    """Join the cluster at ``address`` ('auto': the one running on this machine, as ``ray start`` made it), or
    start a Ray instance here when None. An instance this process already holds (``ray.init`` in a script or a
    test) is used as it is. Returns whether this call connected (and so should disconnect at the end)."""
    if ray.is_initialized():
        return False
    # log_to_driver off: workers' own output (transformers' warnings, tracebacks) would interleave with the
    # sweep's progress lines; each run's outcome comes back in its result, its output stays in Ray's logs.
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        ray.init(address=address or None, **kw)
    except ConnectionError as e:
        raise ConfigError(f"--ray {address}: no Ray cluster to join there ({e}); start one with `ray start --head` "
                          "or give no address to start Ray here") from None
    return True


def _share(ray, gpus_per_run: float | None, cpus_per_run: float) -> dict:
    """Ray resources of one run: the GPU share asked for (default: one GPU when the cluster has any, else none)."""
    total = ray.cluster_resources()
    gpus = gpus_per_run if gpus_per_run is not None else (1.0 if total.get("GPU", 0) > 0 else 0.0)
    if gpus > 0 and total.get("GPU", 0) < gpus:
        raise ConfigError(f"--gpus-per-run {gpus:g}, but the Ray cluster has {total.get('GPU', 0):g} GPUs; give "
                          "--gpus-per-run 0 to run on CPUs")
    if total.get("CPU", 0) < cpus_per_run:
        raise ConfigError(f"--cpus-per-run {cpus_per_run:g}, but the Ray cluster has {total.get('CPU', 0):g} CPUs")
    return {"num_gpus": float(gpus), "num_cpus": float(cpus_per_run)}


def _slots(ray, share: dict) -> int:
    """How many runs of this share the cluster holds at once now (nodes may join or leave during a sweep)."""
    total = ray.cluster_resources()
    n = math.floor(total.get("CPU", 0) / share["num_cpus"] + 1e-9)
    if share["num_gpus"] > 0:
        n = min(n, math.floor(total.get("GPU", 0) / share["num_gpus"] + 1e-9))
    return max(n, 1)  # a cluster between nodes still gets one run queued, which Ray starts when one is back


def run_task(method: Method, config: dict, glue_dir, work_dir) -> dict:
    """One run on a Ray worker: {'result': record} or, when the run raised, {'error': traceback, ...}.

    An ordinary exception is the run's failure and comes back as a value, so Ray does not retry it; only a
    worker's death (Ray's system failures) makes Ray run the task again. The method comes resolved from the
    driver, so a method registered in the driver's process runs wherever its module can be imported."""
    import ray
    import transformers  # here, not at the top: importing transformers takes seconds

    transformers.logging.set_verbosity_error()  # every run loads a new classification head: expected, not news
    transformers.utils.logging.disable_progress_bar()
    ctx = ray.get_runtime_context()
    where = {"node": ray.util.get_node_ip_address(), "pid": os.getpid(),
             "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
             "resources": ctx.get_assigned_resources(), "started": time.time()}
    try:
        cfg = method.config.from_dict(config)
        result = method.run(cfg, glue_dir=glue_dir, progress=False,
                            **({"work_dir": work_dir} if method.shares_work else {}))
    except Exception as e:
        return {"error": traceback.format_exc(), "summary": f"{type(e).__name__}: {e}", "versions": package_versions(),
                "dependency": isinstance(e, DependencyError)}
    where["ended"] = time.time()
    return {"result": {**result, "ray": where}}


def run_ray_sweep(db_path, sweep: str | None = None, *, address: str | None = None,
                  gpus_per_run: float | None = None, cpus_per_run: float = 1.0, max_retries: int = 3,
                  glue_dir=None, work_dir=None, lease: float = 120.0, max_runs: int | None = None, echo=print,
                  label: str | None = None, run_timeout: float | None = None) -> dict:
    """Run the pending runs of ``sweep`` in ``db_path`` as Ray tasks until none is left; returns
    {'done': n, 'failed': n}. Prints the plain sweep's lines: a run started, finished (metric, sparsity, time,
    the sweep's count and time left) or failed. Interrupted, it cancels its tasks and gives their runs back.
    ``run_timeout`` (seconds, counted from when the task is handed to Ray): a task still running after it is
    cancelled (its worker process killed) and its run failed."""
    check_share(gpus_per_run, cpus_per_run)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"--max-retries must be a whole number >= 0, got {max_retries!r}")
    ray = import_ray()
    if glue_dir is None and os.environ.get("GLUE_DIR"):  # workers on other nodes do not see the driver's environment
        glue_dir = os.environ["GLUE_DIR"]
    glue_dir = str(Path(glue_dir).resolve()) if glue_dir else None
    work_dir = str(Path(work_dir or work_dir_of(db_path)).resolve())
    db = ResultsDB(db_path)
    worker = WorkerId(label or "ray")
    connected = False

    def say(line: str) -> None:
        echo(line)
        sys.stdout.flush()

    try:
        connected = connect(ray, address)
        share = _share(ray, gpus_per_run, cpus_per_run)
        remote = ray.remote(run_task).options(name=TASK_NAME, max_retries=max_retries, retry_exceptions=False, **share)
        total = ray.cluster_resources()
        say(f"Ray: {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs; each run takes "
            + (f"{share['num_gpus']:g} GPU and " if share["num_gpus"] else "")
            + f"{share['num_cpus']:g} CPU: {_slots(ray, share)} at once")
        return _drive(ray, db, worker, sweep, remote, share, glue_dir=glue_dir, work_dir=work_dir, lease=lease,
                      max_runs=max_runs, max_retries=max_retries, say=say, run_timeout=run_timeout)
    finally:
        db.close()
        if connected:
            ray.shutdown()


@contextlib.contextmanager
def _interrupts_between_ray_calls():
    """Ctrl-C and SIGTERM noted when they come and raised as KeyboardInterrupt by the returned check, which the
    driver's loop calls between its calls into Ray (at least every 5 s: ray.wait's timeout). Raised wherever they
    land, they can cut a Ray client call short inside, after which cancelling the tasks may never return (a driver
    hung after Ctrl-C in CI once). Off the main thread, where no handler can be set, the check does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    came: list[int] = []

    def check() -> None:
        if came:
            raise KeyboardInterrupt(f"signal {came[0]}")

    previous = {sig: signal.signal(sig, lambda signum, frame: came.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield check
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _drive(ray, db: ResultsDB, worker: WorkerId, sweep, remote, share: dict, *, glue_dir, work_dir, lease, max_runs, max_retries,
           say, run_timeout: float | None = None) -> dict:
    done = failed = claimed = 0
    tasks: dict = {}  # object ref -> (run key, what, t0)
    with Heartbeat(db, None, worker, lease) as beat, _interrupts_between_ray_calls() as interrupted:
        try:
            while True:
                interrupted()
                # claim while the cluster has room: a claimed run is one that is running
                while len(tasks) < _slots(ray, share) and (max_runs is None or claimed < max_runs):
                    row = db.claim(worker, sweep, lease=lease)
                    if row is None:
                        break
                    claimed += 1
                    cfg = config_from_dict(json.loads(row["config"]))
                    what = f"{cfg.task} | {cfg.display_plan} | seed {cfg.seed}"
                    beat.add(row["key"])
                    ref = remote.remote(get_method(cfg.method), cfg.to_dict(), glue_dir, work_dir)
                    tasks[ref] = (row["key"], cfg.task, what, time.perf_counter())
                    again = f" (attempt {row['attempts']})" if row["attempts"] > 1 else ""
                    say(f"started {what}{again}  [{progress_line(db, sweep)}]")
                    interrupted()
                if not tasks:
                    break
                ready, _ = ray.wait(list(tasks), num_returns=1, timeout=5.0)
                interrupted()
                for ref in ready:
                    key, task, what, t0 = tasks[ref]
                    d, f = _record(ray, db, worker, sweep, ref, key, task, what, t0, max_retries, say)
                    del tasks[ref]  # only once recorded: interrupted before, the run is given back below
                    beat.discard(key)
                    done, failed = done + d, failed + f
                for ref in [r for r, (*_, t0) in tasks.items() if run_timeout and time.perf_counter() - t0 > run_timeout]:
                    key, task, what, t0 = tasks.pop(ref)
                    ray.cancel(ref, force=True)  # a stuck run ends only with its worker process
                    why = f"timed out: still running after {format_duration(run_timeout)} (--run-timeout); Ray " \
                          "killed its worker process"
                    db.fail(key, worker, why, package_versions())
                    beat.discard(key)
                    failed += 1
                    say(f"FAILED {what}: {why}  [{progress_line(db, sweep)}]")
        except (KeyboardInterrupt, SystemExit, DependencyError):
            with ctrl_c_ignored():
                for ref, (key, *_) in tasks.items():
                    ray.cancel(ref, force=True)
                    db.release(key, worker)
                    beat.discard(key)
                if tasks:
                    say(f"interrupted; its {len(tasks)} running run(s) are pending again")
            raise
    return {"done": done, "failed": failed}


def _record(ray, db, worker, sweep, ref, key, task, what, t0, max_retries, say) -> tuple[int, int]:
    """Write one task's outcome to the database: (1, 0) finished, (0, 1) failed, (0, 0) finished elsewhere."""
    try:
        out = ray.get(ref)
    except ray.exceptions.RayError as e:  # the worker (or node) died max_retries + 1 times, or Ray failed the task
        why = f"Ray could not run it ({max_retries + 1} attempt(s)): {type(e).__name__}: {e}"
        db.fail(key, worker, why, package_versions())
        say(f"FAILED {what}: {why.splitlines()[0]}  [{progress_line(db, sweep)}]")
        return 0, 1
    if "error" in out:
        if out["dependency"]:  # no data for any run: stop here, the run is not to blame
            db.release(key, worker)
            raise DependencyError(out["summary"].partition(": ")[2])
        db.fail(key, worker, out["error"], out["versions"])
        say(f"FAILED {what}: {out['summary']}  [{progress_line(db, sweep)}]")
        return 0, 1
    result = out["result"]
    if not db.finish(key, worker, result):
        say(f"{what} was finished by another worker meanwhile; kept the first result")
        return 0, 0
    sp = result["sparsity"]
    warn = one_class_warning(result)
    say(f"finished {what}: {score_text(task, result)}, sparsity {sp['overall']:.1%}, "
        f"{format_duration(time.perf_counter() - t0)}  [{progress_line(db, sweep)}]"
        + (f"\n  WARNING: {warn}" if warn else ""))
    return 1, 0
