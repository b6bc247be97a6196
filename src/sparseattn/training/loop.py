"""The training loop's phases, shared by every method: device and precision, seeding, the optimiser and
its schedule (AdamW with decoupled weight decay, linear warmup then linear decay), one optimiser step
(gradient scaling for fp16, clipping), and the epochs themselves (``train_epochs``: GLUE fine-tuning and
language models alike). Losses stay on the device: a step never waits for the host."""

from __future__ import annotations

import math
import random
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .distributed import Distributed, loss_weights, shard_batches


def resolve_device(device=None) -> torch.device:
    """``device`` as a torch.device; None: CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return precision


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of the autocast context for ``precision`` (a resolved one: fp32, bf16 or fp16)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return lambda: torch.autocast(device.type, enabled=False)
    return lambda: torch.autocast(device.type, dtype=dtype)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay for weight matrices; none for biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_linear_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warmup over ``warmup_steps``, then linear decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Mean squared error for regression (one score a row), else cross-entropy; in fp32."""
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict, pass_structure: bool) -> dict:
    """The keys of a collated batch the model takes (``sparse_structure`` only for input-dependent plans)."""
    keys = MODEL_INPUTS + (("sparse_structure",) if pass_structure else ())
    return {k: batch[k] for k in keys if k in batch}


class Optimizer:
    """AdamW over the model's parameters with a warmup-then-decay schedule, gradient scaling (fp16 only) and
    clipping; ``step(loss)`` runs backward and one update."""

    def __init__(self, model, *, lr: float, weight_decay: float, warmup: float, total_steps: int,
                 max_grad_norm: float, precision: str, device: torch.device):
        self.model, self.max_grad_norm = model, max_grad_norm
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, **fused)
        factor = warmup_linear_decay(int(warmup * total_steps), total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        if self.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


@dataclass
class History:
    """What training made: one entry per epoch (loss, seconds, metrics) and every step's loss."""

    epochs: list[dict] = field(default_factory=list)
    losses: torch.Tensor | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    predictions: list = field(default_factory=list)  # each epoch's predictions on the evaluation split
    real_tokens: int = 0  # tokens of the training examples, over every epoch
    token_slots: int = 0  # positions of the training batches (real and padding), over every epoch


def train_epochs(model, cfg, *, examples: int, draw: Callable[[np.random.Generator, int], list[np.ndarray]],
                 step_loss: Callable[[torch.nn.Module, np.ndarray, Callable], torch.Tensor],
                 evaluate: Callable[[Callable], dict], describe: Callable[[dict], str], label: str, precision: str,
                 device: torch.device, dist: Distributed, progress: bool = True,
                 hist: History | None = None) -> History:
    """``cfg.epochs`` epochs of training, each followed by an evaluation, with ``cfg``'s optimiser settings.

    examples: the train split's size; draw(rng, global_batch): one epoch's global batches (index arrays of
    ``cfg.batch_size x world_size`` examples, as one process would draw them); step_loss(net, indices, autocast):
    the loss of this rank's slice of one (``net`` is the model, or its DistributedDataParallel wrapper);
    evaluate(autocast): the epoch's metrics; describe(metrics): their part of the epoch's line. Data-parallel
    (``dist.active``): losses are averaged over the ranks, each rank's slice weighted by its share of an uneven
    global batch."""
    autocast = autocast_for(precision, device)
    global_batch = cfg.batch_size * dist.world_size
    total = math.ceil(examples / global_batch) * cfg.epochs
    opt = Optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, total_steps=total,
                    max_grad_norm=cfg.max_grad_norm, precision=precision, device=device)
    rng = np.random.default_rng(cfg.seed)
    hist = hist or History()
    hist.losses = torch.zeros(total, device=device)
    net = dist.wrap(model)  # the model itself in a single process
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        global_batches = draw(rng, global_batch)
        batches = shard_batches(global_batches, dist.rank, dist.world_size)
        weights = loss_weights(global_batches, dist.rank, dist.world_size)
        bar = tqdm(batches, desc=f"{label} epoch {epoch + 1}/{cfg.epochs}", disable=not progress, dynamic_ncols=True)
        for i, idx in enumerate(bar):
            loss = step_loss(net, idx, autocast)
            if weights[i] != 1:  # this rank's share of an uneven global batch
                loss = loss * weights[i]
            opt.step(loss)
            hist.losses[step] = loss.detach()
            step += 1
            if progress and (i % 50 == 49 or i == len(batches) - 1):  # a host sync every 50 steps only
                bar.set_postfix(loss=f"{hist.losses[max(0, step - 50):step].mean().item():.4f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_train = time.perf_counter() - t0
        hist.train_seconds += epoch_train
        this_epoch = slice(step - len(batches), step)
        if dist.active:  # every rank's losses, averaged: the loss of each global batch
            hist.losses[this_epoch] = dist.mean(hist.losses[this_epoch])
        t0 = time.perf_counter()
        metrics = evaluate(autocast)
        hist.eval_seconds += time.perf_counter() - t0
        ep_loss = float(hist.losses[this_epoch].float().cpu().numpy().mean())
        hist.epochs.append({"epoch": epoch + 1, "train_loss": ep_loss, "train_seconds": epoch_train,
                            "metrics": metrics})
        if progress:
            tqdm.write(f"{label} epoch {epoch + 1}: train loss {ep_loss:.4f}, {describe(metrics)} ({epoch_train:.1f} s)")
    return hist
