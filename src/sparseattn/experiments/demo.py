"""The main job (``sparseattn demo``, ``make demo``): does the *kind* of sparsity matter, or only its amount?

Fine-tunes the packaged MiniLM on a slice of SST-2 three times: dense, with ``later-half: neighbour(2)``,
and with ``later-half: random(r)``, where r is chosen so that random's measured sparsity on the
evaluation data matches neighbour's. Runs go through the sweep machinery into a results database under
the output folder, so an interrupted demo picks up where it stopped; then it prints the table and writes
the report with its plot. Sized to take about five minutes on two CPU cores.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..model_sparsity import layout_of_batch
from ..models import load_tokenizer, resolve_model
from ..plans.plan import Plan
from ..reports.report import setup_lines, table_rows
from ..sparsity import measure_plan
from ..training.batching import collate, encode_split, eval_batches
from ..training.data import load_examples
from ..training.evaluate import sum_reports
from ..training.glue import get_task
from .db import ResultsDB
from .sweep import enqueue, format_duration, run_worker, spec_from_dict, summary_lines, write_report

NEIGHBOUR = "later-half: neighbour(2)"


def matched_random_degree(target_plan: str, *, task: str, model: str | None, max_length: int,
                          limit_eval: int | None, eval_split: str = "dev", glue_dir=None,
                          max_r: int = 64) -> tuple[int, float, float]:
    """The degree r for which ``later-half: random(r)`` has the sparsity closest to ``target_plan``'s, both
    measured (sparseattn.sparsity) on the evaluation examples a fine-tuning run uses. Returns
    (r, sparsity of target, sparsity of random(r)), sparsities over the sparsified heads."""
    from transformers import AutoConfig  # here, not at the top: importing transformers takes seconds

    t = get_task(task)
    cfg = AutoConfig.from_pretrained(resolve_model(model))
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    shape = (cfg.num_hidden_layers, cfg.num_attention_heads)
    ex = load_examples(t, eval_split, limit_eval, glue_dir)
    split = encode_split(load_tokenizer(model), ex, max_length, regression=t.is_regression, what="demo eval")
    layouts = [layout_of_batch(collate(split, idx)) for idx in eval_batches(split, 256)]

    def sparsity(spec: str) -> float:
        lps = Plan.parse(spec).resolve(*shape)
        return sum_reports(measure_plan(lps, lay) for lay in layouts).applied_sparsity

    target = sparsity(target_plan)
    best = None
    for r in range(1, max_r + 1):
        s = sparsity(f"later-half: random({r})")
        if best is None or abs(s - target) < abs(best[1] - target):
            best = (r, s)
        if s < target:  # sparsity falls as r grows: no closer one after this
            break
    return best[0], target, best[1]


def run_demo(out: str | Path = "out/demo", *, model: str | None = None, glue_dir=None, limit_train: int = 6000,
             limit_eval: int = 872, epochs: int = 1, batch_size: int = 32, lr: float = 1e-4, seed: int = 0,
             max_length: int = 128, progress: bool = True) -> dict:
    import transformers  # here, not at the top: importing transformers takes seconds

    t0 = time.perf_counter()
    out = Path(out)
    transformers.logging.set_verbosity_error()  # the new classification head is expected; keep the output short
    transformers.utils.logging.disable_progress_bar()
    r, s_neigh, s_rand = matched_random_degree(NEIGHBOUR, task="sst2", model=model, max_length=max_length,
                                               limit_eval=limit_eval, glue_dir=glue_dir)
    random_plan = f"later-half: random({r})"
    print(f"{NEIGHBOUR} removes {s_neigh:.1%} of the attention pairs in the layers it applies to on the SST-2 "
          f"evaluation slice;\nrandom(r) comes closest at r={r} ({s_rand:.1%}), so the comparison is "
          f"{random_plan}.\n")
    spec = spec_from_dict({
        "name": "demo",
        "fixed": {"task": "sst2", "model": model, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                  "max_length": max_length, "limit_train": limit_train, "limit_eval": limit_eval},
        "grid": {"plan": ["dense", NEIGHBOUR, random_plan], "seed": [seed]},
    }, name="demo", base_dir=out)
    db = enqueue(spec, out / "demo.sqlite")
    db.close()
    run_worker(out / "demo.sqlite", "demo", glue_dir=glue_dir, progress=progress)
    paths = write_report(out / "demo.sqlite", out / "report", sweep="demo",
                         title="sparseattn demo: dense vs neighbour vs random at matched sparsity (SST-2 slice)")
    db = ResultsDB(out / "demo.sqlite")
    lines = summary_lines(db, "demo")
    db.close()
    print()
    for task, groups in paths["summary"].items():
        header, rows = table_rows(groups)
        keep = [0, 3, 4, 5, 6]  # plan, sparsity, sparsity in sparsified heads, accuracy, delta
        widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in keep]
        print(f"SST-2, {limit_train} training examples, {epochs} epoch(s), {limit_eval} dev examples:")
        print("  ".join(header[i].ljust(w) for i, w in zip(keep, widths)))
        for row in rows:
            print("  ".join(row[i].ljust(w) for i, w in zip(keep, widths)))
        for line in setup_lines(groups)[1:]:  # the majority-class reference; a warning for one-class runs
            print(line)
    print("\n" + "\n".join(lines))
    print(f"\nreport: {paths['markdown']}  {paths['html']}")
    for p in paths["plots"]:
        if str(p).endswith(".png"):
            print(f"plot:   {p}")
    print(f"the demo took {format_duration(time.perf_counter() - t0)} in all (run it again: finished runs are kept)")
    return paths
