"""Fine-tune a model on a GLUE task under a plan, evaluate on dev, and measure the plan's sparsity.

    from sparseattn.experiments.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(task="sst2", plan="later-half: neighbour(2)", epochs=1), out_dir="out/run")
    result["metrics"], result["sparsity"]["overall"]

A plain PyTorch loop, the standard recipe (AdamW with decoupled weight decay, linear warmup then linear
decay, gradient clipping, bf16 autocast on GPU) kept free of per-step host synchronization: the data
is tokenized once, batches are length-bucketed and padded per batch, losses stay on the device until an
epoch ends. The dense baseline runs the model's own attention; any other plan runs through
``sparsify(model, plan, backend)``.

``FinetuneConfig`` holds everything that decides the result (a sweep's run key hashes it); where the
data comes from, where results go and how progress shows are arguments of ``finetune``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .batching import collate, encode_split, eval_batches, to_device, train_batches
from .glue import get_task, load_split
from .metrics import compute_metrics

log = logging.getLogger("sparseattn")
_ENCODED: dict = {}  # (model, task, split, ...) -> EncodedSplit, the few most recent


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
    method: str = "finetune"  # what a sweep runs for this config: "finetune", or "learn" (LearnGlueConfig)

    def __post_init__(self):
        t = get_task(self.task)
        self.task = t.name
        self.plan = canonical_plan(self.plan)
        digest = plan_digest(self.plan)
        if self.plan_digest is not None and self.plan_digest != digest:
            raise ValueError(f"the plan folder {self.plan} changed since this run was configured (its files hash to "
                             f"{digest}, the run was made for {self.plan_digest}); queue the run again")
        self.plan_digest = digest
        if self.method != type(self).method_name:
            raise ValueError(f"method {self.method!r} does not fit {type(self).__name__}; use "
                             "sparseattn.experiments.sweep.config_from_dict to build a run of any method")
        for name in ("epochs", "batch_size", "max_length", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and name != "seed") or v < 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        for name in ("limit_train", "limit_eval"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown fine-tune option(s) {', '.join(map(repr, unknown))}; expected some of "
                             f"{', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    method_name = "finetune"  # class attribute: the method this config class runs

    @property
    def display_plan(self) -> str:
        """How results tables name this run's plan."""
        return self.plan


def canonical_plan(plan: str) -> str:
    """The plan's canonical spec (so 'later-half:neighbour(2)' and 'later-half: neighbour(2)' are one
    run); a saved plan's folder stays a path."""
    from ..plans.io import is_plan_path
    from ..plans.plan import Plan

    if not isinstance(plan, str):
        raise TypeError(f"plan must be a spec string or a saved plan's folder, got {type(plan).__name__}")
    if is_plan_path(plan):
        return plan
    return Plan.parse(plan).spec()


def plan_digest(plan: str) -> str | None:
    """A hash of a saved plan folder's files, so a sweep never mistakes a rewritten folder for the same run;
    None for a plan spec (the spec is its own identity)."""
    import hashlib

    from ..plans.io import is_plan_path

    if not is_plan_path(plan):
        return None
    folder = Path(plan) if Path(plan).is_dir() else Path(plan).parent
    h = hashlib.sha256()
    for name in ("plan.json", "masks.safetensors"):
        f = folder / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def subset(n: int, limit: int | None) -> np.ndarray:
    """Indices of a fixed random subset (seeded apart from the run's seed, so every run of a sweep sees
    the same examples), in file order."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(1234).permutation(n)[:limit])


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return precision


def package_versions() -> dict:
    import transformers

    from .. import __version__

    v = {"sparseattn": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
         "numpy": np.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def readout_isolated_layers(plan, model, batch: dict, tokenizer=None) -> list[int]:
    """Layers in which, for every example of ``batch``, the first real token (BERT's [CLS], which a
    sequence classifier reads) keeps only itself in every head under ``plan``. If that is every layer,
    the classifier's input does not depend on the sentence."""
    from ..measure import layout_of_batch

    cfg_text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    special_ids = torch.tensor(tokenizer.all_special_ids) if tokenizer is not None else None
    layout = layout_of_batch(batch, special_ids=special_ids, embeddings=model.get_input_embeddings())
    first = layout.real.float().argmax(-1)  # (B,) index of each example's first real token
    rows = torch.arange(layout.batch_size)
    cache: dict = {}
    isolated = []
    for lp in plan.resolve(cfg_text.num_hidden_layers, cfg_text.num_attention_heads):
        keep = lp.mask(layout, cache)  # (B, H or 1, L, L)
        kept = keep[rows, :, first, :].sum(-1)  # (B, H) keys the first token keeps
        if bool((kept <= 1).all()):
            isolated.append(lp.layer)
    return isolated


def _model_inputs(batch: dict, pass_structure: bool) -> dict:
    keys = ["input_ids", "attention_mask", "token_type_ids"] + (["sparse_structure"] if pass_structure else [])
    return {k: batch[k] for k in keys if k in batch}


@torch.no_grad()
def predict(model, split, *, batch_size: int, device, autocast, pass_structure: bool, regression: bool,
            pad_to: int = 1, progress: bool = False) -> np.ndarray:
    """Predictions for every example of ``split`` in its order: class ids, or scores for regression."""
    from tqdm.auto import tqdm

    model.eval()
    outs, order = [], []
    for idx in tqdm(eval_batches(split, batch_size), desc="evaluate", leave=False, disable=not progress):
        batch = to_device(collate(split, idx, pad_to_multiple_of=pad_to, pin=device.type == "cuda"), device)
        with autocast():
            logits = model(**_model_inputs(batch, pass_structure)).logits
        outs.append(logits.squeeze(-1).float() if regression else logits.argmax(-1))
        order.append(idx)
    pred = torch.cat(outs).cpu().numpy()
    out = np.empty_like(pred)
    out[np.concatenate(order)] = pred
    return out


def finetune(config: FinetuneConfig, *, glue_dir=None, out_dir=None, device=None, progress: bool = True,
             save_model: bool = False, parse_cache: str | None = None, on_malformed: str = "error") -> dict:
    """Run one fine-tuning and return its results (also written to ``out_dir/results.json`` if given)."""
    from tqdm.auto import tqdm

    from .. import measure_sparsity, sparsify, unsparsify
    from ..integrations.hf import _as_plan
    from ..models import load_model, load_tokenizer, resolve_model
    from ..plans.plan import Plan
    from ..sparsity import measure_plan
    from ..measure import layout_of_batch

    t_start = time.perf_counter()
    cfg = config
    task = get_task(cfg.task)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    precision = resolve_precision(cfg.precision, device)
    plan = _as_plan(cfg.plan)
    dense = not plan.rules
    needs_structure = plan.input_dependent
    parses = None
    if plan.needs_parser:
        from ..text.parse import DEFAULT_PARSER, ParseCache

        parses = ParseCache(parse_cache, parser=cfg.parser or DEFAULT_PARSER)

    # -- data ---------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    train_ex = load_split(task, "train", glue_dir, on_malformed=on_malformed)
    eval_ex = load_split(task, cfg.eval_split, glue_dir, on_malformed=on_malformed)
    train_ex = [train_ex[i] for i in subset(len(train_ex), cfg.limit_train)]
    eval_ex = [eval_ex[i] for i in subset(len(eval_ex), cfg.limit_eval)]
    tokenizer = load_tokenizer(cfg.model)

    def encoded(split_name, examples, limit):
        # runs of a sweep share their data: tokenize it once per process
        key = (resolve_model(cfg.model), task.name, split_name, limit, cfg.max_length, needs_structure, cfg.parser,
               hash(tuple(examples)))
        if key not in _ENCODED:
            _ENCODED[key] = encode_split(tokenizer, examples, cfg.max_length, structure=needs_structure,
                                         parses=parses, regression=task.is_regression,
                                         what=f"{task.folder} {split_name}")
            while len(_ENCODED) > 4:
                _ENCODED.pop(next(iter(_ENCODED)))
        return _ENCODED[key]

    train = encoded("train", train_ex, cfg.limit_train)
    evals = encoded(cfg.eval_split, eval_ex, cfg.limit_eval)
    if not evals.has_labels:
        raise ValueError(f"{task.folder} {cfg.eval_split} has no labels (GLUE hides test labels); evaluate on dev")
    t_data = time.perf_counter() - t0

    # -- model --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    set_seed(cfg.seed)
    # fp32 master weights whatever the checkpoint's dtype (autocast does the low-precision math)
    model = load_model(cfg.model, task="classification", num_labels=task.num_labels, dtype=torch.float32)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.max_length > max_pos:
        raise ValueError(f"max_length={cfg.max_length} is more than the model's {max_pos} positions")
    if not dense:
        sparsify(model, plan, backend=cfg.backend, tokenizer=tokenizer)
    model.to(device)
    t_model = time.perf_counter() - t0
    readout_isolated = False
    if not dense and not getattr(model.config, "is_decoder", False):
        probe = collate(train, np.arange(min(len(train), 256)))
        layers = readout_isolated_layers(plan, model, probe, tokenizer)
        readout_isolated = len(layers) == model.config.num_hidden_layers
        if readout_isolated:
            log.warning("%s: in every layer the plan %r lets the first token ([CLS], which the classifier reads) "
                        "attend only to itself, so the model's predictions cannot depend on the input; give it "
                        "other keys (e.g. `| global_tokens(1)`, or special='global' for syntax and lexical)",
                        task.folder, plan.spec())

    if precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    elif precision == "fp16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.float16)  # noqa: E731
    else:
        autocast = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    use_cuda = device.type == "cuda"
    pad_to = 8 if use_cuda else 1  # tensor-core friendly shapes

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup * total_steps)
    opt_kw = {"fused": True} if use_cuda else {}
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, **opt_kw)

    def lr_factor(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = np.random.default_rng(cfg.seed)
    losses = torch.zeros(total_steps, device=device)
    epochs, step = [], 0
    t_train = t_eval = 0.0
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        batches = train_batches(train, cfg.batch_size, rng)
        bar = tqdm(batches, desc=f"{task.folder} epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   dynamic_ncols=True)
        for i, idx in enumerate(bar):
            batch = to_device(collate(train, idx, pad_to_multiple_of=pad_to, pin=use_cuda), device)
            with autocast():
                logits = model(**_model_inputs(batch, needs_structure and not dense)).logits
            loss = _loss(logits, batch["labels"], task.is_regression)
            scaler.scale(loss).backward()
            if cfg.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses[step] = loss.detach()
            step += 1
            if progress and (i % 50 == 49 or i == len(batches) - 1):  # a host sync every 50 steps only
                bar.set_postfix(loss=f"{losses[max(0, step - 50):step].mean().item():.4f}")
        bar.close()
        if use_cuda:
            torch.cuda.synchronize(device)
        epoch_train = time.perf_counter() - t0
        t_train += epoch_train
        t0 = time.perf_counter()
        pred = predict(model, evals, batch_size=max(256, cfg.batch_size), device=device, autocast=autocast,
                       pass_structure=needs_structure and not dense, regression=task.is_regression, pad_to=pad_to,
                       progress=progress)
        metrics = compute_metrics(task.metrics, pred, evals.labels)
        t_eval += time.perf_counter() - t0
        ep_losses = losses[step - len(batches):step].float().cpu().numpy()
        epochs.append({"epoch": epoch + 1, "train_loss": float(ep_losses.mean()), "train_seconds": epoch_train,
                       "metrics": metrics})
        if progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            tqdm.write(f"{task.folder} epoch {epoch + 1}: train loss {ep_losses.mean():.4f}, {cfg.eval_split} "
                       f"{shown} ({epoch_train:.1f} s)")

    # -- sparsity of the plan on the evaluation data (the one definition: sparseattn.sparsity) --------
    t0 = time.perf_counter()
    eval_batch_list = [collate(evals, idx) for idx in eval_batches(evals, 256)]
    if dense:
        cfg_text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        lps = Plan.dense().resolve(cfg_text.num_hidden_layers, cfg_text.num_attention_heads)
        report = None
        for b in eval_batch_list:
            r = measure_plan(lps, layout_of_batch(b))
            report = r if report is None else report + r
    else:
        report = measure_sparsity(model, eval_batch_list)
    t_sparsity = time.perf_counter() - t0

    loss_curve = losses.float().cpu().numpy()
    window = max(1, len(loss_curve) // 50)
    curve = [float(loss_curve[i:i + window].mean()) for i in range(0, len(loss_curve), window)]
    result = {
        "config": cfg.to_dict(),
        "task": task.name,
        "plan": plan.spec(),
        "plan_name": plan.name,
        "model": resolve_model(cfg.model),
        "main_metric": task.main_metric,
        "metrics": epochs[-1]["metrics"],
        "score": epochs[-1]["metrics"][task.main_metric],
        "epochs": epochs,
        "train_loss_curve": {"window_steps": window, "values": curve},
        "sparsity": report.to_dict(),
        "readout_isolated": readout_isolated,
        "data": {
            "source": str(glue_dir) if glue_dir else (os.environ.get("GLUE_DIR") or "hub: nyu-mll/glue"),
            "train_examples": len(train), "eval_examples": len(evals), "eval_split": cfg.eval_split,
            "max_length": cfg.max_length, "train_truncated": train.truncated, "eval_truncated": evals.truncated,
            "train_tokens": int(train.lengths.sum()), "eval_tokens": int(evals.lengths.sum()),
        },
        "timing": {
            "data_seconds": t_data, "model_seconds": t_model, "train_seconds": t_train, "eval_seconds": t_eval,
            "sparsity_seconds": t_sparsity, "total_seconds": time.perf_counter() - t_start,
            "train_examples_per_second": len(train) * cfg.epochs / max(t_train, 1e-9),
        },
        "precision": precision,
        "device": device_description(device),
        "versions": package_versions(),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        if save_model:
            from ..plans.io import save_plan

            if not dense:
                unsparsify(model)
            model.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
            save_plan(plan, out / "plan")
    return result

