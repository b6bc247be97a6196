"""`sparseattn learn`: learn each head's neighbour degree on a GLUE task, export a hard plan, fine-tune it.

Three phases, each an ordinary part of the toolkit:
1. soft: the model trains with learnable soft windows (`attach_degrees`) on task loss + lambda x expected
   density (or a target sparsity, by dual ascent), the temperature annealing towards hard windows;
2. export: the degrees become an ordinary plan (`neighbour(k) | global_tokens(g)` per head group),
   calibrated to the target when one was given, saved with `save_plan`, drawn as a heatmap;
3. hard: `finetune` continues from the soft phase's weights under the exported plan for
   ``hard_epochs``, so the final model runs on any backend, and its dev metric and measured sparsity
   are what the run reports.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..layout import TokenLayout
from ..models import load_tokenizer, resolve_model
from ..patterns import full
from ..plans.io import save_plan
from ..plans.plan import Rule
from ..plans.spec import parse_selector
from ..training.batching import EncodedSplit, collate, encode_split, to_device, train_batches
from ..training.config import FinetuneConfig
from ..training.data import load_examples
from ..training.distributed import Distributed, loss_weights, shard_batches
from ..training.distributed import from_env as distributed_from_env
from ..training.finetune import finetune, load_classifier
from ..training.glue import GlueTask, get_task
from ..training.loop import AUTOCAST_DTYPES, MODEL_INPUTS, resolve_device, resolve_precision, set_seed
from ..training.methods import Method, register_method
from ..training.record import write_results
from . import attach_degrees, detach_degrees
from .soft_window import SoftNeighbourDegrees
from .train import DegreeTable, LearnConfig, LearnResult, calibrate_offset, check_reachable, hard_sparsity, learn

MODEL_KEYS = MODEL_INPUTS + ("labels",)


@dataclass
class LearnGlueConfig(FinetuneConfig):
    """A FinetuneConfig (``epochs`` = soft-phase epochs) plus what learning the degrees needs."""

    lam: float | None = None  # density penalty weight; or give target_sparsity
    target_sparsity: float | None = None  # overall sparsity the exported plan should have, in [0, 1)
    init_degree: float = 16.0
    global_tokens: int = 1  # the first g tokens stay global, not learned
    learn_layers: str = "all"  # layer selector of the plan grammar: all, later-half, layers=3-5, ...
    degree_lr: float = 0.5
    dual_lr: float = 0.01  # target mode's multiplier step (see learned/train.py); lambda mode ignores it
    t_start: float = 4.0
    t_end: float = 0.05
    hard_epochs: int = 1
    method: str = "learn"

    method_name = "learn"

    def __post_init__(self):
        super().__post_init__()
        if self.plan != "dense":
            raise ValueError(f"learn starts from a dense model; plan must be 'dense', got {self.plan!r}")
        if (self.lam is None) == (self.target_sparsity is None):
            raise ValueError("give exactly one of lam (a density penalty) and target_sparsity")
        LearnConfig(lam=self.lam, target_sparsity=self.target_sparsity, t_start=self.t_start, t_end=self.t_end)
        if self.init_degree < 0 or self.global_tokens < 0:
            raise ValueError(f"init_degree and global_tokens must be >= 0, got {self.init_degree}, "
                             f"{self.global_tokens}")
        if isinstance(self.hard_epochs, bool) or not isinstance(self.hard_epochs, int) or self.hard_epochs < 1:
            raise ValueError(f"hard_epochs must be a positive integer (the hard plan is always fine-tuned), "
                             f"got {self.hard_epochs!r}")
        self.layer_rule()  # a bad selector fails here, with a caret

    def check_model_shape(self, num_layers: int, num_heads: int, max_positions: int | None) -> None:
        super().check_model_shape(num_layers, num_heads, max_positions)
        self.layer_rule().resolve_layers(num_layers)  # learn_layers in range

    def layer_rule(self) -> Rule:
        """A rule over the layers whose degrees are learned (its pattern is a placeholder)."""
        layers, heads = parse_selector(self.learn_layers)
        return Rule(full(), layers=layers, heads=heads)

    @property
    def label(self) -> str:
        what = f"lam={self.lam:g}" if self.lam is not None else f"target={self.target_sparsity:g}"
        return f"learned({what})"

    @property
    def display_plan(self) -> str:
        return self.label


def draw_degrees(degrees: torch.Tensor, path, *, title: str = "") -> Path:
    """Heatmap of learned degrees (layers x heads)."""
    import matplotlib  # here, not at the top: it is slow to import and only pictures need it

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    d = degrees.cpu().numpy()
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * d.shape[1], 1.2 + 0.5 * d.shape[0]))
    im = ax.imshow(d, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(d):
        ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7, color="white" if v < d.max() / 2 else "black")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(d.shape[1]))
    ax.set_yticks(range(d.shape[0]))
    fig.colorbar(im, ax=ax, label="neighbour degree")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class SoftPhase:
    """What the soft phase leaves: the model with its learned degrees, and the layouts the exported plan is
    calibrated and measured on (train examples, as padded in batches)."""

    model: torch.nn.Module
    tokenizer: object
    degrees: SoftNeighbourDegrees
    layouts: list[TokenLayout]
    table: DegreeTable | None
    result: LearnResult


def soft_phase(cfg: LearnGlueConfig, task: GlueTask, device: torch.device, *, glue_dir=None, progress: bool = True,
               on_malformed: str = "error", dist: Distributed | None = None) -> SoftPhase:
    """Train the model with learnable soft windows on task loss + lambda x expected density (or towards a
    target sparsity), annealing the temperature towards hard windows. dist: data-parallel (see ``learn``)."""
    dist = dist or Distributed()
    train_ex = load_examples(task, "train", cfg.limit_train, glue_dir, on_malformed=on_malformed)
    tokenizer = load_tokenizer(cfg.model)
    train = encode_split(tokenizer, train_ex, cfg.max_length, regression=task.is_regression,
                         what=f"{task.folder} train")
    set_seed(cfg.seed)
    model = load_classifier(cfg.model, task, cfg.max_length)
    layers = list(cfg.layer_rule().resolve_layers(model.config.num_hidden_layers))
    degrees = attach_degrees(model, init_degree=cfg.init_degree, global_tokens=cfg.global_tokens,
                             temperature=cfg.t_start, layers=layers, tokenizer=tokenizer)
    model.to(device)
    calib_idx = np.random.default_rng(0).permutation(len(train))[:4096]
    layouts = [TokenLayout(real=collate(train, calib_idx[i:i + 256])["attention_mask"].bool())
               for i in range(0, len(calib_idx), 256)]
    table = None
    if cfg.target_sparsity is not None:  # refuse an unreachable target before the soft phase, not after
        table = DegreeTable(layouts, degrees.global_tokens)
        check_reachable(table, degrees, cfg.target_sparsity, what=f"{task.folder} train ({len(calib_idx)} examples)")
    precision = resolve_precision(cfg.precision, device)
    result = _learn(cfg, task, model, degrees, train, device, AUTOCAST_DTYPES.get(precision), progress, dist)
    return SoftPhase(model, tokenizer, degrees, layouts, table, result)


def _learn(cfg: LearnGlueConfig, task: GlueTask, model, degrees, train: EncodedSplit, device, autocast_dtype,
           progress: bool, dist: Distributed) -> LearnResult:
    """``cfg.batch_size`` examples per rank: each step's global batch is drawn as one process with
    ``batch_size x world_size`` would draw it, and each rank takes its slice (as ``finetune`` does)."""
    rng = np.random.default_rng(cfg.seed)
    pad_to = 8 if device.type == "cuda" else 1
    global_batch = cfg.batch_size * dist.world_size

    def batches():
        global_batches = train_batches(train, global_batch, rng)
        for idx, weight in zip(shard_batches(global_batches, dist.rank, dist.world_size),
                               loss_weights(global_batches, dist.rank, dist.world_size)):
            b = collate(train, idx, pad_to_multiple_of=pad_to, pin=device.type == "cuda")
            yield {**to_device({k: b[k] for k in MODEL_KEYS if k in b}, device), "loss_weight": weight}

    steps = cfg.epochs * math.ceil(len(train) / global_batch)
    soft_cfg = LearnConfig(lam=cfg.lam, target_sparsity=cfg.target_sparsity, steps=steps, lr=cfg.lr,
                           degree_lr=cfg.degree_lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup,
                           t_start=cfg.t_start, t_end=cfg.t_end, dual_lr=cfg.dual_lr,
                           max_grad_norm=cfg.max_grad_norm or float("inf"), log_every=max(1, steps // 20))
    bar = tqdm(total=steps, desc=f"{task.folder} learn degrees ({cfg.label})", disable=not progress)

    def show(h):
        bar.n = h["step"] + 1
        bar.set_postfix(loss=f"{h['loss']:.3f}", density=f"{h['expected_density']:.3f}", T=f"{h['temperature']:.2f}",
                        deg=f"{h['degree_mean']:.1f}")
        bar.refresh()

    result = learn(model, degrees, batches, soft_cfg, device=device, autocast_dtype=autocast_dtype, progress=show,
                   net=dist.wrap(model), dist=dist)
    bar.close()
    return result


@dataclass
class Export:
    plan_dir: Path
    degrees: torch.Tensor  # (layers, heads) hard degrees of the exported plan
    offset: float  # the calibration offset (0 without a target)
    train_sparsity: float  # the exported plan's sparsity on the calibration layouts
    soft_model: Path  # the soft phase's weights, without the degrees


def export(cfg: LearnGlueConfig, task: GlueTask, soft: SoftPhase, out: Path) -> Export:
    """The degrees become an ordinary plan (calibrated to the target when one was given), saved and drawn;
    the model, back on ordinary attention, is saved for the hard phase."""
    degrees, model = soft.degrees, soft.model
    offset = 0.0
    if cfg.target_sparsity is not None:
        offset = calibrate_offset(degrees, soft.layouts, cfg.target_sparsity, max_length=cfg.max_length,
                                  table=soft.table)
    learned = degrees.hard_degrees().cpu()  # (sent to the other ranks under torchrun: no device of its own)
    plan_dir = save_plan(degrees.to_plan(), out / "plan", num_layers=model.config.num_hidden_layers,
                         num_heads=model.config.num_attention_heads, length=cfg.max_length,
                         metadata={"learned": cfg.to_dict()})
    draw_degrees(learned, out / "degrees.png", title=f"{task.name}: learned neighbour degrees, {cfg.label}")
    train_sparsity = hard_sparsity(degrees, soft.layouts)
    detach_degrees(model)
    model.save_pretrained(out / "soft_model")
    soft.tokenizer.save_pretrained(out / "soft_model")
    return Export(plan_dir, learned, offset, train_sparsity, out / "soft_model")


def learn_glue(cfg: LearnGlueConfig, *, glue_dir=None, out_dir=None, device=None, progress: bool = True,
               on_malformed: str = "error") -> dict:
    """Run the three phases; returns the hard phase's results with a ``learned`` section added.

    Under torchrun data-parallel: the soft phase as ``learn`` describes, the hard phase as ``finetune``. Every
    rank ends the soft phase with the same weights and degrees; rank 0 alone exports them (plan, picture,
    soft model, results) to ``out_dir`` (default: a temporary folder of its own), which every rank's hard phase
    then reads: on several machines ``out_dir`` must be a folder they all see."""
    t_start = time.perf_counter()
    task = get_task(cfg.task)
    dist = distributed_from_env()
    device = resolve_device(dist.device(device))
    with dist.joined(device):
        return _learn_glue(cfg, task, dist, device, t_start, glue_dir=glue_dir, out_dir=out_dir,
                           progress=progress and dist.is_main, on_malformed=on_malformed)


def _learn_glue(cfg: LearnGlueConfig, task: GlueTask, dist: Distributed, device, t_start: float, *, glue_dir,
                out_dir, progress: bool, on_malformed: str) -> dict:
    own_tmp = tempfile.TemporaryDirectory(prefix="sparseattn-learn-") if out_dir is None and dist.is_main else None
    out = Path(dist.broadcast(str(out_dir if own_tmp is None else own_tmp.name)))  # rank 0's folder
    soft = soft_phase(cfg, task, device, glue_dir=glue_dir, progress=progress, on_malformed=on_malformed, dist=dist)
    # transformers saves a model from rank 0 only (under torch.distributed), so rank 0 exports for every rank
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        made = export(cfg, task, soft, out)
    made = dist.broadcast(made if dist.is_main else None)  # after rank 0 wrote it: every rank may read it now
    soft_result = soft.result
    del soft  # the soft model's memory, before the hard phase loads its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # the hard phase: fine-tune the soft phase's weights under the exported plan
    hard_cfg = FinetuneConfig.from_dict({**cfg.finetune_options(), "plan": str(made.plan_dir),
                                         "model": str(made.soft_model), "epochs": cfg.hard_epochs})
    result = finetune(hard_cfg, glue_dir=glue_dir, out_dir=out / "hard", device=device, progress=progress,
                      on_malformed=on_malformed)
    result["config"] = cfg.to_dict()
    result["model"] = resolve_model(cfg.model)  # where the run started: the hard phase's model is the soft one's copy
    result["plan_name"] = cfg.label
    result["learned"] = {
        "degrees": made.degrees.tolist(),
        "soft_history": soft_result.history,
        "final_lambda": soft_result.final_lambda,
        "calibration_offset": made.offset,
        "train_sparsity_of_exported_plan": made.train_sparsity,
        "soft_seconds": soft_result.seconds,
        "plan_dir": str(made.plan_dir) if out_dir is not None else None,
        "soft_model": str(made.soft_model) if out_dir is not None else None,
    }
    result["timing"]["total_seconds"] = time.perf_counter() - t_start
    if out_dir is not None and dist.is_main:
        write_results(result, out)
    dist.barrier()  # every rank's hard phase is over before the temporary folder goes
    if own_tmp is not None:
        own_tmp.cleanup()
    return result


register_method(Method("learn", LearnGlueConfig, learn_glue))
