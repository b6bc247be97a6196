"""The shared work folder of Attention Pruning runs (GLUE and language models): a dense checkpoint, its attention
averages and the masks made from them serve every run that prunes them, so each is made once, under a lock,
into a temporary sibling that is moved into place when finished. A killed attempt leaves only that sibling,
which the next attempt removes. In a data-parallel group every rank does the work (training, collecting) and
rank 0 alone decides, writes and publishes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..training.distributed import Distributed
from ..training.record import run_key

if TYPE_CHECKING:
    from .collect import AttentionStats


@contextlib.contextmanager
def locked(path: Path, dist: Distributed | None = None):
    """An exclusive lock held while the block runs; the OS drops it if the process dies. In a data-parallel
    group rank 0 holds it for the group (its other ranks follow rank 0's decisions, see ``make_once``)."""
    if dist is not None and not dist.is_main:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fresh(path: Path, dist: Distributed | None = None) -> Path:
    """A clean temporary sibling of ``path`` (left-overs of a killed attempt are removed, by rank 0 alone)."""
    tmp = path.with_name(path.name + ".partial")
    if (dist is None or dist.is_main) and tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return tmp


def make_once(path: Path, make: Callable[[Path], None], dist: Distributed, *, done: Path | None = None) -> None:
    """Make ``path`` unless ``done`` (default: ``path`` itself; a folder's last file) exists, as rank 0 sees it:
    every rank of a group calls ``make``, or none. ``make(tmp)`` writes into a fresh temporary sibling, which
    rank 0 then moves into place while the other ranks wait for it there."""
    if not dist.broadcast(not (done or path).exists()):
        return
    tmp = fresh(path, dist)
    make(tmp)
    if dist.is_main:
        os.replace(tmp, path)
    dist.barrier()


def prepare_run(work_dir, dense_cfg, dist: Distributed, *, train_dense: Callable[[Path], None], prune: float,
                stats_name: str, collect: Callable[[Path], "AttentionStats"], plan_name: str,
                make_plan: Callable[[Path, Path], None]) -> dict:
    """The steps every Attention Pruning run shares, each made once under the work folder's lock, in
    ``<work_dir>/<the dense run's key>/``: the dense model (``train_dense(tmp)``, a folder with results.json and
    model/), its attention averages (``collect(dense_dir)``, run by every rank, saved by rank 0 as the file
    ``stats_name``) and this run's plan (``make_plan(tmp, stats_file)``, called on rank 0 alone, the folder
    ``plans-<stats>/<plan_name>``). A run that prunes nothing (``prune`` 0) is the dense one. Returns {'dense',
    'stats', 'plan'} (None where not made)."""
    root = Path(work_dir) / run_key(dense_cfg.to_dict())[:16]
    dense_dir = root / "dense"
    with locked(root / ".lock", dist):
        make_once(dense_dir, train_dense, dist, done=dense_dir / "results.json")
        if dist.is_main:
            (root / "config.json").write_text(json.dumps(dense_cfg.to_dict(), indent=1) + "\n")
        if prune == 0:
            return {"dense": dense_dir, "stats": None, "plan": None}
        stats_file = root / stats_name
        plan_dir = root / f"plans-{stats_file.stem}" / plan_name

        def stats(tmp: Path) -> None:
            collected = collect(dense_dir)  # every rank collects its share; each gets the sums of all
            if dist.is_main:
                collected.save(tmp)

        def plan(tmp: Path) -> None:
            if dist.is_main:  # cheap: rank 0 alone makes the plan
                make_plan(tmp, stats_file)

        make_once(stats_file, stats, dist)
        make_once(plan_dir, plan, dist, done=plan_dir / "plan.json")
    return {"dense": dense_dir, "stats": stats_file, "plan": plan_dir}


def dense_run_result(dense_dir: Path) -> dict:
    """The results of the run that prunes nothing: the dense run itself (its results.json), with the pruning
    section that says so."""
    result = json.loads((dense_dir / "results.json").read_text())
    result["pruning"] = {"prune_percent": 0.0, "mask": None, "checkpoint": str(dense_dir / "model")}
    return result
