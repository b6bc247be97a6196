"""``sparseattn ap collect`` / ``ap mask`` / ``ap draw``: Attention Pruning from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import torch

from ..layout import TokenLayout
from ..models import load_model, load_tokenizer, resolve_model
from ..plans.io import save_plan
from ..plans.spec import parse_ranges
from ..sparsity import measure_plan
from ..training.distributed import from_env as distributed_from_env
from ..lm.corpus import cut_rows, encode_text, read_text
from ..lm.perplexity import check_context
from .collect import AttentionStats, collect_attention, collect_attention_rows, tokenize_lengths
from .data import load_glue, load_hf_dataset, load_text_file
from .mask import (attention_pruning_mask, block_mask, data_report, expand_to_blocks, grid_report, mask_plan,
                   random_like, thresholds)
from .pictures import draw_attention, draw_mask

# -- shared arguments -------------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser, prefix: str = "", default_split: str = "train") -> None:
    dest = prefix.replace("-", "_")
    g = p.add_argument_group(f"{prefix.rstrip('-') or 'data'} (one of --{prefix}task, --{prefix}text-file, "
                             f"--{prefix}dataset)")
    g.add_argument(f"--{prefix}task", dest=f"{dest}task", default=None,
                   help="a GLUE task (SST-2, MRPC, RTE, CoLA, STS-B, ...), read from --glue-dir / $GLUE_DIR")
    g.add_argument(f"--{prefix}text-file", dest=f"{dest}text_file", default=None,
                   help="one example per line; a tab separates a second segment")
    g.add_argument(f"--{prefix}dataset", dest=f"{dest}dataset", default=None,
                   help="a `datasets` name or local path, NAME or NAME:CONFIG")
    g.add_argument(f"--{prefix}split", dest=f"{dest}split", default=default_split, help=f"split of --{prefix}task / --{prefix}dataset")
    g.add_argument(f"--{prefix}limit", dest=f"{dest}limit", type=int, default=None,
                   help="use only the first N examples (in file order)")
    if not prefix:
        g.add_argument("--glue-dir", default=None, help="GLUE folder in the original layout; unset: $GLUE_DIR")
        g.add_argument("--text-column", default="sentence", help="text column of --dataset")
        g.add_argument("--pair-column", default=None, help="second-segment column of --dataset")


def _load_examples(args, prefix: str = ""):
    """(examples, description) from the data arguments; None if none was given and none is required."""
    d = prefix.replace("-", "_")
    task, text_file, dataset = (getattr(args, f"{d}task"), getattr(args, f"{d}text_file"), getattr(args, f"{d}dataset"))
    split, limit = getattr(args, f"{d}split"), getattr(args, f"{d}limit")
    given = [x for x in (task, text_file, dataset) if x]
    if len(given) > 1:
        raise ValueError(f"give one of --{prefix}task, --{prefix}text-file, --{prefix}dataset, not {len(given)}")
    if not given:
        return None, None
    if task:
        examples, what = load_glue(task, split, glue_dir=getattr(args, "glue_dir", None)), f"GLUE {task} {split}"
    elif text_file:
        examples, what = load_text_file(text_file), f"text file {text_file}"
    else:
        examples = load_hf_dataset(dataset, split, getattr(args, "text_column", "sentence"),
                                   getattr(args, "pair_column", None))
        what = f"dataset {dataset} {split}"
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--{prefix}limit must be >= 1, got {limit}")
        examples = examples[:limit]
        what += f" (first {len(examples)})"
    return examples, what


# -- ap collect -------------------------------------------------------------------------------------
def cmd_collect(args) -> int:
    """Under torchrun data-parallel: each process averages its share of the batches, the sums are added up, and
    rank 0 alone writes the file and reports."""
    dist = distributed_from_env()
    device = dist.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with dist.joined(device):
        return (_collect_rows if args.corpus else _collect_examples)(args, device, dist)


def _say(dist, *a, **k) -> None:
    if dist.is_main:
        print(*a, **k)


def _collect_examples(args, device, dist) -> int:
    examples, what = _load_examples(args)
    if examples is None:
        raise ValueError("ap collect needs data: --task (a GLUE task), --text-file, --dataset or --corpus")
    dtype = getattr(torch, args.dtype)
    model_name = resolve_model(args.model)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, task="base", dtype=dtype).to(device)
    where = f", {dist.world_size} processes" if dist.active else ""
    _say(dist, f"model: {model_name}\ndata: {what}, {len(examples)} examples\ngrid: {args.max_length} positions{where}",
         file=sys.stderr)
    stats = collect_attention(model, tok, examples, length=args.max_length, batch_size=args.batch_size,
                              longer=args.longer, progress=not args.quiet and dist.is_main,
                              sum_dtype=getattr(torch, args.sum_dtype), dist=dist,
                              metadata={"model": model_name, "data": what, "dtype": args.dtype})
    if dist.is_main:  # rank 0 alone writes
        path = stats.save(args.out)
        m = stats.metadata
        print(f"wrote {path}: {m['examples']} examples ({m['truncated']} truncated, {m['skipped']} skipped as longer "
              f"than {args.max_length}), longest {stats.longest} tokens after that, "
              f"{'decoder (causal)' if stats.causal else 'encoder'}, {stats.num_layers} layers x {stats.num_heads} heads")
        if args.png:
            print(f"wrote {draw_attention(stats, args.png)}")
    dist.barrier()  # no process ends before the file is written
    return 0


def _collect_rows(args, device, dist) -> int:
    """ap collect --corpus: a language model's rows (the files end to end, EOS between, cut into rows of
    --max-length tokens, as train-lm makes them), collected one layer's maps at a time."""
    if any((args.task, args.text_file, args.dataset)):
        raise ValueError("give --corpus or one of --task, --text-file, --dataset, not both")
    texts = [read_text(f) for f in args.corpus]  # empty files stop here
    model_name = resolve_model(args.model)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, task="base", dtype=getattr(torch, args.dtype))
    check_context(model, args.max_length, what=model_name)
    docs = [encode_text(tok, t, what=str(f)) for t, f in zip(texts, args.corpus)]
    rows = cut_rows(docs, args.max_length, tok.eos_token_id)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        rows = rows[:args.limit]
    what = f"{len(args.corpus)} text file(s) in rows of {args.max_length} tokens"
    where = f", {dist.world_size} processes" if dist.active else ""
    _say(dist, f"model: {model_name}\ndata: {what}, {len(rows)} rows\ngrid: {args.max_length} positions{where}",
         file=sys.stderr)
    stats = collect_attention_rows(model.to(device), rows, batch_size=args.batch_size,
                                   progress=not args.quiet and dist.is_main, sum_dtype=getattr(torch, args.sum_dtype),
                                   dist=dist, metadata={"model": model_name, "data": what, "dtype": args.dtype,
                                                        "files": [str(f) for f in args.corpus]})
    if dist.is_main:  # rank 0 alone writes
        path = stats.save(args.out)
        print(f"wrote {path}: {len(rows)} rows of {args.max_length} tokens, "
              f"{'decoder (causal)' if stats.causal else 'encoder'}, {stats.num_layers} layers x {stats.num_heads} heads")
        if args.png:
            print(f"wrote {draw_attention(stats, args.png)}")
    dist.barrier()
    return 0


# -- ap mask ----------------------------------------------------------------------------------------
def plan_name(method: str, scope: str, percent: float, blocks: str = "none", block_size: int | None = None) -> str:
    """The folder name `ap mask` gives a plan: ap-layer-p60, random-head-p12_5, ap-layer-p80-mass16."""
    return (f"{method}-{scope}-p{percent:g}".replace(".", "_")
            + (f"-{blocks}{block_size}" if blocks != "none" else ""))


def _measure_on(plan, stats, examples, tokenizer, block_size):
    """Sparsity of ``plan`` on ``examples`` (lengths only), and how many are longer than the grid."""
    lengths = tokenize_lengths(tokenizer, examples)
    fit = sorted(n for n in lengths if n <= stats.length)  # similar lengths together: less padding to mask
    report = None
    layer_plans = plan.resolve(stats.num_layers, stats.num_heads)
    for s in range(0, len(fit), 256):
        layout = TokenLayout.from_lengths(fit[s:s + 256], causal=stats.causal)
        r = measure_plan(layer_plans, layout, block_size=block_size)
        report = r if report is None else report + r
    return report, len(lengths) - len(fit)


def cmd_mask(args) -> int:
    stats = AttentionStats.load(args.stats)
    N = args.length or stats.longest
    if not 1 <= N <= stats.length:
        raise ValueError(f"--length {N} is outside the collected grid of {stats.length} positions")
    if N != stats.length:
        stats = stats.cropped(N)
    unobserved = int((stats.allowed() & (stats.counts == 0)).sum())
    print(f"{args.stats}: {stats.num_examples} examples of {stats.metadata.get('data', '?')}, "
          f"{'decoder' if stats.causal else 'encoder'}; mask grid {N} x {N}"
          + (" (the longest collected example)" if args.length is None else ""))
    if unobserved:
        print(f"note: {unobserved} allowed grid pairs were never observed (positions beyond the longest example); "
              "they are kept, never pruned")
    if args.blocks != "none" and not args.block_size:
        raise ValueError(f"--blocks {args.blocks} needs --block-size")
    for p in args.prune:
        if not 0 <= p < 100:
            raise ValueError(f"--prune takes percentages in [0, 100), got {p}")
    measure_examples, measure_what = _load_examples(args, "measure-")
    tokenizer = load_tokenizer(stats.metadata.get("model")) if measure_examples is not None else None

    out = Path(args.out)
    rows = []
    for p in args.prune:
        f = p / 100
        if args.blocks == "mass":
            keep = block_mask(stats, f, args.block_size, scope=args.scope, budget=args.budget)
        else:
            keep = attention_pruning_mask(stats, f, scope=args.scope, budget=args.budget)
            if args.blocks == "any":
                keep = expand_to_blocks(keep, stats.allowed(), args.block_size)
        variants = [("ap", keep)]
        if args.random:
            variants.append(("random", random_like(keep, stats, scope=args.scope, budget=args.budget,
                                                   seed=args.seed)))
        for method, k in variants:
            name = plan_name(method, args.scope, p, args.blocks, args.block_size)
            plan = mask_plan(k, prefix=method)
            grid = grid_report(plan, stats, block_size=args.block_size)
            collected = data_report(k, stats)
            row = {"plan": name, "method": method, "requested_percent": p, "scope": args.scope,
                   "budget": args.budget, "blocks": args.blocks, "block_size": args.block_size,
                   "grid_length": N, "grid_sparsity": grid.overall,
                   "grid_block_density": grid.block_density,
                   "collected_sparsity": collected.overall}
            if measure_examples is not None:
                measured, refused = _measure_on(plan, stats, measure_examples, tokenizer, args.block_size)
                row.update(measured_on=measure_what, measured_sparsity=measured.overall if measured else None,
                           measured_block_density=measured.block_density if measured else None,
                           measured_refused=refused)
            meta = dict(row, seed=args.seed if method == "random" else None, stats_file=str(args.stats),
                        stats=stats.metadata, grid=grid.to_dict(), collected=collected.to_dict(),
                        thresholds=thresholds(k, stats, args.scope) if method == "ap" and args.blocks == "none"
                        else None)
            folder = save_plan(plan, out / name, num_layers=stats.num_layers, num_heads=stats.num_heads, length=N,
                               metadata=meta)
            if args.png:
                draw_mask(k, folder / "mask.png", allowed=stats.allowed(), row_sparsity=grid.per_layer.tolist(),
                          title=f"{name}: {grid.overall:.1%} of the {N}-grid pruned")
            rows.append(row)

    _print_table(rows)
    print(f"(a plan's name gives P, the share of the allowed pairs of the {N} x {N} grid it prunes (--budget "
          f"{args.budget}); examples shorter than the grid hold fewer of the pruned pairs, so their sparsity, the "
          "columns on data, is lower)" if args.budget == "grid" else "(a plan's name gives P, the share of the "
          "collected examples' allowed pairs it prunes (--budget data); the grid columns count the full grid)")
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    last_ap = [r for r in rows if r["method"] == "ap"][-1]["plan"]
    print(f"\nwrote {len(rows)} plans and {out / 'summary.json'}; use one with --plan {out / last_ap}")
    return 0


def _print_table(rows):
    cols = [("plan", "plan", "{}"), ("grid_sparsity", "grid sparsity", "{:.1%}"),
            ("grid_block_density", "block density", "{:.1%}"),
            ("collected_sparsity", "on collected data", "{:.1%}"),
            ("measured_sparsity", "on measure data", "{:.1%}"), ("measured_refused", "refused (longer)", "{}")]
    cols = [c for c in cols if any(r.get(c[0]) is not None for r in rows)]
    cells = [[c[1] for c in cols]] + [["-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(row, widths))))


# -- ap draw ----------------------------------------------------------------------------------------
def _index_list(s: str | None) -> list[int] | None:
    """Indices written as ranges (0-2,5); None or 'all' for every one."""
    got = None if s is None else parse_ranges(s)
    return None if got in (None, "all") else list(got)


def cmd_draw(args) -> int:
    stats = AttentionStats.load(args.stats)
    if args.length:
        stats = stats.cropped(args.length)
    print(f"wrote {draw_attention(stats, args.out, layers=_index_list(args.layers), heads=_index_list(args.heads))}")
    return 0


def register(subparsers, formatter_class) -> None:
    ap = subparsers.add_parser(
        "ap", help="Attention Pruning: collect mean attention, make global masks (plans)", formatter_class=formatter_class,
        description="Attention Pruning (Rugina et al.): average the attention of a trained model over a data set, "
                    "prune the pairs with the least average attention with one global mask per layer, and "
                    "re-fine-tune with it (any command that takes --plan takes the plan folder).",
        epilog=textwrap.dedent("""\
            example:
              sparseattn ap collect --task SST-2 --max-length 128 --out out/ap/sst2.safetensors --png out/ap/sst2.png
              sparseattn ap mask out/ap/sst2.safetensors --prune 20 40 60 80 90 --random --out out/ap/sst2
              sparseattn finetune --task SST-2 --plan out/ap/sst2/ap-layer-p60
            """))
    sub = ap.add_subparsers(dest="ap_command", metavar="AP_COMMAND")
    ap.set_defaults(func=lambda args: (ap.print_help(), 2)[1])
    for add in (_add_collect, _add_mask, _add_draw):
        add(sub, formatter_class)


def _add_collect(sub, formatter_class) -> None:
    p = sub.add_parser("collect", help="average attention per (layer, head, query, key) over a data set",
                       formatter_class=formatter_class,
                       description="Run a model (pretrained, or a fine-tuned checkpoint folder) over a data set and "
                                   "average its softmax attention per (layer, head, query position, key position) "
                                   "on a grid of --max-length positions. Only real pairs count (no padding; no "
                                   "future keys for decoders): sums and counts, so padding never changes the average.",
                       epilog=textwrap.dedent("""\
                           examples:
                             sparseattn ap collect --task SST-2 --max-length 128 --out out/ap/sst2.safetensors
                             sparseattn ap collect --text-file corpus.txt --model path/to/llama --max-length 512 \\
                                 --longer skip --out out/ap/llama.safetensors --png out/ap/llama.png
                             sparseattn ap collect --corpus ../shared/data/books/train/*.txt --model out/lm/dense/model \\
                                 --max-length 1024 --batch-size 8 --out out/ap/lm.safetensors
                           """))
    _add_data_args(p)
    p.add_argument("--corpus", nargs="+", default=None, metavar="FILE",
                   help="text files read as a language model trains on them: end to end, EOS between, cut into rows "
                        "of --max-length tokens (--limit: the first N rows); each row whole, no padding")
    p.add_argument("--model", default=None,
                   help="hub id or local path, e.g. a fine-tuned checkpoint (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--max-length", type=int, required=True, help="the grid size L (tokens, special tokens included); SST-2's longest training sentence has 66, "
                        "so 64 needs --longer skip or truncate")
    p.add_argument("--longer", choices=("error", "truncate", "skip"), default="error",
                   help="examples longer than --max-length: stop with an error, cut them, or leave them out "
                        "(the count is recorded)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model precision")
    p.add_argument("--sum-dtype", default="float64", choices=("float64", "float32"),
                   help="precision of the sums (layers x heads x L x L of them): float32 halves the memory")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--png", default=None, help="also draw the averages (layers x heads) to this PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_collect, command="ap collect", data_parallel=True)


def _add_mask(sub, formatter_class) -> None:
    p = sub.add_parser("mask", help="global masks (saved plans) that prune p%% of the allowed attention pairs",
                       formatter_class=formatter_class,
                       description="From `ap collect` averages, make one plan per --prune percentage: per layer "
                                   "(pooled over heads, as the 2021 AP code) or per head (the 2024 code), prune "
                                   "exactly round(p x allowed) entries of least average attention; a query's own "
                                   "position is never pruned; ties go by position. Prints the sparsity on the full "
                                   "grid, on the collected data (shorter examples are cropped) and optionally on "
                                   "other data.",
                       epilog=textwrap.dedent("""\
                           examples:
                             sparseattn ap mask out/ap/sst2.safetensors --prune 20 40 60 80 90 --random --out out/ap/sst2
                             sparseattn ap mask out/ap/sst2.safetensors --prune 50 --scope head --block-size 16 \\
                                 --blocks mass --measure-task SST-2 --measure-split dev --png --out out/ap/sst2-blocks
                           """))
    p.add_argument("stats", help="the file `ap collect` wrote")
    p.add_argument("--prune", type=float, nargs="+", required=True, metavar="P",
                   help="percentages of the allowed entries to prune, one plan each")
    p.add_argument("--scope", choices=("layer", "head"), default="layer",
                   help="threshold per layer pooled over heads, or per head")
    p.add_argument("--budget", choices=("grid", "data"), default="grid",
                   help="what P%% counts: the allowed entries of the grid (the papers' way), or the allowed pairs "
                        "of the collected examples (the sparsity they actually get, shorter ones cropped)")
    p.add_argument("--length", type=int, default=None,
                   help="mask grid size (default: the longest collected example); longer inputs are refused")
    p.add_argument("--block-size", type=int, default=None, help="report block density for tiles of this size")
    p.add_argument("--blocks", choices=("none", "any", "mass"), default="none",
                   help="block-level masks for kernels: keep every tile with a kept entry (any), or prune P%% of "
                        "tiles by their attention mass (mass)")
    p.add_argument("--random", action="store_true",
                   help="also write the random baseline: as many entries pruned per layer (per head with "
                        "--scope head), drawn at random")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--out", required=True, help="folder for the plan folders and summary.json")
    p.add_argument("--png", action="store_true", help="draw every mask (mask.png in its plan folder)")
    _add_data_args(p, "measure-", default_split="dev")
    p.add_argument("--glue-dir", default=None, help="GLUE folder for --measure-task; unset: $GLUE_DIR")
    p.set_defaults(func=cmd_mask, command="ap mask")


def _add_draw(sub, formatter_class) -> None:
    p = sub.add_parser("draw", help="draw collected averages as a PNG grid (layers x heads)",
                       formatter_class=formatter_class, description="Draw `ap collect` averages, log colour scale.",
                       epilog="example:\n  sparseattn ap draw out/ap/sst2.safetensors --out out/ap/sst2.png --layers 0-2")
    p.add_argument("stats")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--layers", default=None, help="e.g. 0-2,5 (default: all)")
    p.add_argument("--heads", default=None, help="e.g. 0-3 (default: all)")
    p.add_argument("--length", type=int, default=None, help="crop the grid to this many positions")
    p.set_defaults(func=cmd_draw, command="ap draw")
