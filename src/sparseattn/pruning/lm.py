"""Attention Pruning of a causal language model as one sweep run (``method: prune-lm``), as the papers do it:
train dense, collect, prune, re-train.

A run with ``prune = p`` (percent) and ``mask``:

1. trains the dense language model (the p = 0 run; shared by every run with the same training options, made
   once, whichever worker gets there first; ``sparseattn.lm.train``);
2. averages its attention over its training rows at the context length (``collect_attention_rows``: one
   layer's maps at a time; ``collect_limit`` rows, default all), also made once;
3. makes the mask: ``ap`` keeps the pairs of highest average attention, pruning p% of each unit's allowed
   pairs (``scope`` layer: heads pooled, as the 2021 AP code; head: per (layer, head), as the 2024 code);
   ``blocks`` any: then keeps every ``block_size`` tile holding a kept pair (the AP code's 16 x 16 block
   layout), mass: prunes whole tiles by their attention mass instead. The baselines match the AP mask's
   *measured* sparsity (on the training rows, all full: the grid's sparsity): ``random`` prunes as many
   uniformly drawn pairs per unit; ``sink_window`` is ``global_tokens(sinks) | neighbour(w)`` everywhere,
   w chosen to come nearest that sparsity (``baselines.sink_window_for_sparsity``);
4. re-trains under that mask (``retrain: scratch``, the dense run's initialisation and recipe, as the GLUE
   method re-fine-tunes from the pretrained model; or ``dense``, continuing from the dense model) and
   returns its results with a ``pruning`` section.

Shared files (dense model, averages, masks) live in ``work_dir`` (a sweep's ``<database>.work/``) under a
hash of the dense run's configuration, written atomically under a file lock, as ``pruning.glue`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import load_model
from ..paths import cache_dir
from ..plans.io import plan_metadata, save_plan
from ..training.data import subset
from ..training.distributed import Distributed
from ..training.distributed import from_env as distributed_from_env
from ..training.loop import resolve_device
from ..training.methods import Method, register_method
from ..lm.train import LMConfig, load_lm_data, train_lm
from .baselines import sink_window_for_sparsity, sink_window_plan
from .collect import AttentionStats, collect_attention_rows
from .mask import (attention_pruning_mask, block_mask, check_prune_options, expand_to_blocks, grid_report, mask_plan,
                   random_like)
from .work import dense_run_result, prepare_run

MASKS = ("ap", "random", "sink_window")
SCOPES = ("layer", "head")
BLOCKS = ("none", "any", "mass")
RETRAIN = ("scratch", "dense")


@dataclass
class LMPruneConfig(LMConfig):
    """An LMConfig (the training of the dense and the pruned model alike) plus the mask to make."""

    prune: float = 0.0  # percent of the allowed pairs pruned, in [0, 100); 0 is the dense run itself
    mask: str = "ap"  # ap, random (as many pairs, drawn uniformly) or sink_window (global_tokens | neighbour)
    scope: str = "layer"  # one threshold per layer (heads pooled) or per (layer, head)
    blocks: str = "none"  # none, any (keep every tile holding a kept pair) or mass (prune tiles by mass)
    block_size: int = 16
    sinks: int = 4  # sink_window: the number of global tokens at the start
    collect_limit: int | None = None  # average over this many training rows (default: every row trained on)
    retrain: str = "scratch"  # the masked run starts as the dense one did (scratch) or from the dense model
    method: str = "prune-lm"

    method_name = "prune-lm"

    def __post_init__(self):
        super().__post_init__()
        check_prune_options(self, "prune-lm", {"mask": MASKS, "scope": SCOPES, "blocks": BLOCKS, "retrain": RETRAIN})
        for name in ("block_size", "collect_limit", "sinks"):
            v = getattr(self, name)
            if v is None and name == "collect_limit":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "sinks" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'sinks' else 'positive'} integer, "
                                 f"got {v!r}")
        if self.prune == 0:  # the dense run: the mask options mean nothing, so every p = 0 run is one run
            self.mask, self.scope, self.blocks, self.block_size, self.sinks, self.retrain = \
                "ap", "layer", "none", 16, 4, "scratch"

    def dense_config(self) -> LMConfig:
        """The dense language model this run starts from (its p = 0 run)."""
        return LMConfig(**{**self.lm_options(), "plan": "dense"})

    @property
    def display_plan(self) -> str:
        if self.prune == 0:
            return "dense"
        what = {"ap": "attention_pruning", "random": "random_pruning", "sink_window": "sink_window"}[self.mask]
        extra = "" if self.blocks == "none" else f", blocks {self.blocks} {self.block_size}"
        scope = f", {self.scope}" if self.mask != "sink_window" else f", {self.sinks} sinks"
        start = ", from dense" if self.retrain == "dense" else ""
        return f"{what}({self.prune:g}%{scope}{extra}{start})"


def ap_keep(stats: AttentionStats, cfg: LMPruneConfig) -> torch.Tensor:
    """(layers, heads, N, N) AP keep-mask of the run: p% of each unit's grid pruned, then blocks as asked."""
    f = cfg.prune / 100
    if cfg.blocks == "mass":
        return block_mask(stats, f, cfg.block_size, scope=cfg.scope, budget="grid")
    keep = attention_pruning_mask(stats, f, scope=cfg.scope, budget="grid")
    if cfg.blocks == "any":
        keep = expand_to_blocks(keep, stats.allowed(), cfg.block_size)
    return keep


def prepare(cfg: LMPruneConfig, work_dir, *, glue_dir=None, device=None, progress: bool = True,
            dist: Distributed | None = None) -> dict:
    """Make (or find) the dense model, its attention averages and this run's plan; returns
    {'dense': folder with results.json and model/, 'stats': file or None, 'plan': plan folder or None}.
    dist: the data-parallel group (its process group joined), whose ranks all call this; rank 0 decides what
    is missing and alone writes (``work.prepare_run``)."""
    dist = dist or Distributed()
    dense_cfg = cfg.dense_config()

    def train_dense(tmp: Path) -> None:
        train_lm(dense_cfg, glue_dir=glue_dir, out_dir=tmp, device=device, progress=progress, save_model=True)

    def collect(dense_dir: Path) -> AttentionStats:
        rows = load_lm_data(dense_cfg, glue_dir).train  # the rows the dense model trained on
        rows = rows[torch.from_numpy(subset(len(rows), cfg.collect_limit))]
        model = load_model(str(dense_dir / "model"), task="causal-lm").to(resolve_device(dist.device(device)))
        return collect_attention_rows(model, rows, batch_size=max(1, min(8, cfg.batch_size)), progress=progress,
                                      metadata={"model": str(dense_dir / "model"),
                                                "data": f"{cfg.task} train rows of {cfg.max_length} tokens"},
                                      dist=dist)

    def make_plan(tmp: Path, stats_file: Path) -> None:
        stats = AttentionStats.load(stats_file)
        keep = ap_keep(stats, cfg)
        ap_sparsity = grid_report(mask_plan(keep), stats).overall  # = on every training row (all full)
        meta = {"mask": cfg.mask, "prune_percent": cfg.prune, "scope": cfg.scope, "blocks": cfg.blocks,
                "block_size": cfg.block_size, "stats_file": stats_file.name, "stats": stats.metadata,
                "ap_sparsity": ap_sparsity}
        if cfg.mask == "sink_window":
            g, w, measured = sink_window_for_sparsity(ap_sparsity, stats.length, sinks=cfg.sinks)
            plan = sink_window_plan(g, w)
            meta.update(sinks=g, window=w)
        else:
            if cfg.mask == "random":
                keep = random_like(keep, stats, scope=cfg.scope, budget="grid", seed=cfg.seed)
            plan = mask_plan(keep, prefix=cfg.mask)
            measured = grid_report(plan, stats).overall
        meta["measured_sparsity"] = measured
        save_plan(plan, tmp, metadata=meta)

    blocks = "" if cfg.blocks == "none" else f"-{cfg.blocks}{cfg.block_size}"
    name = f"{cfg.mask}-{cfg.scope}{blocks}-p{cfg.prune:g}"
    name += {"random": f"-seed{cfg.seed}", "sink_window": f"-g{cfg.sinks}", "ap": ""}[cfg.mask]
    return prepare_run(work_dir, dense_cfg, dist, train_dense=train_dense, prune=cfg.prune,
                       stats_name=f"attention-{cfg.collect_limit or 'all'}.safetensors", collect=collect,
                       plan_name=name, make_plan=make_plan)


def prune_lm(cfg: LMPruneConfig, *, glue_dir=None, work_dir=None, device=None, progress: bool = True,
             out_dir=None) -> dict:
    """Run one Attention Pruning configuration of a language model; returns the masked training's results with
    a ``pruning`` section. work_dir: where shared models, averages and masks go (default <cache>/prune-lm)."""
    work_dir = Path(work_dir) if work_dir is not None else cache_dir() / "prune-lm"
    dist = distributed_from_env()
    with dist.joined(resolve_device(dist.device(device))):
        return _prune_lm(cfg, dist, glue_dir=glue_dir, work_dir=work_dir, device=device,
                         progress=progress and dist.is_main, out_dir=out_dir)


def _prune_lm(cfg: LMPruneConfig, dist: Distributed, *, glue_dir, work_dir, device, progress, out_dir) -> dict:
    made = prepare(cfg, work_dir, glue_dir=glue_dir, device=device, progress=progress, dist=dist)
    if made["plan"] is None:  # p = 0: the dense run is this run
        result = dense_run_result(made["dense"])
    else:
        options = {**cfg.dense_config().lm_options(), "plan": str(made["plan"])}
        if cfg.retrain == "dense":
            options.update(model=str(made["dense"] / "model"), tokenizer=None)
        result = train_lm(LMConfig(**options), glue_dir=glue_dir, out_dir=out_dir, device=device, progress=progress)
        meta = plan_metadata(made["plan"])["metadata"]
        result["pruning"] = {k: meta.get(k) for k in ("mask", "prune_percent", "scope", "blocks", "block_size",
                                                      "ap_sparsity", "measured_sparsity", "sinks", "window")}
        result["pruning"].update(retrain=cfg.retrain, plan_folder=str(made["plan"]))
    result["config"] = cfg.to_dict()
    return result


register_method(Method("prune-lm", LMPruneConfig, prune_lm, shares_work=True))
