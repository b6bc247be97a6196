"""Attention Pruning on a GLUE task as one sweep run (``method: prune``).

A run with ``prune = p`` (percent) and ``mask = 'ap'`` or ``'random'``:

1. fine-tunes the dense model on the task (the p = 0 run; its checkpoint is shared by every run with the
   same training options and made once, whichever worker gets there first);
2. averages that model's attention over the task's training examples (``collect_attention``, at the
   fine-tuning max_length, longer examples truncated as fine-tuning does), also made once;
3. keeps the pairs of highest average attention, pruning p% of the allowed pairs per layer (``scope``,
   ``budget`` as in ``sparseattn ap mask``), or, for ``mask = 'random'``, as many uniformly drawn ones;
4. re-fine-tunes the pretrained model under that mask and returns its results, with a ``pruning`` section.

The shared checkpoint, averages and masks live in ``work_dir`` (a sweep uses ``<database>.work/``),
under a hash of the dense run's configuration, written atomically and guarded by a file lock, so
concurrent workers and killed runs never leave half-made files behind.

Under torchrun the run is data-parallel (``training.distributed``): rank 0 holds the lock for its group and
decides what is missing, the ranks make it together (the dense fine-tune, the averages: each its share of
the data), rank 0 alone writes it, and every rank waits until it is there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..models import load_model, load_tokenizer, resolve_model
from ..paths import cache_dir
from ..plans.io import plan_metadata, save_plan
from ..training.config import FinetuneConfig
from ..training.data import load_examples
from ..training.distributed import Distributed
from ..training.distributed import from_env as distributed_from_env
from ..training.finetune import finetune
from ..training.loop import resolve_device
from ..training.methods import Method, register_method
from .collect import AttentionStats, Example, collect_attention
from .mask import attention_pruning_mask, check_prune_options, data_report, grid_report, mask_plan, random_like
from .work import dense_run_result, prepare_run

MASKS = ("ap", "random")
SCOPES = ("layer", "head")
BUDGETS = ("data", "grid")
COLLECT_FROM = ("finetuned", "pretrained")


@dataclass
class PruneGlueConfig(FinetuneConfig):
    """A FinetuneConfig (the training of the dense and the pruned model alike) plus the mask to make."""

    prune: float = 0.0  # percent of the allowed pairs pruned, in [0, 100); 0 is the dense run itself
    mask: str = "ap"  # ap (lowest average attention pruned) or random (as many, uniformly drawn)
    scope: str = "layer"  # one threshold per layer (heads pooled) or per head
    budget: str = "data"  # p% of the training examples' allowed pairs (data) or of the grid's entries (grid)
    collect_from: str = "finetuned"  # whose attention is averaged: the dense fine-tuned model or the pretrained
    collect_limit: int | None = None  # average over this many training examples (default: those trained on)
    method: str = "prune"

    method_name = "prune"

    def __post_init__(self):
        super().__post_init__()
        check_prune_options(self, "prune", {"mask": MASKS, "scope": SCOPES, "budget": BUDGETS,
                                            "collect_from": COLLECT_FROM})
        if self.collect_limit is not None and (isinstance(self.collect_limit, bool)
                                               or not isinstance(self.collect_limit, int) or self.collect_limit < 1):
            raise ValueError(f"collect_limit must be a positive integer or None, got {self.collect_limit!r}")
        if self.prune == 0:  # the dense run: the mask options mean nothing, so every p = 0 run is one run
            self.mask, self.scope, self.budget = "ap", "layer", "data"

    def dense_config(self) -> FinetuneConfig:
        """The dense fine-tune this run starts from (its p = 0 run)."""
        return FinetuneConfig(**{**self.finetune_options(), "plan": "dense"})

    @property
    def display_plan(self) -> str:
        if self.prune == 0:
            return "dense"
        what = "attention_pruning" if self.mask == "ap" else "random_pruning"
        return f"{what}({self.prune:g}%, {self.scope})"


def prepare(cfg: PruneGlueConfig, work_dir, *, glue_dir=None, device=None, progress: bool = True,
            dist: Distributed | None = None) -> dict:
    """Make (or find) the dense checkpoint, the attention averages and this run's mask; returns the paths
    {'dense': folder with results.json and model/, 'stats': file, 'plan': saved plan folder or None}.
    dist: the data-parallel group (its process group joined), whose ranks all call this."""
    dist = dist or Distributed()
    dense_cfg = cfg.dense_config()
    limit = cfg.collect_limit if cfg.collect_limit is not None else cfg.limit_train

    def train_dense(tmp: Path) -> None:
        finetune(dense_cfg, glue_dir=glue_dir, out_dir=tmp, device=device, progress=progress, save_model=True)

    def collect(dense_dir: Path) -> AttentionStats:
        train = load_examples(cfg.task, "train", limit, glue_dir)  # the examples fine-tuning uses
        source = str(dense_dir / "model") if cfg.collect_from == "finetuned" else resolve_model(cfg.model)
        model = load_model(source, task="base").to(resolve_device(dist.device(device)))
        return collect_attention(model, load_tokenizer(source), [Example(e.text, e.pair) for e in train],
                                 length=cfg.max_length, batch_size=64, longer="truncate", progress=progress,
                                 metadata={"model": source, "data": f"GLUE {cfg.task} train"}, dist=dist)

    def make_plan(tmp: Path, stats_file: Path) -> None:
        stats = AttentionStats.load(stats_file)
        keep = attention_pruning_mask(stats, cfg.prune / 100, scope=cfg.scope, budget=cfg.budget)
        if cfg.mask == "random":
            keep = random_like(keep, stats, scope=cfg.scope, budget=cfg.budget, seed=cfg.seed)
        plan = mask_plan(keep, prefix=cfg.mask)
        meta = {"mask": cfg.mask, "prune_percent": cfg.prune, "scope": cfg.scope, "budget": cfg.budget,
                "stats_file": stats_file.name, "stats": stats.metadata,
                "grid_sparsity": grid_report(plan, stats).overall,
                "collected_sparsity": data_report(keep, stats).overall}
        save_plan(plan, tmp, num_layers=stats.num_layers, num_heads=stats.num_heads, length=stats.length,
                  metadata=meta)

    name = f"{cfg.mask}-{cfg.scope}-{cfg.budget}-p{cfg.prune:g}" + (f"-seed{cfg.seed}" if cfg.mask == "random" else "")
    return prepare_run(work_dir, dense_cfg, dist, train_dense=train_dense, prune=cfg.prune,
                       stats_name=f"attention-{cfg.collect_from}-{limit or 'all'}.safetensors", collect=collect,
                       plan_name=name, make_plan=make_plan)


def prune_glue(cfg: PruneGlueConfig, *, glue_dir=None, work_dir=None, device=None, progress: bool = True,
               out_dir=None) -> dict:
    """Run one Attention Pruning configuration; returns the fine-tune's results with a ``pruning`` section.
    work_dir: where shared checkpoints, averages and masks go (default: <cache>/prune). Under torchrun
    data-parallel: every step with all ranks, rank 0 alone writing."""
    work_dir = Path(work_dir) if work_dir is not None else cache_dir() / "prune"
    dist = distributed_from_env()
    with dist.joined(resolve_device(dist.device(device))):
        return _prune_glue(cfg, dist, glue_dir=glue_dir, work_dir=work_dir, device=device,
                           progress=progress and dist.is_main, out_dir=out_dir)


def _prune_glue(cfg: PruneGlueConfig, dist: Distributed, *, glue_dir, work_dir, device, progress, out_dir) -> dict:
    made = prepare(cfg, work_dir, glue_dir=glue_dir, device=device, progress=progress, dist=dist)
    if made["plan"] is None:  # p = 0: the dense fine-tune is this run
        result = dense_run_result(made["dense"])
    else:
        run_cfg = replace(cfg.dense_config(), plan=str(made["plan"]), plan_digest=None)  # the mask's folder
        result = finetune(run_cfg, glue_dir=glue_dir, out_dir=out_dir, device=device, progress=progress)
        meta = plan_metadata(made["plan"])["metadata"]
        result["pruning"] = {"prune_percent": cfg.prune, "mask": cfg.mask, "scope": cfg.scope, "budget": cfg.budget,
                             "collect_from": cfg.collect_from, "plan_folder": str(made["plan"]),
                             "grid_sparsity": meta.get("grid_sparsity"),
                             "train_sparsity": meta.get("collected_sparsity")}
    result["config"] = cfg.to_dict()
    return result


register_method(Method("prune", PruneGlueConfig, prune_glue, shares_work=True))
