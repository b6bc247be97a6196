"""Study 1's summary: change against dense per task, pattern and placement (mean ± std over seeds), as a
Markdown table and a figure, from the report's results.csv.

    python studies/ablation_summary.py docs/pattern-ablation/results.csv --plot docs/pattern-ablation/delta_by_pattern.png
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics as st
from collections import defaultdict
from pathlib import Path

from summaries import save_figure

PATTERNS = ("neighbour", "random", "syntax", "lexical")
PLACEMENTS = ("later-half", "all")
TASKS = {"sst2": "SST-2 acc", "mrpc": "MRPC F1", "stsb": "STS-B Pearson", "cola": "CoLA MCC", "rte": "RTE acc"}


def arm(plan: str) -> tuple[str, str]:
    """'all: (neighbour(1) | global_tokens(1))' -> ('all', 'neighbour'); 'dense' -> ('dense', 'dense')."""
    if plan == "dense":
        return "dense", "dense"
    m = re.match(r"\s*([\w-]+)\s*:\s*\(?\s*(\w+)", plan)
    if m is None or m.group(2) not in PATTERNS or m.group(1) not in PLACEMENTS:
        raise ValueError(f"plan {plan!r} is not one of study 1's arms ({', '.join(PLACEMENTS)} x {', '.join(PATTERNS)})")
    return m.group(1), m.group(2)


def load(path: Path):
    """{(task, placement, pattern): ([scores x100], [sparsity in sparsified heads, %])}, finished runs only."""
    groups = defaultdict(lambda: ([], []))
    with path.open() as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            if r["status"] != "done":
                continue
            try:
                score, applied = float(r["score"]) * 100, float(r["sparsity_applied"]) * 100
            except ValueError:
                raise ValueError(f"{path}:{i}: a finished run without a numeric score or sparsity: "
                                 f"{r['score']!r}, {r['sparsity_applied']!r}") from None
            scores, sparsity = groups[(r["task"], *arm(r["plan"]))]
            scores.append(score)
            sparsity.append(applied)
    return groups


def _sd(v):
    return st.stdev(v) if len(v) > 1 else 0.0


def table(groups) -> str:
    lines = ["| task (dense, mean ± std) | layers | " + " | ".join(PATTERNS) + " |",
             "|---|---|" + "---:|" * len(PATTERNS)]
    for task, name in TASKS.items():
        dense = groups.get((task, "dense", "dense"))
        if not dense:
            continue
        d = st.mean(dense[0])
        for place in PLACEMENTS:
            cells = []
            for pat in PATTERNS:
                scores, sp = groups.get((task, place, pat), ([], []))
                cells.append(f"{st.mean(scores) - d:+.2f} ± {_sd(scores):.2f} @ {st.mean(sp):.0f}%" if scores else "-")
            label = f"{name} ({d:.2f} ± {_sd(dense[0]):.2f})" if place == PLACEMENTS[0] else ""
            lines.append(f"| {label} | {place} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(groups, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if (t, "dense", "dense") in groups]
    fig, axes = plt.subplots(1, len(PLACEMENTS), figsize=(11, 4.2), sharey=True)
    width = 0.8 / len(PATTERNS)
    for ax, place in zip(axes, PLACEMENTS):
        for j, pat in enumerate(PATTERNS):
            xs, ys, es = [], [], []
            for i, t in enumerate(tasks):
                scores, _ = groups.get((t, place, pat), ([], []))
                if scores:
                    d = st.mean(groups[(t, "dense", "dense")][0])
                    xs.append(i + (j - (len(PATTERNS) - 1) / 2) * width)
                    ys.append(st.mean(scores) - d)
                    es.append(_sd(scores))
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=pat)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(tasks)), [TASKS[t] for t in tasks], rotation=15)
        ax.set_title(f"{place}: sparse in {'layers 3-5' if place == 'later-half' else 'every layer'}")
        ax.set_yscale("symlog", linthresh=5)  # the STS-B collapse (-65) beside changes of a point
        ticks = [-60, -30, -15, -5, -2, 0, 2]
        ax.set_yticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
        ax.minorticks_off()
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("change against dense, x100 (mean ± std over seeds;\nlog scale beyond ±5)")
    axes[0].legend(title="pattern (+ global [CLS])", fontsize=8)
    fig.suptitle("Study 1: pattern ablation at matched sparsity (packaged MiniLM, GLUE dev)")
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, help="results.csv written by `sparseattn report` for the pattern ablation")
    p.add_argument("--plot", type=Path, default=None, help="write the figure here (PNG)")
    args = p.parse_args(argv)
    groups = load(args.csv)
    print(table(groups))
    if args.plot:
        plot(groups, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
