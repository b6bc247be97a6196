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
from typing import Callable

from ..training.distributed import Distributed


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


def dense_run_result(dense_dir: Path) -> dict:
    """The results of the run that prunes nothing: the dense run itself (its results.json), with the pruning
    section that says so."""
    result = json.loads((dense_dir / "results.json").read_text())
    result["pruning"] = {"prune_percent": 0.0, "mask": None, "checkpoint": str(dense_dir / "model")}
    return result
