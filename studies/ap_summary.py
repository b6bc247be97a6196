"""Attention Pruning's summary: per task, the dev metric at each pruning level for AP and random masks
(measured dev sparsity beside it), as a Markdown table and a plot of metric against measured sparsity,
from the results.csv that `sparseattn report` writes for a `method: prune` sweep.

    sparseattn report studies/attention_pruning.sqlite --out docs/attention-pruning/study
    python studies/ap_summary.py docs/attention-pruning/study/results.csv \\
        --plot docs/attention-pruning/study/metric_vs_sparsity.png
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

TASK_ORDER = ["sst2", "mrpc", "rte", "cola", "stsb"]


def load(path: Path) -> list[dict]:
    """Finished prune runs as {task, method ('dense', 'ap', 'random'), percent, metric, score, dev_sparsity}."""
    rows = []
    with path.open() as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            if r["status"] != "done":
                continue
            cfg = json.loads(r["config"])
            if cfg.get("method") != "prune":
                raise ValueError(f"{path}:{i}: a {cfg.get('method', 'finetune')!r} run ({r['plan']}); this summary "
                                 "reads the results of a `method: prune` sweep")
            p = float(cfg["prune"])
            rows.append({"task": r["task"], "method": "dense" if p == 0 else cfg["mask"], "percent": p,
                         "metric": r["main_metric"], "score": float(r["score"]), "dev_sparsity": float(r["sparsity"])})
    return rows


def table(rows: list[dict]) -> str:
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (TASK_ORDER + [t]).index(t))
    percents = sorted({r["percent"] for r in rows if r["percent"] > 0})
    lines = ["| task (metric) | method | " + " | ".join(f"p={pc:g}%" for pc in [0] + percents) + " |",
             "|---|---|" + "---|" * (len(percents) + 1)]
    for task in tasks:
        tr = [r for r in rows if r["task"] == task]
        dense = next((r for r in tr if r["method"] == "dense"), None)
        for method in ("ap", "random"):
            cells = [f"{dense['score']:.4f}" if dense else "-"]
            for pc in percents:
                r = next((r for r in tr if r["method"] == method and r["percent"] == pc), None)
                cells.append("-" if r is None else f"{r['score']:.4f} ({r['dev_sparsity']:.0%})")
            lines.append(f"| {task} ({tr[0]['metric']}) | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nCells: dev score (measured sparsity on dev: pruned / allowed real pairs)."


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows}, key=lambda t: (TASK_ORDER + [t]).index(t))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        tr = [r for r in rows if r["task"] == task]
        dense = [(0.0, r["score"]) for r in tr if r["method"] == "dense"]
        for method, style in (("ap", "o-"), ("random", "s--")):
            pts = dense + sorted((r["dev_sparsity"], r["score"]) for r in tr if r["method"] == method)
            ax.plot([x * 100 for x, _ in pts], [y for _, y in pts], style, label=method, ms=4)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("measured dev sparsity (%)", fontsize=8)
        ax.set_ylabel(tr[0]["metric"], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, help="results.csv of `sparseattn report` for a method: prune sweep")
    p.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    args = p.parse_args(argv)
    rows = load(args.csv)
    if not rows:
        raise SystemExit(f"{args.csv}: no finished runs yet")
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
