"""Evaluation: predictions on a split, GLUE's metrics of them, and the plan's sparsity on the same data (the
one definition: ``sparseattn.sparsity``)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..model_sparsity import layout_of_batch, measure_sparsity
from ..models import text_config
from ..plans.plan import Plan
from ..sparsity import SparsityReport, measure_plan
from .batching import EncodedSplit, collate, eval_batches, to_device
from .glue import GlueTask
from .loop import model_inputs
from .metrics import compute_metrics


@torch.no_grad()
def predict(model, split: EncodedSplit, *, batch_size: int, device, autocast, pass_structure: bool,
            regression: bool, pad_to: int = 1, progress: bool = False) -> np.ndarray:
    """Predictions for every example of ``split`` in its order: class ids, or scores for regression."""
    model.eval()
    outs, order = [], []
    for idx in tqdm(eval_batches(split, batch_size), desc="evaluate", leave=False, disable=not progress):
        batch = to_device(collate(split, idx, pad_to_multiple_of=pad_to, pin=device.type == "cuda"), device)
        with autocast():
            logits = model(**model_inputs(batch, pass_structure)).logits
        outs.append(logits.squeeze(-1).float() if regression else logits.argmax(-1))
        order.append(idx)
    pred = torch.cat(outs).cpu().numpy()
    out = np.empty_like(pred)
    out[np.concatenate(order)] = pred
    return out


def evaluate(model, split: EncodedSplit, task: GlueTask, *, batch_size: int, device, autocast: Callable,
             pass_structure: bool, pad_to: int = 1, progress: bool = False, predictions: list | None = None
             ) -> dict[str, float]:
    """The task's metrics of the model's predictions on ``split`` (appended to ``predictions`` if given)."""
    pred = predict(model, split, batch_size=batch_size, device=device, autocast=autocast,
                   pass_structure=pass_structure, regression=task.is_regression, pad_to=pad_to, progress=progress)
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
