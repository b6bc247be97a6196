"""`sparseattn learn`: learned neighbour degrees on a GLUE task (registered into the CLI)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from ..training.config import FinetuneConfig
from ..training.record import one_class_warning
from .glue import LearnGlueConfig, learn_glue


def cmd_learn(args) -> int:
    cfg = LearnGlueConfig(task=args.task, model=args.model, seed=args.seed, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, max_length=args.max_length, limit_train=args.limit_train,
                          limit_eval=args.limit_eval, precision=args.precision, lam=args.lam,
                          target_sparsity=args.target_sparsity, init_degree=args.init_degree,
                          global_tokens=args.global_tokens, learn_layers=args.layers, degree_lr=args.degree_lr,
                          dual_lr=args.dual_lr, t_start=args.t_start, t_end=args.t_end, hard_epochs=args.hard_epochs)
    r = learn_glue(cfg, glue_dir=args.glue_dir, out_dir=args.out, device=args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0 and "distributed" in r:  # under torchrun rank 0 alone reports
        return 0
    sp, le = r["sparsity"], r["learned"]
    print(f"\n{r['task']} | {cfg.label} | seed {cfg.seed} on {r['device']}")
    print("  " + ", ".join(f"{k} {100 * v:.2f}" for k, v in r["metrics"].items()))
    warn = one_class_warning(r)
    if warn:
        print(f"  WARNING: {warn}")
    print(f"  measured sparsity on {r['data']['eval_split']}: {sp['overall']:.1%} overall, {sp['applied']:.1%} in the "
          "learned heads")
    if cfg.target_sparsity is not None:
        print(f"  target {cfg.target_sparsity:.1%}: exported plan at {le['train_sparsity_of_exported_plan']:.1%} on "
              f"train (calibration offset {le['calibration_offset']:+.2f})")
    print("  learned degrees (layers x heads):")
    for i, row in enumerate(le["degrees"]):
        print(f"    layer {i}: {' '.join(f'{d:3d}' for d in row)}")
    print(f"  plan, degrees.png, results.json: {Path(args.out)}")
    return 0


def register(sub, formatter_class) -> None:
    p = sub.add_parser(
        "learn", help="learn each head's neighbour degree while penalizing density, then fine-tune the hard plan",
        formatter_class=formatter_class,
        description="Learn a neighbour degree per (layer, head) with soft windows and a density penalty (or a "
                    "target sparsity), anneal to hard windows, export the result as an ordinary plan, and fine-tune "
                    "briefly under it. Writes the plan, a heatmap of the degrees and results.json.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn learn --task sst2 --lambda 0.5 --out runs/learn-sst2-lam0.5
              sparseattn learn --task mrpc --target-sparsity 0.8 --epochs 3 --out runs/learn-mrpc-80
              sparseattn learn --task stsb --lambda 1 --layers later-half --limit-train 500 --out runs/tiny
            """))
    F, D = FinetuneConfig.__dataclass_fields__, LearnGlueConfig.__dataclass_fields__
    p.add_argument("--task", default=F["task"].default, help="GLUE task (any spelling)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--lambda", "--lam", dest="lam", type=float, default=None, help="density penalty weight lambda")
    group.add_argument("--target-sparsity", type=float, default=None, help="overall sparsity to reach, in [0, 1)")
    p.add_argument("--model", default=None, help="hub id or path (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--seed", type=int, default=0, help="seeds the new head, the data order and the fine-tuning")
    p.add_argument("--epochs", type=int, default=F["epochs"].default, help="epochs of the soft phase")
    p.add_argument("--hard-epochs", type=int, default=D["hard_epochs"].default,
                   help="epochs of fine-tuning under the exported hard plan")
    p.add_argument("--lr", type=float, default=F["lr"].default, help="peak learning rate of the model's weights")
    p.add_argument("--degree-lr", type=float, default=D["degree_lr"].default, help="learning rate of the degrees")
    p.add_argument("--dual-lr", type=float, default=D["dual_lr"].default,
                   help="target mode: step of the multiplier's dual ascent")
    p.add_argument("--init-degree", type=float, default=D["init_degree"].default,
                   help="every head's soft degree at the start")
    p.add_argument("--global-tokens", type=int, default=D["global_tokens"].default,
                   help="the first g tokens stay global (not learned)")
    p.add_argument("--layers", default=D["learn_layers"].default,
                   help="layers that learn a window (all, later-half, layers=3-5, ...); others stay dense")
    p.add_argument("--t-start", type=float, default=D["t_start"].default, help="initial soft-window temperature")
    p.add_argument("--t-end", type=float, default=D["t_end"].default, help="final temperature (annealed geometrically)")
    p.add_argument("--batch-size", type=int, default=F["batch_size"].default, help="examples per training step (per process under torchrun)")
    p.add_argument("--max-length", type=int, default=F["max_length"].default, help="longer examples are truncated")
    p.add_argument("--limit-train", type=int, default=None,
                   help="a fixed random subset of the train split (default: all; a small run: 500)")
    p.add_argument("--limit-eval", type=int, default=None, help="likewise for the evaluation split (default: all)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--glue-dir", default=None, help="GLUE TSV folder (default: $GLUE_DIR, else the hub)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_learn, data_parallel=True)
