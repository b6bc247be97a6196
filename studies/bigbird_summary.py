"""Study 2's summary (docs/results.md): what removing each BigBird component costs, and neighbour-only graphs
against graphs without neighbours, from the runs of the BigBird degree grid in a results.csv (`sparseattn
report`'s, or docs/learned-sparsity/study/results.csv), with the seeds' spread where there are several.

For every grid point bigbird(g, n, r) with a component present, the change of the dev metric when that
component's degree is set to 0 (the others unchanged), per seed, then averaged over the grid points: the
paper's framing (removing a component also raises sparsity, so this is not a matched comparison).

    python studies/bigbird_summary.py docs/learned-sparsity/study/results.csv
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from summaries import finished_runs

BIGBIRD = re.compile(r"^all: bigbird\((\d+), (\d+), (\d+)\)$")
COMPONENTS = ("global", "neighbour", "random")
TITLES = {"sst2": "SST-2 accuracy", "mrpc": "MRPC F1", "stsb": "STS-B Pearson"}


def load(path: Path) -> dict[str, dict]:
    """Per task: {'dense': {seed: score}, 'grid': {(g, n, r): {seed: score}}, 'sparsity': {(g, n, r): mean}}; the
    grid's fine-tunes and the dense runs only (learned runs are left out)."""
    out: dict[str, dict] = {}
    for r, score, seed, sparsity in finished_runs(path, keep=lambda r: r.get("method", "finetune") == "finetune"):
        t = out.setdefault(r["task"], {"dense": {}, "grid": {}, "sparsity": {}})
        m = BIGBIRD.match(r["plan"])
        if r["plan"] == "dense":
            t["dense"][seed] = score
        elif m:
            g = tuple(int(x) for x in m.groups())
            t["grid"].setdefault(g, {})[seed] = score
            t["sparsity"].setdefault(g, []).append(sparsity)
    for t in out.values():
        t["sparsity"] = {g: float(np.mean(v)) for g, v in t["sparsity"].items()}
    return out


def removal(t: dict, component: int) -> tuple[np.ndarray, list[float]]:
    """(per seed: the mean over grid points of the change when ``component`` goes to 0; every (point, seed)
    change), over the seeds that ran both plans of a pair."""
    per_seed: dict[int, list[float]] = {}
    for g, scores in t["grid"].items():
        if g[component] == 0:
            continue
        without = list(g)
        without[component] = 0
        other = t["grid"].get(tuple(without))
        if other is None:
            continue
        for seed in scores.keys() & other.keys():
            per_seed.setdefault(seed, []).append(other[seed] - scores[seed])
    means = np.array([np.mean(v) for _, v in sorted(per_seed.items())])
    return means, [x for v in per_seed.values() for x in v]


def _pm(xs: np.ndarray, scale: float = 100.0) -> str:
    if len(xs) == 0:
        return "-"
    return f"{scale * xs.mean():+.2f}" + (f" ± {scale * xs.std(ddof=1):.2f}" if len(xs) > 1 else "")


def removal_table(data: dict[str, dict]) -> str:
    seeds = sorted({s for t in data.values() for v in t["grid"].values() for s in v})
    lines = ["| task (dense) | " + " | ".join(f"remove {c}" for c in COMPONENTS) + " |", "|---|---:|---:|---:|"]
    for task, t in data.items():
        dense = np.array(list(t["dense"].values()))
        head = f"{TITLES.get(task, task)} ({_pm(dense).lstrip('+')})" if len(dense) else TITLES.get(task, task)
        cells = []
        for c in range(3):
            means, every = removal(t, c)
            cells.append(f"{_pm(means)} (median {100 * np.median(every):+.2f})" if every else "-")
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    spread = (f"mean over the grid, then mean ± sample std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
              else f"mean over the grid, seed {seeds[0]}")
    return "\n".join(lines) + f"\n\nChange of the dev metric x100 ({spread}); median over every (grid point, seed)."


def neighbour_table(data: dict[str, dict]) -> str:
    lines = ["| task | neighbour-only n = 1, 2, 4, 8 | no neighbours (g, r) |", "|---|---|---|"]
    seeds = len({s for t in data.values() for v in t["grid"].values() for s in v})
    for task, t in data.items():
        def cell(g):
            s = np.array(list(t["grid"][g].values()))
            spread = f" ± {100 * s.std(ddof=1):.1f}" if len(s) > 1 else ""
            fewer = f" (n={len(s)})" if len(s) < seeds else ""  # a point whose other seeds are not in yet
            return f"{100 * s.mean():.1f}{spread}{fewer}@{100 * t['sparsity'][g]:.0f}%"

        only = ", ".join(cell((0, n, 0)) for n in (1, 2, 4, 8) if (0, n, 0) in t["grid"])
        none = ", ".join(f"({g}, {r}) {cell((g, 0, r))}" for g in (0, 1, 2) for r in (0, 1, 3)
                         if (g, r) != (0, 0) and (g, 0, r) in t["grid"])
        lines.append(f"| {TITLES.get(task, task).split()[0]} | {only} | {none} |")
    return "\n".join(lines) + "\n\nCells: dev score x100 (± sample std over seeds where several) @ measured sparsity."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, nargs="+", help="results.csv files (several: their runs pooled, e.g. seed 0's "
                   "and seeds 1 and 2's)")
    args = p.parse_args(argv)
    data: dict[str, dict] = {}
    for path in args.csv:
        for task, t in load(path).items():
            d = data.setdefault(task, {"dense": {}, "grid": {}, "sparsity": {}})
            d["dense"].update(t["dense"])
            for g, v in t["grid"].items():
                d["grid"].setdefault(g, {}).update(v)
            d["sparsity"].update(t["sparsity"])
    if not data:
        raise SystemExit(f"{', '.join(map(str, args.csv))}: no finished BigBird grid runs")
    data = dict(sorted(data.items(), key=lambda kv: (list(TITLES) + [kv[0]]).index(kv[0])))
    print(removal_table(data))
    print()
    print(neighbour_table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
