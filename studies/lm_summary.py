"""The language-modelling Attention Pruning study's summary (issue 20; docs/language-models.md): perplexity at
each pruning level for the AP mask and its two baselines at the same measured sparsity (random, sinks + window),
mean ± sample std over seeds and the change against the dense model in percent, as a Markdown table and a plot
of perplexity against measured sparsity, from the results.csv that `sparseattn report` writes for a
`method: prune-lm` sweep.

    sparseattn report studies/lm_attention_pruning.sqlite --out docs/language-models/study
    python studies/lm_summary.py docs/language-models/study/results.csv \\
        --plot docs/language-models/study/perplexity_vs_sparsity.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from summaries import method_runs, run, save_figure, seed_spread

MASKS = ("ap", "random", "sink_window")
STYLE = {"ap": "o-", "random": "s--", "sink_window": "^:"}


def load(path: Path) -> list[dict]:
    """Finished prune-lm runs as {mask ('dense' or one of MASKS), percent, seed, perplexity, sparsity}."""
    rows = []
    for _, cfg, score, seed, sparsity in method_runs(path, "prune-lm"):
        p = float(cfg["prune"])
        rows.append({"mask": "dense" if p == 0 else cfg["mask"], "percent": p, "seed": seed, "perplexity": score,
                     "sparsity": sparsity})
    return rows


def cells(rows: list[dict]) -> dict[tuple[str, float], dict]:
    """(mask, percent) -> {n, mean, std (None for one seed), sparsity (mean measured), seeds}."""
    out = {}
    for key in sorted({(r["mask"], r["percent"]) for r in rows}):
        xs = [r for r in rows if (r["mask"], r["percent"]) == key]
        out[key] = {**seed_spread(r["perplexity"] for r in xs), "sparsity": float(np.mean([r["sparsity"] for r in xs])),
                    "seeds": sorted(r["seed"] for r in xs)}
    return out


def _ppl(c: dict) -> str:
    return f"{c['mean']:.2f} ± {c['std']:.2f} (n = {c['n']})" if c["std"] is not None else f"{c['mean']:.2f} (n = 1)"


def paired_change(rows: list[dict], mask: str, percent: float) -> list[float]:
    """Per seed, the run's perplexity against the dense run of the same seed (the masked run starts from the
    dense run's initialisation), as a fraction: +0.04 is 4% worse."""
    dense = {r["seed"]: r["perplexity"] for r in rows if r["mask"] == "dense"}
    return [r["perplexity"] / dense[r["seed"]] - 1 for r in rows
            if (r["mask"], r["percent"]) == (mask, percent) and r["seed"] in dense]


def _change(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{100 * np.mean(xs):+.1f}%" + (f" ± {100 * np.std(xs, ddof=1):.1f}" if len(xs) > 1 else "")


def table(rows: list[dict]) -> str:
    c = cells(rows)
    dense = c.get(("dense", 0.0))
    lines = ["| pruned (target) | mask | measured sparsity | perplexity | change vs dense, same seeds |",
             "|---:|---|---:|---:|---:|"]
    if dense:
        lines.append(f"| 0% | dense | 0.0% | {_ppl(dense)} | baseline |")
    for pc in sorted({p for _, p in c if p > 0}):
        for mask in MASKS:
            if (mask, pc) in c:
                x = c[mask, pc]
                lines.append(f"| {pc:g}% | {mask} | {100 * x['sparsity']:.1f}% | {_ppl(x)} | "
                             f"{_change(paired_change(rows, mask, pc))} |")
    return "\n".join(lines) + ("\n\nPerplexity on the validation split, mean ± sample std over the seeds run. Change: "
                               "per seed, perplexity over the dense run of that seed, minus 1; mean ± sample std. "
                               "Measured sparsity: pruned / allowed causal pairs.")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cells(rows)
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    dense = c.get(("dense", 0.0))
    for mask in MASKS:
        pts = ([(0.0, dense)] if dense else []) + sorted((v["sparsity"], v) for (m, _), v in c.items() if m == mask)
        if len(pts) <= (1 if dense else 0):
            continue
        ax.errorbar([100 * s for s, _ in pts], [v["mean"] for _, v in pts], yerr=[v["std"] or 0 for _, v in pts],
                    fmt=STYLE[mask], label=mask, ms=4, capsize=2)
    if dense:
        ax.axhline(dense["mean"] * 1.04, color="grey", lw=0.6, ls="-.", label="dense + 4%")
    ax.set_xlabel("measured sparsity (% of causal pairs pruned)", fontsize=8)
    ax.set_ylabel("validation perplexity", fontsize=8)
    means = [v["mean"] for v in c.values()]
    if max(means) > 3 * min(means):  # a collapse at high sparsity would flatten the rest on a linear axis
        ax.set_yscale("log")
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    return run(argv, __doc__, "results.csv of `sparseattn report` for a method: prune-lm sweep", load, table, plot)


if __name__ == "__main__":
    raise SystemExit(main())
