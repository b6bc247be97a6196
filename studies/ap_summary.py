"""Attention Pruning's summary: per task, the dev metric at each pruning level for AP and random masks
(mean ± sample std over seeds, measured dev sparsity beside it) and AP's difference from random and from
dense (with its seed spread; *inside* where the difference is no larger), as a Markdown table, and a plot
of metric against measured sparsity with error bars, from the results.csv that `sparseattn report` writes
for a `method: prune` sweep.

    sparseattn report studies/attention_pruning.sqlite --out docs/attention-pruning/study
    python studies/ap_summary.py docs/attention-pruning/study/results.csv \\
        --plot docs/attention-pruning/study/metric_vs_sparsity.png
"""

from __future__ import annotations

from pathlib import Path

from summaries import difference, method_runs, run, save_figure, seed_spread

TASK_ORDER = ["sst2", "mrpc", "rte", "cola", "stsb"]


def load(path: Path) -> list[dict]:
    """Finished prune runs as {task, method ('dense', 'ap', 'random'), percent, metric, score, dev_sparsity}."""
    rows = []
    for r, cfg, score, seed, sparsity in method_runs(path, "prune"):
        p = float(cfg["prune"])
        rows.append({"task": r["task"], "method": "dense" if p == 0 else cfg["mask"], "percent": p,
                     "metric": r["main_metric"], "score": score, "dev_sparsity": sparsity, "seed": seed})
    return rows


def cell(rows: list[dict], task: str, method: str, percent: float) -> dict | None:
    """The seeds of one (task, method, level): {n, mean, std (None for one seed), dev_sparsity (mean)}."""
    xs = [r for r in rows if (r["task"], r["method"], r["percent"]) == (task, method, percent)]
    if not xs:
        return None
    return {**seed_spread(r["score"] for r in xs), "dev_sparsity": sum(r["dev_sparsity"] for r in xs) / len(xs)}


def _score(c: dict) -> str:
    return f"{c['mean']:.4f}" + (f" ± {c['std']:.4f}" if c["std"] is not None else "")


def table(rows: list[dict]) -> str:
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (TASK_ORDER + [t]).index(t))
    percents = sorted({r["percent"] for r in rows if r["percent"] > 0})
    lines = ["| task (metric) | method | " + " | ".join(f"p={pc:g}%" for pc in [0] + percents) + " |",
             "|---|---|" + "---|" * (len(percents) + 1)]
    seeds = sorted({r["seed"] for r in rows})
    for task in tasks:
        tr = [r for r in rows if r["task"] == task]
        dense = cell(rows, task, "dense", 0.0)
        for method in ("ap", "random"):
            cells = [_score(dense) if dense else "-"]
            for pc in percents:
                c = cell(rows, task, method, pc)
                cells.append("-" if c is None else f"{_score(c)} ({c['dev_sparsity']:.0%})")
            lines.append(f"| {task} ({tr[0]['metric']}) | {method} | " + " | ".join(cells) + " |")
        # AP's difference from random at the same level, and from dense
        against = {"random": {pc: cell(rows, task, "random", pc) for pc in percents},
                   "dense": dict.fromkeys(percents, dense)}
        for name, others in against.items():
            cells = ["-"]
            for pc in percents:
                a, b = cell(rows, task, "ap", pc), others[pc]
                cells.append("-" if a is None or b is None else _difference(difference(a, b)))
            lines.append(f"| {task} ({tr[0]['metric']}) | ap − {name} | " + " | ".join(cells) + " |")
    spread = "mean ± sample std over seeds " + ", ".join(map(str, seeds)) if len(seeds) > 1 else f"seed {seeds[0]}"
    return "\n".join(lines) + (f"\n\nCells: dev score, {spread} (measured sparsity on dev: pruned / allowed real "
                               "pairs). ap − random, ap − dense: the difference of the means (± its spread, the two "
                               "stds in quadrature, where seeds give one; *inside* where it is no larger).")


def _difference(d: dict) -> str:
    text = f"{d['difference']:+.4f}"
    if d["spread"] is not None:
        text += f" ± {d['spread']:.4f}" + (" *inside*" if d["inside"] else "")
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows}, key=lambda t: (TASK_ORDER + [t]).index(t))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        tr = [r for r in rows if r["task"] == task]
        d = cell(rows, task, "dense", 0.0)
        for method, style in (("ap", "o-"), ("random", "s--")):
            cs = ([d] if d else []) + sorted((cell(rows, task, method, pc) for pc in
                                              sorted({r["percent"] for r in tr if r["method"] == method})),
                                             key=lambda c: c["dev_sparsity"])
            ax.errorbar([c["dev_sparsity"] * 100 for c in cs], [c["mean"] for c in cs],
                        yerr=[c["std"] or 0 for c in cs], fmt=style, label=method, ms=4, capsize=2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("measured dev sparsity (%)", fontsize=8)
        ax.set_ylabel(tr[0]["metric"], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    return run(argv, __doc__, "results.csv of `sparseattn report` for a method: prune sweep", load, table, plot)


if __name__ == "__main__":
    raise SystemExit(main())
