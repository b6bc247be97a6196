"""Reports of a sweep's runs: per task, each plan's metric (mean ± std over seeds), its sparsity and
its change against the dense baseline, as Markdown and HTML, with plots of metric against sparsity per
task and per pattern family (PNG and SVG), and every run of the sweep as ``results.csv`` for re-plotting.

    from sparseattn.reports.report import write_report_files
    paths = write_report_files(runs, "out/report", title="...", counts={"done": 12, "failed": 1})
    # {'markdown': ..., 'html': ..., 'csv': ..., 'plots': [...], 'summary': ...}

``runs`` are rows of a results database (``ResultsDB.runs``: task, plan, seed, status, score, metrics,
sparsity, config and result decoded); ``sparseattn.experiments.sweep.write_report`` reads them from a
database file and calls this.

A *group* is every finished run with the same configuration except the seed. Its baseline is the dense
group of the same task with otherwise the same configuration. Metrics print x100, sparsity in percent.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..lm.train import LMConfig
from ..patterns.base import Intersection, Union
from ..plans.io import as_plan
from ..training.config import FinetuneConfig
from ..training.record import one_class_warning
from ..training.tasks import task_info

_IGNORED = ("seed",)  # runs differing only in these are one group
# shown by the plan's label already: the method, a saved plan's digest, a learned run's penalty or target
_IN_PLAN_LABEL = ("method", "plan_digest", "lam", "target_sparsity", "prune", "mask", "scope", "blocks", "block_size",
                  "sinks", "retrain")


@dataclass
class Group:
    """Finished runs of one configuration over seeds."""

    task: str
    plan: str
    label: str  # plan plus the options that vary within the task
    family: str
    config: dict  # the shared configuration (seed removed)
    seeds: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # main metric per seed
    metrics: dict[str, list[float]] = field(default_factory=dict)
    sparsity: list[float] = field(default_factory=list)  # overall
    sparsity_applied: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    train_examples: list[int] = field(default_factory=list)
    eval_examples: list[int] = field(default_factory=list)  # a language model's: the tokens scored
    models: list[str] = field(default_factory=list)  # the results' own description of the model
    one_class: int = 0  # seeds whose model gave every evaluation example the same class
    reference: dict | None = None  # what always predicting the train split's majority class scores
    baseline: "Group | None" = None

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float | None:
        return float(np.std(self.scores, ddof=1)) if self.n > 1 else None

    @property
    def mean_sparsity(self) -> float:
        return float(np.mean(self.sparsity))

    @property
    def mean_applied(self) -> float:
        return float(np.mean(self.sparsity_applied))

    @property
    def delta(self) -> float | None:
        """Mean main metric minus the dense baseline's."""
        return None if self.baseline is None or self.baseline is self else self.mean - self.baseline.mean

    @property
    def is_dense(self) -> bool:
        return self.plan == "dense"


def plan_family(plan: str) -> str:
    """The pattern families of a plan, e.g. 'neighbour', 'global_tokens|neighbour', 'dense'."""
    if plan.startswith("learned("):
        return "learned"
    if plan.startswith(("attention_pruning(", "random_pruning(", "sink_window(")):
        return plan.split("(")[0]
    try:
        p = as_plan(plan)
    except Exception:
        return "other"
    if not p.rules:
        return "dense"

    def leaves(pat):
        if isinstance(pat, (Union, Intersection)) and pat.spec().startswith("("):  # an anonymous | or & (not bigbird)
            return sorted({x for q in pat.parts for x in leaves(q)})
        return [pat.spec().split("(")[0]]

    fams = sorted({("|" if isinstance(r.pattern, Union) else "&").join(leaves(r.pattern))
                   for r in p.rules})
    return "; ".join(fams)


def summarize(runs: list[dict]) -> dict[str, list[Group]]:
    """Group finished runs (rows of ResultsDB.runs) by task and configuration; link dense baselines."""
    by_task: dict[str, list[dict]] = {}
    for r in runs:
        if r["status"] == "done":
            by_task.setdefault(r["task"], []).append(r)
    out: dict[str, list[Group]] = {}
    for task, rows in by_task.items():
        # options (other than task, plan, seed) that vary within this task go into the label
        keys = sorted({k for r in rows for k in r["config"]} - {"task", "plan", *_IGNORED, *_IN_PLAN_LABEL})
        # an option varies when the runs that set it (a learned run's options are None in a fine-tune run's
        # config, and absent from older ones) disagree on it
        varying = [k for k in keys if len({repr(r["config"][k]) for r in rows if r["config"].get(k) is not None}) > 1]
        groups: dict[str, Group] = {}
        for r in rows:
            cfg = {k: v for k, v in r["config"].items() if k not in _IGNORED}
            gkey = repr(sorted(cfg.items()))
            g = groups.get(gkey)
            if g is None:
                extra = ", ".join(f"{k}={_fmt_value(cfg.get(k))}" for k in varying if cfg.get(k) is not None)
                g = groups[gkey] = Group(task, r["plan"], r["plan"] + (f" [{extra}]" if extra else ""),
                                         plan_family(r["plan"]), cfg)
            res = r["result"]
            g.seeds.append(r["seed"])
            g.scores.append(float(r["score"]))
            for k, v in (r["metrics"] or {}).items():
                g.metrics.setdefault(k, []).append(float(v))
            g.sparsity.append(float(r["sparsity"]))
            g.sparsity_applied.append(float(r["sparsity_applied"]))
            g.train_seconds.append(float(res.get("timing", {}).get("train_seconds", float("nan"))))
            data = res.get("data") or {}
            if data.get("train_examples") is not None:
                g.train_examples.append(int(data["train_examples"]))
                g.eval_examples.append(int(data["eval_examples"]))
            elif data.get("train_rows") is not None:  # a language model: rows of its context, tokens scored
                g.train_examples.append(int(data["train_rows"]))
                g.eval_examples.append(int(data["eval_scored_tokens"]))
            if res.get("model") and not _temporary_soft_model(res):
                g.models.append(str(res["model"]))
            g.one_class += one_class_warning(res) is not None
            g.reference = g.reference or res.get("majority_reference")
        dense = {_baseline_key(g.config): g for g in groups.values() if g.is_dense}
        for g in groups.values():
            g.baseline = dense.get(_baseline_key(g.config))
        out[task] = sorted(groups.values(), key=lambda g: (not g.is_dense, g.mean_sparsity, g.label))
    return dict(sorted(out.items()))


def _baseline_key(config: dict) -> str:
    """What a run shares with its dense baseline: the training options other than the plan, a language
    model's shape included (a learned run's own options, such as its penalty, are not training options)."""
    shared = (set(FinetuneConfig.__dataclass_fields__) | set(LMConfig.__dataclass_fields__)) - {"plan", "plan_digest",
                                                                                                 "method"}
    return repr(sorted((k, v) for k, v in config.items() if k in shared))


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _signed(x: float | None, scale: float = 100.0) -> str:
    return "–" if x is None else f"{scale * x:+.2f}"


def _metric(x: float | None, scale: float, digits: int = 2) -> str:
    """A metric as tables print it: x100 for GLUE's fractions, as is for perplexity."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{scale * x:.{digits}f}"


def table_rows(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one task's table (strings)."""
    task = task_info(groups[0].task)
    others = [m for m in task.metrics if m != task.main_metric]
    header = ["plan", "family", "seeds", "sparsity %", "in sparsified heads %",
              f"{task.main_metric} (mean ± std)", "Δ vs dense"] + others + ["note"]
    rows = []
    for g in groups:
        sc = task.scale
        main = _metric(g.mean, sc) + (f" ± {_metric(g.std, sc)}" if g.std is not None else " (n = 1)")
        note = ""
        if g.one_class:
            note = "predicts one class" + (f" ({g.one_class} of {g.n} seeds)" if g.n > 1 else "")
        rows.append([g.label, g.family, str(g.n), _pct(g.mean_sparsity), _pct(g.mean_applied), main,
                     "baseline" if g.is_dense and g.baseline is g else _signed(g.delta, sc)]
                    + [_metric(float(np.mean(g.metrics.get(m, [float("nan")]))), sc) for m in others] + [note])
    return header, rows


def _values(xs) -> str:
    """One value, or the range of several: '200', '200-3668'."""
    xs = sorted({x for x in xs if x is not None}, key=lambda x: (str(type(x)), x))
    if not xs:
        return "?"
    return _fmt_value(xs[0]) if len(xs) == 1 else f"{_fmt_value(xs[0])}-{_fmt_value(xs[-1])}"


def _temporary_soft_model(res: dict) -> bool:
    """A learned run's result that names its soft phase's temporary weights as its model (as results did until
    learn_glue named the model it started from): not a model a reader can look up, so the setup leaves it out."""
    return "learned" in res and Path(str(res["model"])).name == "soft_model" and "sparseattn-learn-" in str(res["model"])


def setup_lines(groups: list[Group]) -> list[str]:
    """A task's run setup, what a reader needs to weigh its numbers: model, training and evaluation sizes,
    epochs, learning rate, batch size, maximum length and seeds; then the majority-class reference."""
    t = task_info(groups[0].task)
    cfg = lambda k: _values(g.config.get(k) for g in groups)  # noqa: E731
    seeds = sorted({s for g in groups for s in g.seeds})
    model = _values(m for g in groups for m in g.models)
    if model == "?":  # results from before they described their model
        model = cfg("model")
        model = "the packaged all-MiniLM-L6-v2" if model in ("?", "None") else model
    train = _values(n for g in groups for n in g.train_examples)
    scored = _values(n for g in groups for n in g.eval_examples)
    if t.main_metric == "perplexity":
        sizes = (f"{train} training rows of {cfg('max_length')} tokens x {cfg('epochs')} epoch(s), lr {cfg('lr')}, "
                 f"batch {cfg('batch_size')}; perplexity over {scored} scored tokens of the {cfg('eval_split')} split")
    else:
        sizes = (f"{train} training examples x {cfg('epochs')} epoch(s), lr {cfg('lr')}, batch {cfg('batch_size')}, "
                 f"max length {cfg('max_length')}; evaluated on {scored} {cfg('eval_split')} examples")
    lines = [f"Setup: {model}; {sizes}; "
             f"seeds {', '.join(map(str, seeds))} ({'one run per plan: no spread' if len(seeds) == 1 else 'mean ± sample std'})."]
    ref = next((g.reference for g in groups if g.reference), None)
    if ref:
        shown = ", ".join(f"{m} {_pct(v, 2)}" for m, v in ref["metrics"].items())
        lines.append(f"Reference: always predicting the majority class '{ref['class']}' scores {shown}; a run at or "
                     f"below that learned nothing of the input.")
    elif t.main_metric in ("pearson", "spearman"):
        lines.append(f"Reference: a constant prediction correlates 0 ({t.main_metric}).")
    n_one = sum(1 for g in groups if g.one_class)
    if n_one:
        lines.append(f"Warning: {n_one} of {len(groups)} plans have runs that predict one class for every example "
                     "(note column).")
    return lines


def render_markdown(summary: dict[str, list[Group]], *, title: str, counts: dict, plots: dict) -> str:
    lines = [f"# {title}", "", _counts_line(counts), "",
             "Metrics on the evaluation split (GLUE's x100, perplexity as is; mean ± sample std over seeds). Sparsity = 1 − kept / allowed "
             "query-key pairs on that data (sparseattn.sparsity), overall and over the sparsified heads only. "
             "Δ = mean minus the dense run of the same configuration.", ""]
    for task, groups in summary.items():
        t = task_info(task)
        lines += [f"## {t.title}", ""] + [ln for x in setup_lines(groups) for ln in (x, "")]
        header, rows = table_rows(groups)
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i < 2 or h == "note" else "---:" for i, h in enumerate(header)) + "|")
        for r in rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        lines.append("")
        if task in plots.get("task", {}):
            lines += [f"![{t.title}: {t.main_metric} against sparsity]({plots['task'][task]['png']})", ""]
    if plots.get("family"):
        lines += ["## Pattern families", ""]
        for fam, p in plots["family"].items():
            lines += [f"![{fam}: change against dense by sparsity]({p['png']})", ""]
    return "\n".join(lines)


def render_html(summary: dict[str, list[Group]], *, title: str, counts: dict, plots: dict) -> str:
    e = html.escape
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px}"
             "td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f4f4}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>{e(title)}</h1>", f"<p>{e(_counts_line(counts))}</p>",
             "<p>Metrics on the evaluation split (GLUE's x100, perplexity as is; mean ± sample std over seeds). Sparsity = 1 − kept / "
             "allowed query-key pairs on that data, overall and over the sparsified heads only. Δ = mean minus "
             "the dense run of the same configuration.</p>"]
    for task, groups in summary.items():
        t = task_info(task)
        header, rows = table_rows(groups)
        parts.append(f"<h2>{e(t.title)}</h2>" + "".join(f"<p>{e(x)}</p>" for x in setup_lines(groups))
                     + "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td{' class=n' if 2 <= i < len(r) - 1 else ''}>{e(c)}</td>"
                                          for i, c in enumerate(r))
                         + "</tr>")
        parts.append("</table>")
        if task in plots.get("task", {}):
            parts.append(f"<img src='{e(plots['task'][task]['svg'])}' alt='{e(t.title)} metric vs sparsity'>")
    if plots.get("family"):
        parts.append("<h2>Pattern families</h2>")
        for fam, p in plots["family"].items():
            parts.append(f"<img src='{e(p['svg'])}' alt='{e(fam)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _counts_line(counts: dict) -> str:
    order = ("done", "running", "failed", "pending")
    line = "Runs: " + ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s)) + "."
    if counts.get("pending") or counts.get("running"):
        line += (" The sweep is not finished (or was interrupted): run its command again, `sparseattn sweep "
                 "SPEC.yaml`, to run the rest (finished runs are kept), then this report again.")
    if not counts.get("done"):
        line += " No run has finished yet, so there is nothing to tabulate."
    return line


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def _figure(width=6.4, height=4.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def _save(fig, stem: Path) -> dict:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {}
    import matplotlib

    for ext in ("png", "svg"):
        p = stem.with_suffix("." + ext)
        # the same results give the same files (no date, fixed SVG ids): a regenerated report committed beside
        # the code changes only where the numbers do
        with matplotlib.rc_context({"svg.hashsalt": stem.name}):
            fig.savefig(p, dpi=150 if ext == "png" else None, metadata={"Date": None} if ext == "svg" else None)
        paths[ext] = p
    return paths


def pareto_front(points: list[tuple[float, float]], *, higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The (sparsity, metric) points no other point beats on both (at least as sparse and at least as
    good, better in one), sorted by sparsity. ``higher_is_better=False`` for perplexity."""
    sign = 1 if higher_is_better else -1
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -sign * p[1])):
        if sign * y > best:
            front.append((x, y))
            best = sign * y
    return sorted(front)


def _label_points(fig, ax, points: list[tuple[float, float, str]]) -> None:
    """Write each point's label beside it where it overlaps no label written before (tries eight
    positions around the point); a label with no free position is left out (the table has every plan)."""
    offsets = [(4, 4), (4, -10), (-4, 4), (-4, -10), (4, 12), (4, -18), (-4, 12), (-4, -18)]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lays the axes out, so that text sizes are known
    renderer = canvas.get_renderer()
    taken = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    for x, y, text in sorted(points):
        for dx, dy in offsets:
            a = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                            ha="left" if dx > 0 else "right")
            box = a.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(b) for b in taken) and ax.get_window_extent(renderer).contains(box.x0, box.y0):
                taken.append(box)
                break
            a.remove()


def plot_task(groups: list[Group], stem: Path) -> dict:
    """Main metric against overall sparsity for one task: a point per group (error bar = std over seeds),
    coloured by pattern family, each family's Pareto front (its best score at that sparsity or more) as a
    step line; the dense baseline as a dashed line, the majority-class reference as a dotted one."""
    task = task_info(groups[0].task)
    sc = task.scale
    fig, ax = _figure()
    fams = sorted({g.family for g in groups if not g.is_dense})
    colors = {f: f"C{i % 10}" for i, f in enumerate(fams)}
    for g in groups:
        if g.is_dense:
            ax.axhline(sc * g.mean, ls="--", color="0.3", lw=1)
            if g.std:
                ax.axhspan(sc * (g.mean - g.std), sc * (g.mean + g.std), color="0.85", zorder=0)
    seen = set()
    for g in groups:
        x, y = 100 * g.mean_sparsity, sc * g.mean
        c = "0.3" if g.is_dense else colors[g.family]
        lab = ("dense" if g.is_dense else g.family) if (g.family not in seen) else None
        seen.add(g.family)
        ax.errorbar([x], [y], yerr=[sc * g.std] if g.std else None, fmt="o", color=c, capsize=3, label=lab,
                    mfc="white" if g.one_class else c)  # hollow: a run of it predicts one class only
    if any(g.one_class for g in groups):
        ax.plot([], [], "o", color="0.3", mfc="white", label="hollow: predicts one class")
    fronts = 0
    for fam in fams:
        front = pareto_front([(100 * g.mean_sparsity, sc * g.mean) for g in groups if g.family == fam],
                             higher_is_better=task.higher_is_better)
        if len(front) > 1:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color=colors[fam], lw=1, alpha=0.7,
                    label=None if fronts else "a family's best at ≥ that sparsity")
            fronts += 1
    ref = next((g.reference for g in groups if g.reference), None)
    if ref and task.main_metric in ref["metrics"]:
        ax.axhline(sc * ref["metrics"][task.main_metric], ls=":", color="0.5", lw=1,
                   label=f"always '{ref['class']}' (majority class)")
    ax.margins(x=0.25, y=0.1)  # room for the labels
    ax.set_xlim(left=max(ax.get_xlim()[0], -2.0), right=min(ax.get_xlim()[1], 102.0))  # sparsity is in [0, 100]
    ax.set_xlabel("sparsity (% of allowed query-key pairs removed)")
    ax.set_ylabel(f"{task.main_metric}{' x100' if sc == 100 else ''} ({task.title} {task.split})")
    ax.set_title(f"{task.title}: {task.main_metric} against sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if len(groups) <= 16:
        _label_points(fig, ax, [(100 * g.mean_sparsity, sc * g.mean, g.label) for g in groups])
    return _save(fig, stem)


def family_points(family: str, summary: dict[str, list[Group]]) -> dict[str, list[tuple[float, float, float]]]:
    """Per task, the family's (sparsity x100, Δ vs dense, std) points in the task's printed units, by sparsity."""
    out = {}
    for task, groups in summary.items():
        sc = task_info(task).scale
        pts = sorted((100 * g.mean_sparsity, sc * g.delta, sc * (g.std or 0)) for g in groups
                     if g.family == family and g.delta is not None)
        if pts:
            out[task] = pts
    return out


def plot_family(family: str, summary: dict[str, list[Group]], stem: Path, ylim: tuple[float, float] | None = None
                ) -> dict:
    """Change of the main metric against the dense baseline, by sparsity, for one pattern family; a line
    per task. ``ylim``: the y-range every family plot of a report shares, so they compare at a glance."""
    fig, ax = _figure()
    points = family_points(family, summary)
    for i, task in enumerate(summary):
        if task not in points:
            continue
        x, y, s = map(list, zip(*points[task]))
        ax.errorbar(x, y, yerr=s if any(s) else None, fmt="o-", color=f"C{i % 10}", capsize=3,
                    label=task_info(task).title)
    ax.axhline(0, color="0.3", lw=1, ls="--")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("sparsity (% of allowed query-key pairs removed)")
    ax.set_ylabel("Δ main metric vs dense (x100 for GLUE fractions)")
    ax.set_title(f"pattern family: {family}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, stem)


CSV_COLUMNS = ("task", "plan", "seed", "status", "main_metric", "score", "metrics", "sparsity", "sparsity_applied",
               "sparsity_per_layer", "epochs", "train_seconds", "wall_seconds", "device", "key", "config")


def write_csv(runs: list[dict], path) -> Path:
    """Every run, one row each (pending and failed ones too, with their status): the task's main metric and
    all metrics (JSON), sparsity overall / in the sparsified heads / per layer (fractions), the full
    configuration (JSON) and its key in the database."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in runs:
            cfg, res = r.get("config") or {}, r.get("result") or {}
            w.writerow([
                r["task"], r["plan"], r["seed"], r["status"], task_info(r["task"]).main_metric, r.get("score"),
                json.dumps(r["metrics"], sort_keys=True) if r.get("metrics") is not None else "",
                r.get("sparsity"), r.get("sparsity_applied"),
                json.dumps(r["sparsity_per_layer"]) if r.get("sparsity_per_layer") is not None else "",
                cfg.get("epochs"), (res.get("timing") or {}).get("train_seconds"), r.get("wall_seconds"),
                res.get("device", ""), r["key"], json.dumps(cfg, sort_keys=True)])
    return path


def write_report_files(runs: list[dict], out_dir, *, title: str, counts: dict) -> dict:
    """Write report.md, report.html, results.csv and plots/ under ``out_dir`` from ``runs`` (rows of a results
    database); ``counts``: how many runs of the sweep are in each status, for the header."""
    summary = summarize(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict = {"task": {}, "family": {}}
    for task, groups in summary.items():
        paths = plot_task(groups, out / "plots" / f"task_{_slug(task)}")
        plots["task"][task] = {k: str(p.relative_to(out)) for k, p in paths.items()}
    families = sorted({g.family for gs in summary.values() for g in gs if not g.is_dense and g.delta is not None})
    # a family plot is a curve: only families with two plans or more on some task; one y-scale for all
    points = {fam: family_points(fam, summary) for fam in families}
    families = [f for f in families if any(len(p) > 1 for p in points[f].values())]
    ys = [y + d * s for f in families for pts in points[f].values() for _, y, s in pts for d in (-1, 1)] + [0.0]
    pad = 0.05 * (max(ys) - min(ys) or 1.0)
    ylim = (min(ys) - pad, max(ys) + pad)
    for fam in families:
        paths = plot_family(fam, summary, out / "plots" / f"family_{_slug(fam)}", ylim=ylim)
        plots["family"][fam] = {k: str(p.relative_to(out)) for k, p in paths.items()}
    md, page = out / "report.md", out / "report.html"
    md.write_text(render_markdown(summary, title=title, counts=counts, plots=plots) + "\n")
    page.write_text(render_html(summary, title=title, counts=counts, plots=plots) + "\n")
    table = write_csv(runs, out / "results.csv")
    files = [out / p for d in plots.values() for v in d.values() for p in v.values()]
    return {"markdown": md, "html": page, "csv": table, "plots": files, "summary": summary}
