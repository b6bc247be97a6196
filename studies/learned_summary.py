"""Study 3's summary (docs/results.md): each learned plan against the best BigBird grid point at least as sparse,
per task, mean ± sample std over seeds, from the results.csv files of the learned-vs-BigBird sweeps (`sparseattn
report`'s, or docs/learned-sparsity/study/results.csv; several files pool their runs).

"At least as sparse" allows one point less (a learned plan at 85.2% meets BigBird points from 84.2%). A
difference is inside the seeds' spread when it is no larger than the spread of one seed's difference, the two
cells' sample stds added in quadrature; with one seed there is no spread to compare with.

    python studies/learned_summary.py docs/learned-sparsity/study/results.csv
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from summaries import difference, finished_runs, seed_spread

BIGBIRD = re.compile(r"^all: bigbird\((\d+), (\d+), (\d+)\)$")
TITLES = {"sst2": "SST-2 accuracy", "mrpc": "MRPC F1", "stsb": "STS-B Pearson"}
SLACK = 0.01  # how much less sparse a BigBird point may be and still count as "at least as sparse"


def _in_study(row: dict) -> bool:
    plan = row["plan"]
    return plan == "dense" or plan.startswith("learned(") or bool(BIGBIRD.match(plan))


def load(paths) -> dict[str, dict[str, dict[int, tuple[float, float]]]]:
    """Per task, per plan ('dense', 'all: bigbird(g, n, r)', 'learned(...)'): {seed: (score, sparsity)} of the
    finished runs; other plans are left out."""
    out: dict[str, dict] = {}
    for path in paths:
        for r, score, seed, sparsity in finished_runs(path, keep=_in_study):
            out.setdefault(r["task"], {}).setdefault(r["plan"], {})[seed] = (score, sparsity)
    return out


def cell(runs: dict[int, tuple[float, float]]) -> dict:
    """{n, mean, std, sparsity}: the score over seeds and the mean measured sparsity."""
    return {**seed_spread(s for s, _ in runs.values()), "sparsity": sum(p for _, p in runs.values()) / len(runs)}


def _score(c: dict, seeds: int = 1) -> str:
    """mean ± std x100, and how many seeds where fewer than ``seeds`` (a cell whose other runs are not in yet)."""
    return f"{100 * c['mean']:.1f}" + (f" ± {100 * c['std']:.1f}" if c["std"] is not None else "") + (
        f" (n={c['n']})" if c["n"] < seeds else "")


def comparisons(plans: dict[str, dict]) -> list[dict]:
    """Each learned plan (by sparsity) with the best BigBird point at least as sparse: their cells, the
    difference of means, its spread (None with one seed) and whether it is inside it."""
    cells = {p: cell(runs) for p, runs in plans.items()}
    grid = {p: c for p, c in cells.items() if BIGBIRD.match(p)}
    out = []
    for plan, c in sorted(((p, c) for p, c in cells.items() if p.startswith("learned(")),
                          key=lambda pc: pc[1]["sparsity"]):
        rivals = [(p, b) for p, b in grid.items() if b["sparsity"] >= c["sparsity"] - SLACK]
        best = max(rivals, key=lambda pb: pb[1]["mean"], default=None)
        row = {"plan": plan, "learned": c, "bigbird": best, "difference": None, "spread": None, "inside": None}
        if best is not None:
            row.update(difference(c, best[1]))
        out.append(row)
    return out


def table(data: dict[str, dict]) -> str:
    seeds = sorted({s for plans in data.values() for runs in plans.values() for s in runs})
    lines = ["| task (dense) | learned plan | its sparsity | score | best BigBird at least as sparse | score | "
             "difference | inside the seeds' spread? |", "|---|---|---:|---:|---|---:|---:|---|"]
    for task in sorted(data, key=lambda t: (list(TITLES) + [t]).index(t)):
        plans = data[task]
        dense = f" ({_score(cell(plans['dense']), len(seeds))})" if "dense" in plans else ""
        head = f"{TITLES.get(task, task)}{dense}"
        for row in comparisons(plans):
            c, best = row["learned"], row["bigbird"]
            rival = "none as sparse" if best is None else (
                f"{best[0].removeprefix('all: ')} @ {100 * best[1]['sparsity']:.0f}%")
            diff = "-" if row["difference"] is None else (
                f"{100 * row['difference']:+.1f}" + (f" ± {100 * row['spread']:.1f}" if row["spread"] else ""))
            inside = {None: "-", True: "**yes**", False: "no"}[row["inside"]]
            lines.append(f"| {head} | {row['plan']} | {100 * c['sparsity']:.1f}% | {_score(c, len(seeds))} | {rival} | "
                         f"{'-' if best is None else _score(best[1], len(seeds))} | {diff} | {inside} |")
            head = ""
    spread = (f"mean ± sample std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
              else f"seed {seeds[0]} only: no spread")
    return "\n".join(lines) + (f"\n\nDev scores x100 ({spread}); sparsity measured on the dev split (mean over "
                               f"seeds); BigBird points down to {100 * SLACK:.0f} point less sparse count.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, nargs="+", help="results.csv files (several: their runs pooled)")
    args = p.parse_args(argv)
    data = load(args.csv)
    data = {t: plans for t, plans in data.items() if any(p.startswith("learned(") for p in plans)}
    if not data:
        raise SystemExit(f"{', '.join(map(str, args.csv))}: no finished learned runs")
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
