"""Attention Pruning on GLUE: dev metric against the fraction pruned, AP masks against random masks.

For every task:
  1. fine-tune the dense model (the p = 0 row; its checkpoint is kept);
  2. collect its mean attention over the training split (`sparseattn ap collect`), at the fine-tuning
     max_length, truncating longer examples the way fine-tuning does;
  3. make AP masks and random masks of the same per-layer sparsity for every p (`sparseattn ap mask`);
  4. re-fine-tune the pretrained model under each mask (`finetune` with the plan folder);
  5. write results.csv, table.md and metric_vs_sparsity.png under --out.

Every step is skipped when its output exists, so the script resumes where it stopped. Run folders carry
the budget and scope in their names, so changing them never reuses stale results. Fine-tunes of a phase
run in --jobs processes at once (the small model leaves one GPU mostly idle at batch 32, so several
processes share it well).

    # the study (GPU): SST-2 one epoch, the others three, eight fine-tunes at a time on one H100
    python studies/ap_glue.py --out out/ap_glue --task-epochs sst2=1 --jobs 8
    # the CPU demonstration in docs/attention-pruning.md
    python studies/ap_glue.py --out out/ap_demo --tasks sst2 --percents 60 --epochs 1 --limit-train 2000 \\
        --collect-limit 2000
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

TASKS = ["sst2", "mrpc", "rte", "cola", "stsb"]
PERCENTS = [20, 40, 60, 80, 90]


def log(msg: str) -> None:
    print(f"[ap_glue] {msg}", file=sys.stderr, flush=True)


def run_finetune(cfg, out_dir: Path, save_model: bool = False) -> dict:
    from sparseattn.experiments.finetune import finetune

    done = out_dir / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    log(f"fine-tune {cfg.task} plan={cfg.plan} -> {out_dir}")
    res = finetune(cfg, out_dir=out_dir, save_model=save_model, progress=False)
    log(f"done {cfg.task} plan={Path(str(cfg.plan)).name}: {res['main_metric']} {res['score']:.4f} "
        f"in {res['timing']['total_seconds']:.0f}s")
    return res


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_all(jobs: list[tuple], n: int) -> list[dict]:
    """Run fine-tunes ``(cfg, out_dir, save_model)``, ``n`` processes at a time; results in order.
    A failed run is logged and left out (its folder has no results.json, so a rerun tries it again)."""
    todo = [j for j in jobs if not (j[1] / "results.json").exists()]
    if n <= 1 or len(todo) <= 1:
        out = []
        for j in jobs:
            out.append(run_finetune(*j))
        return out
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 2) // n)
    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(run_finetune, *j) for j in jobs]
        results = []
        failed = 0
        for j, f in zip(jobs, futures):
            try:
                results.append(f.result())
            except Exception as e:  # keep the others; the summary says how many failed
                failed += 1
                log(f"FAILED {j[0].task} plan={j[0].plan}: {type(e).__name__}: {e}")
                results.append(None)
    if failed:
        raise SystemExit(f"{failed} fine-tune(s) failed (see above); rerun to retry them, finished runs are kept")
    return results


def collect(task: str, model_dir: Path, out: Path, args) -> Path:
    import torch

    from sparseattn.experiments.finetune import subset
    from sparseattn.experiments.glue import load_split
    from sparseattn.models import load_model, load_tokenizer, resolve_model
    from sparseattn.pruning import Example, collect_attention
    from sparseattn.pruning.pictures import draw_attention

    if out.exists():
        return out
    train = load_split(task, "train")
    train = [train[i] for i in subset(len(train), args.collect_limit)]  # the examples fine-tuning uses
    source = resolve_model(str(model_dir) if args.collect_from == "finetuned" else None)
    model = load_model(source, task="base").to("cuda" if torch.cuda.is_available() else "cpu")
    log(f"collect attention of {source} over {len(train)} {task} train examples")
    stats = collect_attention(model, load_tokenizer(source), [Example(e.text, e.pair) for e in train],
                              length=args.max_length, batch_size=64, longer="truncate",
                              metadata={"model": source, "data": f"GLUE {task} train"})
    stats.save(out)
    draw_attention(stats.cropped(stats.longest), out.with_suffix(".png"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--percents", nargs="+", type=float, default=PERCENTS, help="p > 0; p = 0 is the dense run")
    p.add_argument("--budget", choices=("data", "grid"), default="data",
                   help="p%% of the training examples' allowed pairs (data) or of the grid's entries (grid)")
    p.add_argument("--scope", choices=("layer", "head"), default="layer")
    p.add_argument("--collect-from", choices=("finetuned", "pretrained"), default="finetuned")
    p.add_argument("--collect-limit", type=int, default=None, help="collect over this many train examples")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--task-epochs", nargs="*", default=[], metavar="TASK=N",
                   help="epochs for some tasks, e.g. sst2=1 (the others get --epochs)")
    p.add_argument("--jobs", type=int, default=1, help="fine-tunes run at once (processes)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-eval", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from results")
    args = p.parse_args(argv)
    if any(not 0 < pc < 100 for pc in args.percents):
        p.error(f"--percents must be in (0, 100); p = 0 is the dense run, made anyway (got {args.percents})")

    from sparseattn.cli import main as cli
    from sparseattn.experiments.finetune import FinetuneConfig
    from sparseattn.pruning.commands import plan_name

    out = Path(args.out)
    if args.collect_limit is None:
        args.collect_limit = args.limit_train  # collect over the examples fine-tuning sees
    # one folder, one configuration: resuming with other settings would mix stale results in
    fixed = {k: v for k, v in vars(args).items() if k not in ("tasks", "percents", "report_only", "out", "budget", "jobs",
                                                               "scope")}
    cfg_file = out / "config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()) != fixed:
        raise SystemExit(f"{cfg_file} holds another configuration ({cfg_file.read_text().strip()}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(fixed, indent=1) + "\n")
    task_epochs = {}
    for item in args.task_epochs:
        task, _, n = item.partition("=")
        if task not in TASKS or not n.isdigit() or int(n) < 1:
            p.error(f"--task-epochs wants TASK=N with TASK in {TASKS} and N >= 1; got {item!r}")
        task_epochs[task] = int(n)

    def common(task):
        return dict(epochs=task_epochs.get(task, args.epochs), lr=args.lr, batch_size=args.batch_size,
                    max_length=args.max_length, limit_train=args.limit_train, limit_eval=args.limit_eval,
                    seed=args.seed)

    variant = f"{args.budget}-{args.scope}"
    names = {(m, pc): plan_name(m, args.scope, pc) for pc in args.percents for m in ("ap", "random")}

    # phase 1: the dense runs (p = 0), whose checkpoints the averages are collected from
    dense_jobs = [(FinetuneConfig(task=t, plan="dense", **common(t)), out / t / "dense", True) for t in args.tasks
                  if not args.report_only or (out / t / "dense" / "results.json").exists()]
    dense = dict(zip([j[0].task for j in dense_jobs], run_all(dense_jobs, args.jobs)))

    # phase 2: averages and masks, per task
    sparse_jobs = []
    for task in dense:
        tdir = out / task
        plans = tdir / f"plans-{args.collect_from}-{variant}"
        if not args.report_only:
            stats_file = tdir / f"attention-{args.collect_from}.safetensors"
            missing = [pc for pc in args.percents if not (plans / names["ap", pc] / "plan.json").exists()]
            if missing:
                collect(task, tdir / "dense" / "model", stats_file, args)
            for pc in missing:
                rc = cli(["ap", "mask", str(stats_file), "--prune", f"{pc:g}", "--random", "--scope", args.scope,
                          "--budget", args.budget, "--block-size", "16", "--seed", str(args.seed),
                          "--out", str(plans / "tmp")])
                if rc:  # e.g. more than the off-diagonal pairs: the error says how much is possible
                    log(f"{task}: no mask at p={pc:g}% (see the error above); skipped")
                    continue
                for m in ("ap", "random"):
                    (plans / "tmp" / names[m, pc]).rename(plans / names[m, pc])
                (plans / "tmp" / "summary.json").rename(plans / f"summary-p{pc:g}.json")
        for (method, pc), name in names.items():
            run_dir = tdir / f"runs-{args.collect_from}-{variant}" / name
            if not (plans / name / "plan.json").exists() or (args.report_only and not (run_dir / "results.json").exists()):
                continue
            sparse_jobs.append(((task, method, pc), (FinetuneConfig(task=task, plan=str(plans / name), **common(task)),
                                                     run_dir, False)))

    # phase 3: re-fine-tune the pretrained model under every mask
    results = run_all([j for _, j in sparse_jobs], args.jobs)
    rows = [_row(t, "dense", 0.0, r) for t, r in dense.items()]
    rows += [_row(t, m, pc, r) for ((t, m, pc), _), r in zip(sparse_jobs, results)]
    if not rows:
        log("no results yet")
        return 1
    _report(rows, out, variant, args.collect_from)
    return 0


def _row(task: str, method: str, percent: float, res: dict) -> dict:
    return {"task": task, "method": method, "percent": percent, "metric": res["main_metric"],
            "score": res["score"], "dev_sparsity": res["sparsity"]["overall"],
            "train_examples": res["data"]["train_examples"], "epochs": res["config"]["epochs"],
            "device": res["device"], "train_seconds": res["timing"]["train_seconds"]}


def _report(rows: list[dict], out: Path, variant: str, collect_from: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{collect_from}-{variant}"
    with open(out / f"results-{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    percents = sorted({r["percent"] for r in rows if r["percent"] > 0})
    lines = [f"| task (metric) | method | " + " | ".join(f"p={pc:g}%" for pc in [0] + percents) + " |",
             "|---|---|" + "---|" * (len(percents) + 1)]
    for task in tasks:
        tr = [r for r in rows if r["task"] == task]
        dense = next(r for r in tr if r["method"] == "dense")
        for method in ("ap", "random"):
            cells = [f"{dense['score']:.4f}"]
            for pc in percents:
                r = next((r for r in tr if r["method"] == method and r["percent"] == pc), None)
                cells.append("-" if r is None else f"{r['score']:.4f} ({r['dev_sparsity']:.0%})")
            lines.append(f"| {task} ({dense['metric']}) | {method} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n\nCells: dev score (measured sparsity on dev: pruned / allowed real pairs).\n"
    (out / f"table-{stem}.md").write_text(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        tr = [r for r in rows if r["task"] == task]
        dense = next(r for r in tr if r["method"] == "dense")
        for method, style in (("ap", "o-"), ("random", "s--")):
            pts = sorted((r["dev_sparsity"], r["score"]) for r in tr if r["method"] == method)
            pts = [(0.0, dense["score"])] + pts
            ax.plot([x * 100 for x, _ in pts], [y for _, y in pts], style, label=method, ms=4)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("measured dev sparsity (%)", fontsize=8)
        ax.set_ylabel(dense["metric"], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"metric_vs_sparsity-{stem}.png", dpi=130)
    plt.close(fig)
    log(f"wrote {out}/results-{stem}.csv, table-{stem}.md, metric_vs_sparsity-{stem}.png")


if __name__ == "__main__":
    sys.exit(main())
