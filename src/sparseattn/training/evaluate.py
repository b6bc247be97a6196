"""Evaluation: predictions on a split, GLUE's metrics of them, and the plan's sparsity on the same data (the
one definition: ``sparseattn.sparsity``); and ``evaluate_saved``, the same for a saved run or a fine-tuned
model on any labeled file or GLUE split (``sparseattn evaluate``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, NotFoundError
from ..model_sparsity import layout_of_batch, measure_sparsity
from ..models import resolve_model, text_config
from ..plans.io import as_plan
from ..plans.plan import Plan
from ..sparsity import SparsityReport, measure_plan
from .batching import EncodedSplit, collate, encode_split, eval_batches, to_device
from .files import FORMATS, read_examples
from .glue import GlueTask, canonical_split, get_task, load_split
from .metrics import compute_metrics
from .packing import batch_logits, make_batch


@torch.no_grad()
def predict(model, split: EncodedSplit, *, batch_size: int, device, autocast, pass_structure: bool,
            regression: bool, pad_to: int = 1, progress: bool = False, pack: int | None = None) -> np.ndarray:
    """Predictions for every example of ``split`` in its order: class ids, or scores for regression. pack: the
    ``batch_size`` examples of a batch packed into rows of this many tokens (see ``packing``)."""
    model.eval()
    outs, order = [], []
    for idx in tqdm(eval_batches(split, batch_size), desc="evaluate", leave=False, disable=not progress):
        batch = to_device(make_batch(split, idx, pack=pack, pad_to_multiple_of=pad_to, pin=device.type == "cuda"),
                          device)
        with autocast():
            logits = batch_logits(model, batch, pass_structure)
        outs.append(logits.squeeze(-1).float() if regression else logits.argmax(-1))
        order.append(idx)
    pred = torch.cat(outs).cpu().numpy()
    out = np.empty_like(pred)
    out[np.concatenate(order)] = pred
    return out


def evaluate(model, split: EncodedSplit, task: GlueTask, *, batch_size: int, device, autocast: Callable,
             pass_structure: bool, pad_to: int = 1, progress: bool = False, predictions: list | None = None,
             pack: int | None = None) -> dict[str, float]:
    """The task's metrics of the model's predictions on ``split`` (appended to ``predictions`` if given)."""
    pred = predict(model, split, batch_size=batch_size, device=device, autocast=autocast,
                   pass_structure=pass_structure, regression=task.is_regression, pad_to=pad_to, progress=progress,
                   pack=pack)
    if predictions is not None:
        predictions.append(pred)
    return compute_metrics(task.metrics, pred, split.labels)


def majority_reference(task: GlueTask, train_labels, eval_labels) -> dict | None:
    """What predicting one class for every example scores: the train split's most frequent class, with the
    task's metrics on the evaluation labels. None for regression (a constant score correlates 0)."""
    if task.is_regression:
        return None
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=task.num_labels)
    majority = int(counts.argmax())
    const = np.full(len(eval_labels), majority)
    return {"class": task.labels[majority], "metrics": compute_metrics(task.metrics, const, eval_labels)}


def prediction_counts(task: GlueTask, pred) -> dict | None:
    """{class name: how many examples the model gave it} (None for regression). A model that gives every
    example one class learned nothing of the input: its scores equal the majority reference at best."""
    if task.is_regression:
        return None
    counts = np.bincount(np.asarray(pred, dtype=np.int64), minlength=task.num_labels)
    return {name: int(n) for name, n in zip(task.labels, counts)}


def sum_reports(reports) -> SparsityReport | None:
    """The sum of sparsity reports over batches (None for none)."""
    total = None
    for r in reports:
        total = r if total is None else total + r
    return total


def eval_sparsity(model, split: EncodedSplit, *, sparsified: bool, batch_size: int = 256) -> SparsityReport:
    """The sparsity of the model's plan on ``split``, batched as evaluation batches it. A model that runs
    its own attention (not sparsified) is dense: its report counts every allowed pair as kept."""
    batches = [collate(split, idx) for idx in eval_batches(split, batch_size)]
    if sparsified:
        return measure_sparsity(model, batches)
    cfg = text_config(model)
    dense = Plan.dense().resolve(cfg.num_hidden_layers, cfg.num_attention_heads)
    return sum_reports(measure_plan(dense, layout_of_batch(b)) for b in batches)


# -- scoring a saved run or a fine-tuned model on any labeled data ------------------------------------------
@dataclass
class Saved:
    """What ``evaluate_saved`` scores: a model folder or hub id, its plan and task, and the run it came from."""

    model: str
    plan: Plan
    task: GlueTask | None
    run: Path | None = None
    max_length: int | None = None
    backend: str = "reference"
    parser: str | None = None


def open_saved(source: str, *, plan: str | None = None, task: str | None = None) -> Saved:
    """A run's folder (``finetune --out ... --save-model``: results.json, model/, plan/) or a fine-tuned
    sequence classifier (a folder or hub id, with ``plan``, default dense)."""
    folder = Path(source)
    if (folder / "results.json").is_file():
        try:
            info = json.loads((folder / "results.json").read_text(encoding="utf-8"))
            cfg = info["config"] if isinstance(info.get("config"), dict) else {}
            run_task = info["task"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{folder / 'results.json'}: not a run's results ({type(e).__name__}: {e})") from None
        if not (folder / "model" / "config.json").is_file():
            raise NotFoundError(f"{folder} has results.json but no model/ folder: the run was not saved (run "
                                "finetune with --save-model to keep the fine-tuned model)")
        if task is not None and get_task(task).name != get_task(run_task).name:
            raise ConfigError(f"{folder} was fine-tuned on {run_task}; --task {task!r} does not fit its classifier")
        saved_plan = folder / "plan"
        return Saved(str(folder / "model"), as_plan(plan if plan is not None else
                                                    (str(saved_plan) if saved_plan.is_dir() else "dense")),
                     get_task(run_task), folder, cfg.get("max_length"), cfg.get("backend") or "reference",
                     cfg.get("parser"))
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise NotFoundError(f"{folder} is neither a run (results.json) nor a model (config.json)")
    return Saved(resolve_model(source), as_plan(plan if plan is not None else "dense"),
                 get_task(task) if task is not None else None)


def load_eval_examples(data: str, task: GlueTask | None, *, text_column: str | None = None,
                       pair_column: str | None = None, label_column: str | None = None, glue_dir=None,
                       limit: int | None = None) -> tuple[GlueTask, list, str]:
    """(task, examples, where they came from) for ``data``: a file (TSV, CSV, JSON lines) or a GLUE task and
    split written ``TASK`` or ``TASK:SPLIT`` (default dev)."""
    from .data import subset

    if Path(data).is_file():
        if task is None:
            raise ConfigError(f"which task's metrics for {data}? give --task (the model is not a run that knows it)")
        examples = read_examples(data, task, text_column=text_column, pair_column=pair_column,
                                 label_column=label_column)
        where = data
    elif Path(data).exists() or "/" in data or Path(data).suffix.lower() in FORMATS:
        raise NotFoundError(f"--data {data!r}: no such file (expected a TSV, CSV or JSON-lines file, or a GLUE "
                            "task and split such as sst2:dev)")
    else:
        name, _, split = data.partition(":")
        try:
            glue_task = get_task(name)
        except ConfigError:
            raise NotFoundError(f"--data {data!r} is neither a file nor a GLUE task (a file: .tsv, .csv, .jsonl; "
                                "a task: sst2, sst2:dev, mnli:dev_mismatched, ...)") from None
        if task is not None and task.name != glue_task.name:
            raise ConfigError(f"--data {data!r} is {glue_task.folder}, but the model is a {task.folder} classifier")
        task = glue_task
        split = canonical_split(task, split or "dev")
        examples = load_split(task, split, glue_dir)
        where = f"GLUE {task.folder} {split}"
    if limit is not None:
        examples = [examples[i] for i in subset(len(examples), limit)]
    return task, examples, where


def evaluate_saved(source: str, data: str, *, task: str | None = None, plan: str | None = None,
                   text_column: str | None = None, pair_column: str | None = None, label_column: str | None = None,
                   glue_dir=None, limit: int | None = None, batch_size: int = 64, max_length: int | None = None,
                   backend: str | None = None, device=None, parse_cache: str | None = None,
                   progress: bool = False) -> dict:
    """The task's metrics and the plan's measured sparsity of a saved run (or a fine-tuned model) on ``data``
    (see ``load_eval_examples``)."""
    from ..integrations.hf import sparsify
    from ..models import load_model, load_tokenizer
    from ..text.parse import DEFAULT_PARSER, ParseCache
    from .loop import autocast_for, resolve_device, resolve_precision

    saved = open_saved(source, plan=plan, task=task)
    the_task, examples, where = load_eval_examples(data, saved.task, text_column=text_column,
                                                   pair_column=pair_column, label_column=label_column,
                                                   glue_dir=glue_dir, limit=limit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    tokenizer = load_tokenizer(saved.model)
    model = load_model(saved.model, task="classification", dtype=torch.float32)
    if model.config.num_labels != the_task.num_labels:
        raise ConfigError(f"{saved.model} has {model.config.num_labels} outputs; {the_task.folder} needs "
                          f"{the_task.num_labels}: it is not a {the_task.folder} classifier")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    length = max_length or saved.max_length or min(128, max_pos or 128)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1 or (max_pos and length > max_pos):
        raise ConfigError(f"max_length must be a positive integer up to the model's {max_pos} positions, got "
                          f"{length!r}")
    dense = not saved.plan.rules
    if not dense:
        sparsify(model, saved.plan, backend=backend or saved.backend, tokenizer=tokenizer)
    parses = ParseCache(parse_cache, parser=saved.parser or DEFAULT_PARSER) if saved.plan.needs_parser else None
    split = encode_split(tokenizer, examples, length, structure=saved.plan.input_dependent, parses=parses,
                         regression=the_task.is_regression, what=where)
    if not split.has_labels:
        raise DataError(f"{where} has no labels (GLUE hides test labels); evaluate on labeled data")
    dev = resolve_device(device)
    model.to(dev)
    metrics = evaluate(model, split, the_task, batch_size=batch_size, device=dev,
                       autocast=autocast_for(resolve_precision("auto", dev), dev),
                       pass_structure=saved.plan.input_dependent and not dense,
                       pad_to=8 if dev.type == "cuda" else 1, progress=progress)
    sparsity = eval_sparsity(model, split, sparsified=not dense)
    return {"source": str(source), "run": str(saved.run) if saved.run else None, "model": saved.model,
            "task": the_task.name, "plan": saved.plan.spec(), "data": where, "examples": len(split),
            "max_length": length, "truncated": split.truncated, "main_metric": the_task.main_metric,
            "metrics": metrics, "score": metrics[the_task.main_metric], "sparsity": sparsity.to_dict()}
