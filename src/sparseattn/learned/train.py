"""Training learnable degrees jointly with the model: task loss + lambda * expected density.

The penalty is the batch's expected kept pairs over a running mean of allowed pairs per batch, so every
pair weighs the same whatever the length of its sentence (sparsity is a ratio of sums over the data, not
a mean of per-batch ratios: a batch of 4-token phrases cannot be 80% sparse, since its diagonal and
global token alone keep 60% of its pairs). The dual update compares the running ratio of sums with the
target.

Two ways to ask for sparsity:
- a fixed ``lam`` (a lambda sweep traces an accuracy/sparsity curve), or
- a ``target_sparsity``: lambda becomes a Lagrange multiplier updated by dual ascent on the density of
  the plan that will be exported (the hard windows of the current degrees),
  lambda <- max(0, lambda + dual_lr * (kept - target density * allowed) / mean allowed) per batch, with
  degrees kept >= -1; at the end the hard degrees are shifted by one common offset so the exported plan
  meets the target on the training batches (`calibrate_offset`); the shape of the learned degree
  distribution is kept. The target is a budget: a task that prefers sparser windows may go below it
  before calibration. dual_lr = 0.01, chosen on GLUE dev (docs/learned-sparsity.md has the runs): a
  larger step drives every degree to 0 together before the model can adapt.

The temperature anneals geometrically from ``t_start`` to ``t_end`` so the soft windows become hard
windows; the exported plan is `SoftNeighbourDegrees.to_plan()`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..layout import TokenLayout
from ..sparsity import measure_plan
from ..training.distributed import Distributed
from .soft_window import SoftNeighbourDegrees, annealed_temperature


TARGET_MODE_DEGREE_FLOOR = -1.0


@dataclass
class LearnConfig:
    lam: float | None = 0.0  # density penalty weight (ignored when target_sparsity is set)
    target_sparsity: float | None = None  # in [0, 1): overall sparsity the exported plan should have
    steps: int = 1000
    lr: float = 5e-5  # model weights
    degree_lr: float = 0.5  # degrees are in token units; they need a far larger step than weights
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    t_start: float = 4.0
    t_end: float = 0.05
    dual_lr: float = 0.01  # dual ascent step for the multiplier in target mode
    ema: float = 0.95  # decay of the running pair counts the penalty and the dual update use
    max_grad_norm: float = 1.0
    log_every: int = 50

    def __post_init__(self):
        if self.target_sparsity is not None and not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.target_sparsity is None and (self.lam is None or self.lam < 0):
            raise ValueError(f"lambda must be >= 0 (or give a target sparsity), got {self.lam}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.t_end <= self.t_start:
            raise ValueError(f"need 0 < t_end <= t_start, got t_start={self.t_start}, t_end={self.t_end}")


@dataclass
class LearnResult:
    history: list[dict] = field(default_factory=list)
    final_lambda: float = 0.0
    offset: float = 0.0
    seconds: float = 0.0


def _layout(batch: dict, causal: bool) -> TokenLayout:
    return TokenLayout(real=batch["attention_mask"].bool(), causal=causal)


def _optimizer(model, degrees: SoftNeighbourDegrees, cfg: LearnConfig):
    """AdamW over the model's weights (decay on matrices only) and the degrees (their own learning rate, no
    decay); returns it and the model's weights, which gradient clipping covers."""
    degree_params = list(degrees.parameters())
    ids = {id(p) for p in degree_params}
    weights = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": [p for p in weights if p.dim() >= 2], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": [p for p in weights if p.dim() < 2], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": degree_params, "lr": cfg.degree_lr, "weight_decay": 0.0},
    ])
    return opt, weights


def _degree_summary(d: torch.Tensor) -> dict:
    return {"degree_mean": d.mean().item(), "degree_min": d.min().item(), "degree_max": d.max().item()}


def learn(model, degrees: SoftNeighbourDegrees, batches: Callable[[], Iterable[dict]], cfg: LearnConfig,
          *, device=None, autocast_dtype=None, progress=None, net=None, dist: Distributed | None = None) -> LearnResult:
    """Train ``model`` (with ``degrees`` attached, see ``attach_degrees``) for ``cfg.steps`` steps.

    batches: a callable returning a fresh iterable of model-ready batches (dicts with input_ids,
    attention_mask, labels, ...; optionally ``loss_weight``, the factor of this rank's task loss, see
    ``distributed.loss_weights``); it is called again when an epoch ends.

    Data-parallel (``dist.active``; ``net`` the model wrapped in DistributedDataParallel, whose forward is
    used): each rank's batch is its slice of the step's global batch. The pair counts are added up over the
    ranks, so the running counts, the density, the multiplier and the logged values are the global batch's,
    the same on every rank; each rank's penalty is its own kept pairs times world_size over the global mean of
    allowed pairs, so that DDP's average of the ranks' gradients is the gradient of the global batch's penalty.
    """
    dist = dist or Distributed()
    net = net if net is not None else model
    device = device or next(model.parameters()).device
    causal = bool(getattr(model.config, "is_decoder", False))
    opt, weights = _optimizer(model, degrees, cfg)
    warmup = max(1, int(cfg.warmup_ratio * cfg.steps))

    def lr_factor(step):  # linear warmup and decay, for the weights only
        return step / warmup if step < warmup else max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))

    target_density = None if cfg.target_sparsity is None else 1.0 - cfg.target_sparsity
    lam = 0.0 if target_density is not None else float(cfg.lam)
    result = LearnResult()
    t0 = time.time()
    model.train()
    step = 0
    run_kept = run_allowed = run_hard = torch.zeros((), device=device)
    lam = torch.tensor(lam, device=device)
    while step < cfg.steps:
        for batch in batches():
            if step >= cfg.steps:
                break
            degrees.temperature = annealed_temperature(step, cfg.steps, cfg.t_start, cfg.t_end)
            for g in opt.param_groups[:2]:
                g["lr"] = cfg.lr * lr_factor(step)
            weight = batch.get("loss_weight", 1.0)  # this rank's share of an uneven global batch
            batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                     for k, v in batch.items() if k != "loss_weight"}
            with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                out = net(**batch)
            kept, allowed = degrees.expected_kept(_layout(batch, causal))
            allowed = dist.sum(allowed)  # the global batch's (this rank's alone in a single process)
            # running pair counts (bias-corrected EMAs; device tensors, no host sync): the data's density is
            # their ratio
            run_kept = cfg.ema * run_kept + (1 - cfg.ema) * dist.sum(kept)
            run_allowed = cfg.ema * run_allowed + (1 - cfg.ema) * allowed
            density = kept * dist.world_size / (run_allowed / (1 - cfg.ema ** (step + 1)))
            running_density = run_kept / run_allowed
            task_loss_share = out.loss.float() * weight if weight != 1 else out.loss.float()
            loss = task_loss_share + lam * density
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights, cfg.max_grad_norm)
            opt.step()
            if target_density is not None:
                # a head the multiplier pushed far below zero gets no gradient at low temperature and could
                # never widen again once the multiplier relaxes: in target mode degrees stay >= -1
                with torch.no_grad():
                    degrees.degree.clamp_(min=TARGET_MODE_DEGREE_FLOOR)
                # the multiplier follows the density of the plan that will be exported (hard windows), not
                # the soft one: at high temperature the soft tails keep the soft density far above it, and
                # a multiplier driven by them grows until every degree collapses. The step is this
                # batch's excess of kept pairs over the target, in units of the mean batch's allowed pairs (a
                # ratio of sums over steps, without the lag of a running average)
                hard_kept = dist.sum(degrees.hard_kept(_layout(batch, causal))[0])
                run_hard = cfg.ema * run_hard + (1 - cfg.ema) * hard_kept
                hard_density = run_hard / run_allowed
                mean_allowed = run_allowed / (1 - cfg.ema ** (step + 1))
                lam = (lam + cfg.dual_lr * (hard_kept - target_density * allowed) / mean_allowed).clamp(min=0.0)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                d = degrees.degrees().detach()
                task_loss = dist.mean(task_loss_share).item()  # every rank the same value: all raise, or none
                if not (torch.isfinite(d).all() and math.isfinite(task_loss)):
                    raise FloatingPointError(
                        f"learning degrees: non-finite {'degrees' if not torch.isfinite(d).all() else 'loss'} at "
                        f"step {step} of {cfg.steps} (temperature {degrees.temperature:.3g}, lambda {float(lam):.3g});"
                        f" check the model weights are fp32 (autocast does the low precision) and the learning rates")
                result.history.append({"step": step, "loss": task_loss,
                                       "expected_density": running_density.item(),
                                       **({"hard_density": hard_density.item()} if target_density is not None
                                          else {}),
                                       "lambda": float(lam), "temperature": degrees.temperature,
                                       **_degree_summary(d)})
                if progress is not None:
                    progress(result.history[-1])
            step += 1
    result.final_lambda = float(lam)
    result.seconds = time.time() - t0
    return result


def hard_sparsity(degrees: SoftNeighbourDegrees, layouts: list[TokenLayout], offset: float = 0.0) -> float:
    """Measured overall sparsity of the exported plan (degrees shifted by ``offset``) on ``layouts``."""
    saved = degrees.degree.data.clone()
    try:
        degrees.degree.data += offset
        plan = degrees.to_plan()
    finally:
        degrees.degree.data.copy_(saved)
    layer_plans = plan.resolve(degrees.num_layers, degrees.num_heads)
    total = None
    for lay in layouts:
        rep = measure_plan(layer_plans, lay)
        total = rep if total is None else total + rep
    return total.overall


class DegreeTable:
    """Kept pairs of a window ``neighbour(k) | global_tokens(g)`` on a set of layouts, for every k at once.

    A pair is kept when it is global, or when |i - j| <= k; so with r = 0 for global pairs and |i - j|
    otherwise, kept(k) = #allowed pairs with r <= k: a cumulative histogram of r. Exact, and the same
    counts `sparseattn.sparsity` makes (the tests check it against `measure_plan`)."""

    def __init__(self, layouts: list[TokenLayout], global_tokens: int):
        hist = torch.zeros(1, dtype=torch.long)
        allowed = 0
        for lay in layouts:
            p = lay.positions
            allow = lay.allowed()[:, 0]
            r = (p[:, :, None] - p[:, None, :]).abs()
            if global_tokens:
                glob = lay.real & (p < global_tokens)
                r = torch.where(glob[:, :, None] | glob[:, None, :], torch.zeros_like(r), r)
            h = torch.bincount(r[allow].flatten())
            hist = torch.nn.functional.pad(hist, (0, max(0, len(h) - len(hist))))
            hist[:len(h)] += h
            allowed += int(allow.sum())
        self.kept = hist.cumsum(0)  # kept[k] for k < len; beyond, everything
        self.allowed = allowed

    def kept_at(self, k: torch.Tensor) -> torch.Tensor:
        return self.kept[k.to(self.kept.device).clamp(min=0, max=len(self.kept) - 1)]

    def sparsity(self, hard_degrees: torch.Tensor, learned_layers: list[int]) -> float:
        """Overall sparsity for (layers, heads) hard degrees; layers not learned count as dense."""
        L, H = hard_degrees.shape
        kept = sum(float(self.kept_at(hard_degrees[l]).sum()) if l in learned_layers else H * self.allowed
                   for l in range(L))
        return 1.0 - kept / (L * H * self.allowed)


def max_sparsity(table: "DegreeTable", degrees: SoftNeighbourDegrees) -> float:
    """The sparsest plan learning can export on the table's data: every learned degree 0, so each token
    keeps itself and the global tokens."""
    return table.sparsity(torch.zeros(degrees.num_layers, degrees.num_heads, dtype=torch.long), degrees.layers)


def check_reachable(table: "DegreeTable", degrees: SoftNeighbourDegrees, target_sparsity: float,
                    what: str = "the calibration data") -> None:
    """Refuse a target sparsity no plan of neighbour windows can reach on this data."""
    top = max_sparsity(table, degrees)
    if target_sparsity > top + 1e-9:
        raise ValueError(
            f"target_sparsity {target_sparsity:g} cannot be reached on {what}: with global_tokens="
            f"{degrees.global_tokens} and {len(degrees.layers)} of {degrees.num_layers} layers learned, the sparsest "
            f"plan (every degree 0: each token keeps itself and the global tokens) is {top:.4f} sparse; ask for at "
            f"most that, use global_tokens=0, or learn more layers")


def calibrate_offset(degrees: SoftNeighbourDegrees, layouts: list[TokenLayout], target_sparsity: float,
                     *, max_length: int | None = None, table: DegreeTable | None = None) -> float:
    """Shift every degree by one common offset so the hard plan's sparsity on ``layouts`` is as close as
    possible to ``target_sparsity``; applies the offset and returns it. Sparsity falls as the offset
    grows, so the offset is found by bisection over [-max degree - 1, max_length]. ``table``: the
    layouts' DegreeTable, if the caller has built it already."""
    table = table if table is not None else DegreeTable(layouts, degrees.global_tokens)
    raw = degrees.degree.detach().cpu()  # the table lives on the CPU
    check_reachable(table, degrees, target_sparsity)

    def sparsity_at(offset: float) -> float:
        hard = (raw + offset + 0.5).floor().clamp(min=0).long()
        return table.sparsity(hard, degrees.layers)

    hi_len = max_length or max(int(l.lengths.max()) for l in layouts)
    lo, hi = -float(raw.max()) - 1.0, float(hi_len) - float(raw.min()) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sparsity_at(mid) > target_sparsity:
            lo = mid  # too sparse: widen
        else:
            hi = mid
    best = min((lo, hi), key=lambda o: abs(sparsity_at(o) - target_sparsity))
    degrees.degree.data += best
    return best
