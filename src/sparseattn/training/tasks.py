"""What a results table needs to know about a run's task, whichever method ran it: its title, its metrics,
the one that ranks runs, whether higher is better, and how values print.

A GLUE task (``training.glue``) scores fractions (printed x100, higher is better); a language-modelling
corpus (the ``lm`` methods' ``task``, e.g. ``books``) scores perplexity (printed as is, lower is better).
"""

from __future__ import annotations

from dataclasses import dataclass

from .glue import get_task


@dataclass(frozen=True)
class TaskInfo:
    name: str
    title: str  # how tables and plots name it
    metrics: tuple[str, ...]
    main_metric: str
    higher_is_better: bool = True
    scale: float = 100.0  # printed value = scale x stored value
    split: str = "dev"  # what the metrics are measured on, for axis labels


def task_info(name: str) -> TaskInfo:
    """The GLUE task of that name, else a language-modelling corpus of that name."""
    try:
        t = get_task(name)
    except ValueError:
        return TaskInfo(name, f"{name} (language modelling)", ("perplexity", "loss"), "perplexity",
                        higher_is_better=False, scale=1.0, split="validation")
    return TaskInfo(t.name, t.folder, t.metrics, t.main_metric)


def score_text(task: str, result: dict) -> str:
    """A run's main metric as progress lines print it: 'accuracy 91.40' (GLUE, x100) or 'perplexity 37.21'."""
    return f"{result['main_metric']} {task_info(task).scale * result['score']:.2f}"
