"""What the studies' summary scripts (`ap_summary.py`, `lm_summary.py`, `ablation_summary.py`, `learned_summary.py`)
share: reading a results.csv's finished runs, the spread of a cell's seeds and of a difference of two cells,
saving a figure, and the command line that reads a report's results.csv, prints the
table and writes the plot."""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path


def seed_spread(values) -> dict:
    """{n, mean, std}: the sample std over the seeds, None for one seed."""
    xs = [float(x) for x in values]
    return {"n": len(xs), "mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None}


def finished_runs(path, keep=lambda row: True):
    """(row, score, seed, sparsity) of each finished run of a results.csv that ``keep(row)`` accepts, read from a
    report's columns (sparsity) or the older docs CSV's (dev_sparsity); a value that does not parse names the file
    and line."""
    with Path(path).open() as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            if r.get("status", "done") != "done" or not keep(r):
                continue
            try:
                score, seed = float(r["score"]), int(r["seed"])
                sparsity = float(r.get("sparsity") or r.get("dev_sparsity") or 0.0)
            except ValueError as e:
                raise ValueError(f"{path}:{i}: {e}") from None
            yield r, score, seed, sparsity


def method_runs(path, method: str):
    """(row, config, score, seed, sparsity) of each finished run of a ``method: METHOD`` sweep's results.csv; a run
    of another method, or a value that does not parse, names the file and line."""
    import json

    with Path(path).open() as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            if r.get("status", "done") != "done":
                continue
            cfg = json.loads(r["config"])
            if cfg.get("method") != method:
                raise ValueError(f"{path}:{i}: a {cfg.get('method', 'finetune')!r} run ({r['plan']}); this summary "
                                 f"reads the results of a `method: {method}` sweep")
            try:
                yield r, cfg, float(r["score"]), int(r.get("seed") or 0), float(r["sparsity"])
            except ValueError as e:
                raise ValueError(f"{path}:{i}: {e}") from None


def difference(a: dict, b: dict) -> dict:
    """{difference, spread, inside} of two ``seed_spread`` cells: the difference of their means; its spread, the
    spread of one seed's difference (the two sample stds in quadrature; None where a cell has one seed); whether
    the difference is no larger than that spread (None without one)."""
    d = a["mean"] - b["mean"]
    spread = math.hypot(a["std"], b["std"]) if a["std"] is not None and b["std"] is not None else None
    return {"difference": d, "spread": spread, "inside": None if spread is None else abs(d) <= spread}


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(argv, doc: str, csv_help: str, load, table, plot) -> int:
    """``script CSV [--plot PNG]``: the table of ``load(CSV)``'s rows on stdout, the plot where asked."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, help=csv_help)
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
