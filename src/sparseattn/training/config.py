"""What a fine-tuning run does: ``FinetuneConfig``, the configuration every method's config extends.

It holds everything that decides the result (a sweep's run key hashes it); where the data comes from,
where results go and how progress shows are arguments of the run, not fields.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import ConfigError, ConfigTypeError
from ..models import resolve_model
from ..plans.io import as_plan, is_plan_path
from .glue import canonical_split, get_task


@dataclass
class FinetuneConfig:
    """What a fine-tuning run does. Every field is part of a sweep run's identity."""

    task: str = "sst2"
    plan: str = "dense"  # a plan spec, or a saved plan's folder
    model: str | None = None  # hub id or path; None = the packaged all-MiniLM-L6-v2
    seed: int = 0
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 128
    warmup: float = 0.06  # fraction of the optimizer steps spent warming the learning rate up from 0
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    max_grad_norm: float = 1.0  # 0 = no clipping
    limit_train: int | None = None  # a fixed random subset (independent of seed) of this many train examples
    limit_eval: int | None = None  # likewise for the evaluation split
    eval_split: str = "dev"
    backend: str = "reference"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16
    parser: str | None = None  # spaCy pipeline for syntax / lexical patterns (default when the plan needs one)
    plan_digest: str | None = None  # for a saved plan's folder: a hash of its files (filled in; part of the run key)
    method: str = "finetune"  # the registered method that runs this config (sparseattn.training.methods)
    # Several examples per row, rows of this many tokens (True: max_length); None: one padded row per example.
    # Left out of ``to_dict`` when None, so the run keys of unpacked runs are what they were before it existed.
    pack: int | None = None

    method_name = "finetune"  # class attribute: the method this config class runs

    def __post_init__(self):
        self.task = self.canonical_task(self.task)
        self.plan = canonical_plan(self.plan)
        digest = plan_digest(self.plan)
        if self.plan_digest is not None and self.plan_digest != digest:
            raise ConfigError(f"the plan folder {self.plan} changed since this run was configured (its files hash "
                              f"to {digest}, the run was made for {self.plan_digest}); queue the run again")
        self.plan_digest = digest
        if self.method != type(self).method_name:
            raise ConfigError(f"method {self.method!r} does not fit {type(self).__name__}; use "
                              "sparseattn.training.methods.config_from_dict to build a run of any method")
        for name in ("epochs", "batch_size", "max_length", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and name != "seed") or v < 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name, lowest in (("lr", None), ("weight_decay", 0), ("max_grad_norm", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    (v <= 0 if lowest is None else v < lowest):
                raise ConfigError(f"{name} must be a finite number {'> 0' if lowest is None else '>= 0'}, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float)) or not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        for name in ("limit_train", "limit_eval"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}")
        self.check_eval_split()
        from ..backends import available_backends  # here: importing the backends takes seconds

        if not isinstance(self.backend, str) or self.backend not in available_backends():
            raise ConfigError(f"unknown backend {self.backend!r}; expected one of {', '.join(available_backends())}")
        if self.parser is not None and not isinstance(self.parser, str):
            raise ConfigTypeError(f"parser must be the name of a spaCy pipeline or None, got {self.parser!r}")
        self.check_pack()
        resolve_model(self.model)  # a model path that does not exist fails here

    def check_pack(self) -> None:
        """``pack``: None, or a row length that holds the longest example (True stands for max_length). Only a plain
        fine-tune packs its batches, and only for plans of positions: packed rows carry no word structure."""
        if self.pack is None or self.pack is False:
            self.pack = None
            return
        if self.pack is True:
            self.pack = self.max_length
        if isinstance(self.pack, bool) or not isinstance(self.pack, int) or self.pack < self.max_length:
            raise ConfigError(f"pack must be a row length of at least max_length={self.max_length} tokens (every "
                              f"example must fit in a row), true (rows of max_length) or none, got {self.pack!r}")
        if self.method != "finetune":
            raise ConfigError(f"pack={self.pack}: method {self.method!r} does not pack its batches; only finetune does")
        if as_plan(self.plan).input_dependent:
            raise ConfigError(f"pack={self.pack} with the plan {self.plan!r}: packed rows carry no word structure or "
                              "special-token marks, which its input-dependent patterns need; leave pack out")

    def shape(self, shape_of=None) -> tuple[int, int, int | None]:
        """(layers, heads, max positions) of the model this run trains, from its config alone, through
        ``shape_of`` (``model_shape``, or a memo of it over many runs)."""
        return (shape_of or model_shape)(self.model)

    def check_model_shape(self, num_layers: int, num_heads: int, max_positions: int | None) -> None:
        """What only the model's shape can tell: max_length fits its positions, the plan's layers and heads
        are in range (PlanError names the rule)."""
        if max_positions and self.max_length > max_positions:
            raise ConfigError(f"max_length={self.max_length} is more than the model's {max_positions} positions")
        as_plan(self.plan).resolve(num_layers, num_heads)

    @staticmethod
    def canonical_task(task: str) -> str:
        """The task's canonical name (a GLUE task here; a method on other data overrides this)."""
        if not isinstance(task, str):
            raise ConfigTypeError(f"task must be the name of a GLUE task, got {task!r}")
        return get_task(task).name

    def check_eval_split(self) -> None:
        """The evaluation split names one of the task's splits; kept as written (it is part of the run key)."""
        canonical_split(get_task(self.task), self.eval_split)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        if not isinstance(d, dict):
            raise ConfigTypeError(f"a run's options must be a mapping, got {type(d).__name__}")
        bad = [k for k in d if not isinstance(k, str)]
        if bad:
            raise ConfigTypeError(f"option names must be strings, got {bad[0]!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown fine-tune option(s) {', '.join(map(repr, unknown))}; expected some of "
                              f"{', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d.get("pack") is None:  # unpacked runs keep the keys they had before packing existed
            d.pop("pack", None)
        return d

    def finetune_options(self) -> dict:
        """The fields a plain fine-tune shares with this config (a method's own options left out)."""
        return {f: getattr(self, f) for f in FinetuneConfig.__dataclass_fields__
                if f not in ("method", "plan_digest", "pack")}

    @property
    def display_plan(self) -> str:
        """How results tables name this run's plan."""
        return self.plan


def canonical_plan(plan: str) -> str:
    """The plan's canonical spec (so 'later-half:neighbour(2)' and 'later-half: neighbour(2)' are one
    run); a saved plan's folder stays a path."""
    if not isinstance(plan, str):
        raise ConfigTypeError(f"plan must be a spec string or a saved plan's folder, got {type(plan).__name__}")
    if is_plan_path(plan):
        return plan
    return as_plan(plan).spec()  # a path that is not a saved plan says so


def model_shape(model: str | None) -> tuple[int, int, int | None]:
    """(layers, heads, max positions) of a model, from its config alone (no weights are loaded)."""
    import transformers  # here, not at the top: importing transformers takes seconds

    path = resolve_model(model)
    try:
        cfg = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {path!r} cannot be loaded: {e}") from None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return cfg.num_hidden_layers, cfg.num_attention_heads, getattr(cfg, "max_position_embeddings", None)


def plan_digest(plan: str) -> str | None:
    """A hash of a saved plan folder's files, so a sweep never mistakes a rewritten folder for the same run;
    None for a plan spec (the spec is its own identity)."""
    if not is_plan_path(plan):
        return None
    folder = Path(plan) if Path(plan).is_dir() else Path(plan).parent
    h = hashlib.sha256()
    for name in ("plan.json", "masks.safetensors"):
        f = folder / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]
