"""A run method for the Ray sweep's tests: it sleeps, records each time it runs, and can kill its own process.

Imported by the tests and, by name, by the Ray workers that run it (the tests put this folder on their path),
so the method registers in both."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sparseattn.training.config import FinetuneConfig
from sparseattn.training.methods import Method, register_method


@dataclass
class SleepConfig(FinetuneConfig):
    sleep: float = 0.5  # seconds the run takes
    marks: str = ""  # a folder: each execution appends "pid start end" to <seed>.log (end 0 until it ends)
    die_once: bool = False  # the first execution SIGKILLs its own process (a worker that dies mid-run)
    meet: int = 0  # before sleeping, wait (up to 60 s) until this many runs have started: they run at once if
    # the scheduler lets them, however long Ray takes to start its worker processes
    method: str = "sleep-test"

    method_name = "sleep-test"


def executions(marks, seed: int) -> list[list[float]]:
    """Each execution of run ``seed``: [pid, start, end] (end 0: it never ended)."""
    f = Path(marks) / f"{seed}.log"
    return [list(map(float, line.split())) for line in f.read_text().splitlines()] if f.exists() else []


def run_sleep(cfg: SleepConfig, *, glue_dir=None, progress: bool = True, **_) -> dict:
    log = Path(cfg.marks) / f"{cfg.seed}.log"
    first = not log.exists()
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {time.time()} 0\n")
    if cfg.die_once and first:
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.time() + 60
    while len(list(Path(cfg.marks).glob("*.log"))) < cfg.meet and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(cfg.sleep)
    lines = log.read_text().splitlines()
    lines[-1] = lines[-1].rsplit(" ", 1)[0] + f" {time.time()}"
    log.write_text("\n".join(lines) + "\n")
    return {"task": cfg.task, "main_metric": "accuracy", "score": cfg.seed / 10, "metrics": {"accuracy": cfg.seed / 10},
            "sparsity": {"overall": 0.0, "applied": 0.0, "per_layer": [0.0]}}


register_method(Method("sleep-test", SleepConfig, run_sleep))
