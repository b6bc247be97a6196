"""How fast a sparse prefill can be at all: the ceiling that the model's work outside attention sets, from the dense
rows of `sparseattn bench generate` (CPU; reads their JSON files).

    PYTHONPATH=src python benchmarks/prefill_ceiling.py bench_generate_32k.json bench_generate_64k.json
    PYTHONPATH=src python benchmarks/prefill_ceiling.py bench_generate_64k.json --row 1b:32768:16:dense:5072 \
        --row 1b:32768:16:sparse:3006

A prefill of L tokens at batch B does work outside attention (projections, MLP, norms) in proportion to L x B and
causal attention in proportion to L^2 x B. Fitting ``t = n L B + a L^2 B`` to the fastest dense prefill of each cell
(least squares, relative; it needs two lengths) separates the two: ``n L B`` is the same on the sparse path, ``a L^2
B`` is what dense attention costs. An exact block-sparse kernel at dense attention's rate per tile pays ``a L^2 B``
times the plan's block density among the causal tiles (counted by the block backend's own layout of the sparse row's
plan, partial tiles included), so the sparse prefill's ceiling is ``n L B + density a L^2 B``. The table gives, per
cell, the fit's error on the dense time, the ceiling and its speed-up, each sparse method's measured prefill, its
fraction of the ceiling, and its attention time (measured minus ``n L B``) against the ideal (a ratio above 1 is
faster than the fit allows: the fit's error, or a cell whose dense kernel is slower per tile). ``--row
MODEL:LENGTH:BATCH:METHOD:MS`` adds a prefill measured in another run (as docs/benchmarks.md records it; a sparse
method's plan is bench generate's at that length). Computing a plan's layout at 64k takes a minute or two here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

DENSE = ("dense", "dense-flash", "flex")
SPARSE = ("sparse", "sparse-evict")


def load_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for r in data["results"]:
            if r.get("prefill_ms") is not None and r.get("cache", "dynamic") == "dynamic":
                rows.append(r)
    return rows


def parse_row(text: str) -> dict:
    from sparseattn.bench.generate import plan_for

    try:
        model, length, batch, method, ms = text.split(":")
        row = {"model": model, "length": int(length), "batch": int(batch), "method": method, "prefill_ms": float(ms)}
    except ValueError:
        raise SystemExit(f"--row {text!r}: expected MODEL:LENGTH:BATCH:METHOD:MS, e.g. 1b:32768:16:dense:5072") from None
    if method not in DENSE + SPARSE:
        raise SystemExit(f"--row {text!r}: method {method!r} is not one of {', '.join(DENSE + SPARSE)}")
    row["plan"] = plan_for(row["length"], 0.9) if method in SPARSE else None
    return row


def fit(cells: dict[tuple[int, int], float]) -> tuple[float, float]:
    """(n, a) of ``t = n L B + a L^2 B`` over {(L, B): fastest dense ms}, least squares on relative errors."""
    lengths = {L for L, _ in cells}
    if len(lengths) < 2:
        raise ValueError(f"the fit needs dense cells at two lengths at least, got only {sorted(lengths)}")
    x = torch.tensor([[L * B / t, L * L * B / t] for (L, B), t in cells.items()], dtype=torch.float64)
    n, a = torch.linalg.lstsq(x, torch.ones(len(cells), 1, dtype=torch.float64)).solution.flatten().tolist()
    return n, a


_DENSITY: dict = {}


def plan_density(spec: str, length: int, layers: int, heads: int) -> float:
    """The plan's block density among the causal tiles at ``length``, averaged over layers: what the block backend
    builds for it (tiles of 128, its choice at the generation models' head size of 64; partial tiles counted)."""
    from sparseattn.backends.block import BlockSparseBackend
    from sparseattn.plans.plan import Plan

    key = (spec, length, layers, heads)
    if key not in _DENSITY:
        be = BlockSparseBackend(block_size=128)
        by_rules, per_layer = {}, []
        for lp in Plan.parse(spec).resolve(layers, heads):
            rules = repr(lp.entries)
            if rules not in by_rules:  # layers with the same rules have the same layout
                by_rules[rules] = be.tile_density(lp, length, causal=True)
            per_layer.append(by_rules[rules])
        _DENSITY[key] = sum(per_layer) / len(per_layer)
    return _DENSITY[key]


def table(rows: list[dict]) -> str:
    from sparseattn.bench.generate import MODELS

    by_model = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by_model[r["model"]][(r["length"], r["batch"])][r["method"]] = r
    lines = ["| model | length | batch | dense ms (fit) | ceiling ms | ceiling x | method | prefill ms | x dense | of the "
             "ceiling | attention against its ideal |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for model, cells in by_model.items():
        dense = {c: min(m[d]["prefill_ms"] for d in DENSE if d in m) for c, m in cells.items()
                 if any(d in m for d in DENSE)}
        try:
            n, a = fit(dense)
        except ValueError as e:
            lines.append(f"| {model} | {e} |")
            continue
        shape = MODELS.get(model, {})
        for (L, B), methods in sorted(cells.items()):
            if (L, B) not in dense:
                continue
            outside, attn = n * L * B, a * L * L * B
            err = round((outside + attn) / dense[(L, B)] - 1, 3) + 0.0  # + 0.0: a residual of -0.0 prints +0.0
            for m in SPARSE:
                if m not in methods:
                    continue
                r = methods[m]
                rho = plan_density(r["plan"], L, shape.get("num_hidden_layers", 1), shape.get("num_attention_heads", 1))
                ceiling = outside + rho * attn
                t = r["prefill_ms"]
                lines.append(f"| {model} | {L} | {B} | {dense[(L, B)]:,.0f} ({err:+.1%}) | {ceiling:,.0f} | "
                             f"{dense[(L, B)] / ceiling:.2f}x | {m} | {t:,.0f} | {dense[(L, B)] / t:.2f}x | "
                             f"{ceiling / t:.2f} | {rho * attn / max(t - outside, 1e-9):.2f} (density {rho:.1%}) |")
        lines.append(f"\n{model}: work outside attention {n * 1e6:.3f} ms per million tokens, dense causal attention "
                     f"{a * 1e9:.3f} ms per billion (L^2 x B); fastest dense of each cell fitted.\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="*", help="JSON files that `sparseattn bench generate --json` wrote")
    ap.add_argument("--row", action="append", default=[], metavar="MODEL:LENGTH:BATCH:METHOD:MS",
                    help="a prefill measured in another run (repeatable)")
    args = ap.parse_args(argv)
    rows = load_rows(args.json) + [parse_row(r) for r in args.row]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
