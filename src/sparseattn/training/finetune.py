"""Fine-tune a model on a GLUE task under a plan, evaluate on dev, and measure the plan's sparsity.

    from sparseattn.training.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(task="sst2", plan="later-half: neighbour(2)", epochs=1), out_dir="out/run")
    result["metrics"], result["sparsity"]["overall"]

A plain PyTorch loop, the standard recipe (see ``loop``), kept free of per-step host synchronization: the
data is tokenized once, batches are length-bucketed and padded per batch, losses stay on the device until
an epoch ends. The dense baseline runs the model's own attention; any other plan runs through
``sparsify(model, plan, backend)``. ``finetune`` is its phases in order: ``setup``, ``load_data``,
``build_model``, ``train``, then the plan's sparsity (``evaluate.eval_sparsity``) and the ``record``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..integrations.hf import sparsify, unsparsify
from ..model_sparsity import layout_of_batch
from ..models import load_model, load_tokenizer, resolve_model, text_config
from ..plans.io import as_plan, save_plan
from ..plans.plan import Plan
from ..text.parse import DEFAULT_PARSER, ParseCache
from .batching import EncodedSplit, collate, eval_batches, to_device, train_batches
from .config import FinetuneConfig
from .data import encoded, load_examples
from .distributed import Distributed
from .distributed import from_env as distributed_from_env
from .evaluate import eval_sparsity, evaluate, majority_reference, prediction_counts
from .glue import GlueTask, get_task
from .loop import History, resolve_device, resolve_precision, set_seed, task_loss, train_epochs
from .methods import Method, register_method
from .packing import batch_logits, make_batch, token_slots
from .record import device_description, loss_curve, package_versions, write_results

log = logging.getLogger("sparseattn")

__all__ = ["FinetuneConfig", "finetune", "readout_isolated_layers"]


@dataclass
class Run:
    """What a run decided before it touched data or a model."""

    cfg: FinetuneConfig
    task: GlueTask
    plan: Plan
    device: torch.device
    precision: str
    dist: Distributed = field(default_factory=Distributed)  # data-parallel place (a single process by default)

    @property
    def dense(self) -> bool:
        return not self.plan.rules

    @property
    def pass_structure(self) -> bool:
        """Batches carry each example's structure to the model (input-dependent plans only)."""
        return self.plan.input_dependent and not self.dense

    @property
    def pad_to(self) -> int:
        return 8 if self.device.type == "cuda" else 1  # tensor-core friendly shapes


@dataclass
class Data:
    tokenizer: object
    train: EncodedSplit
    evals: EncodedSplit


def setup(cfg: FinetuneConfig, device=None) -> Run:
    """The run's task, plan, device and precision; under torchrun also its rank (see ``distributed``), with
    the device cuda:LOCAL_RANK when CUDA is used."""
    dist = distributed_from_env()
    device = resolve_device(dist.device(device))
    return Run(cfg, get_task(cfg.task), as_plan(cfg.plan), device, resolve_precision(cfg.precision, device), dist)


def load_data(run: Run, glue_dir=None, *, parse_cache: str | None = None, on_malformed: str = "error") -> Data:
    """The train and evaluation splits, tokenized (with each example's structure when the plan needs it)."""
    cfg, task = run.cfg, run.task
    parses = ParseCache(parse_cache, parser=cfg.parser or DEFAULT_PARSER) if run.plan.needs_parser else None
    train_ex = load_examples(task, "train", cfg.limit_train, glue_dir, on_malformed=on_malformed)
    eval_ex = load_examples(task, cfg.eval_split, cfg.limit_eval, glue_dir, on_malformed=on_malformed)
    tokenizer = load_tokenizer(cfg.model)

    def encode(split_name, examples, limit):
        key = (resolve_model(cfg.model), task.name, split_name, limit, cfg.parser)
        return encoded(tokenizer, examples, key, max_length=cfg.max_length, structure=run.plan.input_dependent,
                       parses=parses, regression=task.is_regression, what=f"{task.folder} {split_name}")

    data = Data(tokenizer, encode("train", train_ex, cfg.limit_train), encode(cfg.eval_split, eval_ex, cfg.limit_eval))
    if not data.train.has_labels:
        raise DataError(f"{task.folder} train has no labels; training needs them")
    if not data.evals.has_labels:
        raise DataError(f"{task.folder} {cfg.eval_split} has no labels (GLUE hides test labels); evaluate on dev")
    return data


def load_classifier(model: str | None, task: GlueTask, max_length: int):
    """The task's sequence classifier in fp32 (master weights whatever the checkpoint's dtype: autocast does
    the low-precision math; an fp16 checkpoint trained in fp16 turns NaN on its second step)."""
    m = load_model(model, task="classification", num_labels=task.num_labels, dtype=torch.float32)
    max_pos = getattr(m.config, "max_position_embeddings", None)
    if max_pos and max_length > max_pos:
        raise ConfigError(f"max_length={max_length} is more than the model's {max_pos} positions")
    return m


def build_model(run: Run, tokenizer):
    """The seeded classifier, sparsified under the run's plan (unless dense), on the run's device. Packed runs
    are sparsified under a dense plan too: the model's own attention would attend across the examples of a row,
    sparseattn's keeps each example apart in every layer."""
    set_seed(run.cfg.seed)
    model = load_classifier(run.cfg.model, run.task, run.cfg.max_length)
    if not run.dense or run.cfg.pack:
        sparsify(model, run.plan, backend=run.cfg.backend, tokenizer=tokenizer)
    return model.to(run.device)


def readout_isolated_layers(plan, model, batch: dict, tokenizer=None) -> list[int]:
    """Layers in which, for every example of ``batch``, the first real token (BERT's [CLS], which a
    sequence classifier reads) keeps only itself in every head under ``plan``. If that is every layer,
    the classifier's input does not depend on the sentence."""
    cfg = text_config(model)
    special_ids = torch.tensor(tokenizer.all_special_ids) if tokenizer is not None else None
    layout = layout_of_batch(batch, special_ids=special_ids, embeddings=model.get_input_embeddings())
    first = layout.real.float().argmax(-1)  # (B,) index of each example's first real token
    rows = torch.arange(layout.batch_size)
    cache: dict = {}
    isolated = []
    for lp in plan.resolve(cfg.num_hidden_layers, cfg.num_attention_heads):
        keep = lp.mask(layout, cache)  # (B, H or 1, L, L)
        kept = keep[rows, :, first, :].sum(-1)  # (B, H) keys the first token keeps
        if bool((kept <= 1).all()):
            isolated.append(lp.layer)
    return isolated


def readout_isolated(run: Run, model, data: Data) -> bool:
    """Whether the plan cuts the classifier's readout token off the input in every layer (warned about)."""
    if run.dense or getattr(model.config, "is_decoder", False):
        return False
    probe = collate(data.train, np.arange(min(len(data.train), 256)))
    isolated = len(readout_isolated_layers(run.plan, model, probe, data.tokenizer)) == model.config.num_hidden_layers
    if isolated:
        log.warning("%s: in every layer the plan %r lets the first token ([CLS], which the classifier reads) "
                    "attend only to itself, so the model's predictions cannot depend on the input; give it "
                    "other keys (e.g. `| global_tokens(1)`, or special='global' for syntax and lexical)",
                    run.task.folder, run.plan.spec())
    return isolated


def train(run: Run, model, data: Data, *, progress: bool = True) -> History:
    """``cfg.epochs`` epochs over the train split, each followed by an evaluation on the evaluation split.

    Data-parallel (``run.dist.active``): ``cfg.batch_size`` is per rank, each step's global batch is
    ``batch_size x world_size`` examples drawn as one process would draw them, each rank trains on its slice
    through DistributedDataParallel, losses are averaged over the ranks, and every rank evaluates."""
    cfg, task, device, dist = run.cfg, run.task, run.device, run.dist
    hist = History()

    def step_loss(net, idx, autocast):
        batch = make_batch(data.train, idx, pack=cfg.pack, pad_to_multiple_of=run.pad_to, pin=device.type == "cuda")
        hist.real_tokens += int(data.train.lengths[idx].sum())
        hist.token_slots += batch["input_ids"].numel()
        batch = to_device(batch, device)
        with autocast():
            logits = batch_logits(net, batch, run.pass_structure)
        return task_loss(logits, batch["labels"], task.is_regression)

    def evaluation(autocast):
        return evaluate(model, data.evals, task, batch_size=max(256, cfg.batch_size), device=device,
                        autocast=autocast, pass_structure=run.pass_structure, pad_to=run.pad_to, progress=progress,
                        predictions=hist.predictions, pack=cfg.pack)

    train_epochs(model, cfg, examples=len(data.train), draw=lambda rng, n: train_batches(data.train, n, rng),
                 step_loss=step_loss, evaluate=evaluation, label=task.folder, precision=run.precision,
                 device=device, dist=dist, progress=progress, hist=hist,
                 describe=lambda m: f"{cfg.eval_split} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    if dist.active:  # the tokens of every rank's slices, not this rank's
        counts = dist.sum(torch.tensor([hist.real_tokens, hist.token_slots], dtype=torch.int64, device=device))
        hist.real_tokens, hist.token_slots = (int(c) for c in counts.tolist())
    return hist


def record(run: Run, data: Data, hist: History, sparsity, *, readout_isolated: bool, glue_dir, timing: dict) -> dict:
    """The results record of a run (what ``finetune`` returns and writes to results.json)."""
    cfg, task, train_split, evals = run.cfg, run.task, data.train, data.evals
    last = hist.epochs[-1]["metrics"]
    return {
        "config": cfg.to_dict(),
        "task": task.name,
        "plan": run.plan.spec(),
        "plan_name": run.plan.name,
        "model": resolve_model(cfg.model),
        "main_metric": task.main_metric,
        "metrics": last,
        "score": last[task.main_metric],
        "epochs": hist.epochs,
        "train_loss_curve": loss_curve(hist.losses),
        "sparsity": sparsity.to_dict(),
        "readout_isolated": readout_isolated,
        "predicted_classes": prediction_counts(task, hist.predictions[-1]),
        "majority_reference": majority_reference(task, train_split.labels, evals.labels),
        "data": {
            "source": str(glue_dir) if glue_dir else (os.environ.get("GLUE_DIR") or "hub: nyu-mll/glue"),
            "train_examples": len(train_split), "eval_examples": len(evals), "eval_split": cfg.eval_split,
            "max_length": cfg.max_length, "train_truncated": train_split.truncated,
            "eval_truncated": evals.truncated, "train_tokens": int(train_split.lengths.sum()),
            "eval_tokens": int(evals.lengths.sum()),
        },
        "timing": {
            **timing, "train_seconds": hist.train_seconds, "eval_seconds": hist.eval_seconds,
            "train_examples_per_second": len(train_split) * cfg.epochs / max(hist.train_seconds, 1e-9),
        },
        "padding": padding_record(run, data, hist),
        "precision": run.precision,
        "device": device_description(run.device),
        "versions": package_versions(),
    }


def padding_record(run: Run, data: Data, hist: History) -> dict:
    """How much of the batches' token positions held real tokens (the rest is padding): training as it ran, and
    the evaluation batches; packed runs give their row length."""
    eval_size = max(256, run.cfg.batch_size)
    eval_slots = token_slots(data.evals, eval_batches(data.evals, eval_size), pack=run.cfg.pack,
                             pad_to_multiple_of=run.pad_to)
    return {"pack": run.cfg.pack, "train_real_tokens": hist.real_tokens, "train_token_slots": hist.token_slots,
            "train_utilisation": hist.real_tokens / max(1, hist.token_slots),
            "eval_utilisation": int(data.evals.lengths.sum()) / max(1, eval_slots)}


def save_finetuned(run: Run, model, tokenizer, out_dir) -> None:
    """The fine-tuned model (its own attention again), its tokenizer and the plan, under ``out_dir``."""
    unsparsify(model)  # a sparse plan's, or a packed run's dense one (nothing where the model was never sparsified)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    save_plan(run.plan, out_dir / "plan")


def finetune(config: FinetuneConfig, *, glue_dir=None, out_dir=None, device=None, progress: bool = True,
             save_model: bool = False, parse_cache: str | None = None, on_malformed: str = "error") -> dict:
    """Run one fine-tuning and return its results (also written to ``out_dir/results.json`` if given)."""
    t_start = time.perf_counter()
    run = setup(config, device)
    with run.dist.joined(run.device):
        return _finetune(run, t_start, glue_dir=glue_dir, out_dir=out_dir, progress=progress and run.dist.is_main,
                         save_model=save_model, parse_cache=parse_cache, on_malformed=on_malformed)


def _finetune(run: Run, t_start: float, *, glue_dir, out_dir, progress: bool, save_model: bool,
              parse_cache: str | None, on_malformed: str) -> dict:
    t0 = time.perf_counter()
    data = load_data(run, glue_dir, parse_cache=parse_cache, on_malformed=on_malformed)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = build_model(run, data.tokenizer)
    t_model = time.perf_counter() - t0
    isolated = readout_isolated(run, model, data)
    hist = train(run, model, data, progress=progress)
    t0 = time.perf_counter()
    sparsity = eval_sparsity(model, data.evals, sparsified=not run.dense)
    t_sparsity = time.perf_counter() - t0
    timing = {"data_seconds": t_data, "model_seconds": t_model, "sparsity_seconds": t_sparsity}
    result = record(run, data, hist, sparsity, readout_isolated=isolated, glue_dir=glue_dir, timing=timing)
    if run.dist.active:  # a data-parallel run says so; a single process's record is as it always was
        result["distributed"] = {**run.dist.to_dict(), "per_rank_batch_size": run.cfg.batch_size,
                                 "global_batch_size": run.cfg.batch_size * run.dist.world_size}
    result["timing"]["total_seconds"] = time.perf_counter() - t_start
    if out_dir is not None and run.dist.is_main:  # rank 0 alone writes
        write_results(result, out_dir)
        if save_model:
            save_finetuned(run, model, data.tokenizer, Path(out_dir))
    run.dist.barrier()  # no rank returns before the results are written
    return result


register_method(Method("finetune", FinetuneConfig, finetune))
