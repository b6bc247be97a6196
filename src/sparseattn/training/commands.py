"""Command: evaluate (registered into the ``sparseattn`` CLI)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_saved

    r = evaluate_saved(args.source, args.data, task=args.task, plan=args.plan, text_column=args.text_column,
                       pair_column=args.pair_column, label_column=args.label_column, glue_dir=args.glue_dir,
                       limit=args.limit, batch_size=args.batch_size, max_length=args.max_length,
                       backend=args.backend, device=args.device, parse_cache=args.parse_cache,
                       progress=not args.no_progress)
    text = json.dumps(r, indent=2) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text, end="")
    return 0


def register(sub, formatter_class) -> None:
    p = sub.add_parser(
        "evaluate", help="score a saved run (or a fine-tuned model) with its plan on any labeled data; JSON out",
        formatter_class=formatter_class,
        description="Load a run saved by `finetune --out DIR --save-model` (its model, plan and task), or a "
                    "fine-tuned sequence classifier with --plan and --task, and score it on --data: a TSV, CSV or "
                    "JSON-lines file of labeled examples, or a GLUE task and split. Prints the task's metrics and "
                    "the plan's measured sparsity on that data as JSON.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn evaluate out/sst2-neigh --data sst2:dev
              sparseattn evaluate out/sst2-neigh --data reviews.csv --text-column review --label-column sentiment
              sparseattn evaluate out/mrpc-run --data pairs.jsonl --text-column a --pair-column b
              sparseattn evaluate my-classifier/ --task rte --plan "later-half: neighbour(2)" --data rte.tsv
            """))
    p.add_argument("source", metavar="RUN_OR_MODEL",
                   help="a run's folder (results.json, model/, plan/), or a fine-tuned classifier's folder or hub id")
    p.add_argument("--data", required=True,
                   help="a .tsv, .csv or .jsonl file with a header / keys naming its columns, or TASK[:SPLIT] of GLUE "
                        "(e.g. sst2, mnli:dev_mismatched; split default dev)")
    p.add_argument("--task", default=None, help="the GLUE task whose labels and metrics apply (a run knows its own)")
    p.add_argument("--plan", default=None, help="plan spec or saved plan folder; default: the run's plan, else dense")
    p.add_argument("--text-column", default=None, help="default: the task's GLUE column, else text / sentence")
    p.add_argument("--pair-column", default=None, help="second segment of pair tasks; default: the task's")
    p.add_argument("--label-column", default=None, help="class names, class ids or scores; default: the task's, "
                                                        "else label")
    p.add_argument("--limit", type=int, default=None, help="a fixed random subset of this many examples")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    p.add_argument("--max-length", type=int, default=None, help="default: the run's, else 128")
    p.add_argument("--backend", default=None, help="attention backend; default: the run's, else reference")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu; None: cuda when available")
    p.add_argument("--glue-dir", default=None, help="GLUE in the original TSV layout; None: $GLUE_DIR, else the hub")
    p.add_argument("--parse-cache", default=None, help="SQLite cache of dependency parses (syntax/lexical plans)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)
