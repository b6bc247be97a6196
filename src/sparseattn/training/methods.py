"""The registry of run methods: what a sweep run's ``method`` field names, its config class and how it runs.

A method registers itself when its module is imported (``register_method``), as the CLI's command modules
do; ``METHOD_MODULES`` lists those modules by name, and they are imported on the first lookup, so that
this registry, and the sweeps dispatching through it, import no method.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Callable

from .config import FinetuneConfig

# Modules that register a method, each with register_method(...) at import.
METHOD_MODULES = [
    "sparseattn.training.finetune",  # finetune
    "sparseattn.learned.glue",  # learn
    "sparseattn.pruning.glue",  # prune
    "sparseattn.lm.train",  # lm (a causal language model trained under a plan)
    "sparseattn.pruning.lm",  # prune-lm (Attention Pruning of a causal language model)
]


@dataclass(frozen=True)
class Method:
    """A run method. ``run(config, *, glue_dir, out_dir, device, progress, ...)`` returns the results record;
    ``shares_work``: it also takes ``work_dir``, where runs of one database keep what they share."""

    name: str
    config: type[FinetuneConfig]
    run: Callable[..., dict]
    shares_work: bool = False


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.config.method_name != method.name:
        raise ValueError(f"{method.config.__name__}.method_name is {method.config.method_name!r}, but the method "
                         f"registers as {method.name!r}")
    _METHODS[method.name] = method
    return method


def _load_all() -> None:
    for name in METHOD_MODULES:
        importlib.import_module(name)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        _load_all()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; expected {', '.join(map(repr, available_methods()))}")
    return _METHODS[name]


def available_methods() -> list[str]:
    _load_all()
    return list(_METHODS)


def config_class(method: str) -> type[FinetuneConfig]:
    """The config class of a run method: FinetuneConfig for "finetune", LearnGlueConfig for "learn",
    PruneGlueConfig for "prune" (Attention Pruning)."""
    return get_method(method).config


def config_from_dict(d: dict) -> FinetuneConfig:
    """A run's config of whichever method ``d['method']`` names (default finetune)."""
    return config_class(d.get("method", "finetune")).from_dict(_coerce(d))


def run_config(cfg: FinetuneConfig, *, work_dir=None, **kw) -> dict:
    """Run one config with its method; returns the results dict. work_dir: where runs that share work (prune
    runs: dense checkpoints, attention averages, masks) keep it."""
    method = get_method(cfg.method)
    return method.run(cfg, **kw, **({"work_dir": work_dir} if method.shares_work else {}))


def _coerce(cfg: dict) -> dict:
    """YAML 1.1 reads 5e-5 as a string; turn strings into numbers where the field is a number."""
    types = {f.name: str(f.type) for f in fields(config_class(cfg.get("method", "finetune")))}
    out = {}
    for k, v in cfg.items():
        t = types.get(k, "")
        if isinstance(v, str) and t.startswith("float"):
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"{k} must be a number, got {v!r}") from None
        elif isinstance(v, float) and t.startswith("int") and v.is_integer():
            v = int(v)
        out[k] = v
    return out
