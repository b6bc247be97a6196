"""``sparseattn perplexity`` and ``sparseattn train-lm``: causal language models from the command line."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import torch

from ..integrations.hf import sparsify
from ..models import load_model, load_tokenizer, resolve_model
from ..plans.io import as_plan
from ..training.loop import autocast_for, resolve_device, resolve_precision
from .corpus import encode_text, read_text
from .perplexity import check_context, check_plan_for_lm, check_plan_length, model_positions, perplexity
from .train import LMConfig, train_lm

_D = LMConfig.__dataclass_fields__


def cmd_perplexity(args) -> int:
    texts = [read_text(f) for f in args.text]  # empty files stop here, before a model is loaded
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    plan = as_plan(args.plan)
    check_plan_for_lm(plan)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, task="causal-lm", dtype=torch.float32)
    context = args.context or model_positions(model)
    if context is None:
        raise ValueError(f"{args.model} does not say how many positions it has; give --context")
    check_context(model, context, what=args.model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    check_plan_length(plan, context, cfg.num_hidden_layers, cfg.num_attention_heads, what=f"plan {args.plan}")
    if plan.rules:
        sparsify(model, plan, backend=args.backend)
    model.to(device)
    docs = [encode_text(tok, t, what=str(f)) for t, f in zip(texts, args.text)]
    r = perplexity(model, docs, context=context, stride=args.stride, plan=plan, batch_size=args.batch_size,
                   autocast=autocast_for(precision, device), names=[str(f) for f in args.text])
    report = r.pop("sparsity_report")
    r.update(model=resolve_model(args.model), device=str(device), precision=precision,
             sparsity_per_layer=report.per_layer.tolist(), sparsity_applied=report.applied_sparsity)
    print(f"{r['model']} | plan {r['plan']} | context {context}, stride {r['stride']} | {device} {precision}")
    for d in r["documents"]:
        print(f"  {d['name']}: perplexity {d['perplexity']:.4f} over {d['tokens']} tokens")
    print(f"perplexity {r['perplexity']:.4f} (loss {r['loss']:.4f} nats) over {r['tokens']} tokens in {r['windows']} "
          f"windows; sparsity {r['sparsity']:.1%}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_train_lm(args) -> int:
    opts = {k: getattr(args, k) for k in ("task", "plan", "model", "seed", "epochs", "lr", "batch_size", "warmup",
                                          "weight_decay", "max_grad_norm", "limit_train", "limit_eval", "eval_split",
                                          "backend", "precision", "layers", "hidden", "heads", "intermediate",
                                          "vocab_size", "tokenizer")}
    cfg = LMConfig(max_length=args.context, **opts)
    out = Path(args.out) if args.out else None
    r = train_lm(cfg, glue_dir=args.glue_dir, out_dir=out, device=args.device, progress=not args.no_progress,
                 save_model=args.save_model)
    if int(os.environ.get("RANK", "0")) != 0 and "distributed" in r:  # under torchrun rank 0 alone reports
        return 0
    d, t = r["data"], r["timing"]
    where = f" x {r['distributed']['world_size']} processes" if "distributed" in r else ""
    print(f"\n{r['task']} | {r['plan']} | seed {cfg.seed} on {r['device']}{where}: {r['model']}, "
          f"{r['parameters']:,} parameters")
    print(f"  {d['eval_split']} perplexity {r['metrics']['perplexity']:.3f} over {d['eval_rows']} rows of "
          f"{d['context']} tokens; sparsity {r['sparsity']['overall']:.1%}")
    print(f"  {d['train_rows']} train rows x {cfg.epochs} epoch(s) in {t['train_seconds']:.1f} s "
          f"({t['train_tokens_per_second']:.0f} tokens/s)")
    if out:
        print(f"  results: {out / 'results.json'}" + (f"; model: {out / 'model'}" if args.save_model else ""))
    return 0


def register(subparsers, formatter_class) -> None:
    p = subparsers.add_parser(
        "perplexity", help="sliding-window perplexity of a causal LM under a plan", formatter_class=formatter_class,
        description="Perplexity of a causal language model (hub id or folder) on text files, under any plan: "
                    "windows of --context tokens every --stride tokens, each token scored once (with the windows' "
                    "earlier tokens as context), counted exactly; each file is one document. Prints the plan's "
                    "sparsity on the windows beside it.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn perplexity out/lm/model --text ../shared/data/books/valid/84.txt --context 1024 --stride 512
              sparseattn perplexity out/lm/model --text book.txt --plan "all: global_tokens(4) | neighbour(64)" \\
                  --context 1024 --json out/ppl.json
            """))
    p.add_argument("model", help="hub id or local folder of a causal LM (with its tokenizer)")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text files, one document each")
    p.add_argument("--plan", default="dense", help="plan spec or a saved plan's folder")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's positions)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --context)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--backend", default="reference", help="attention backend for sparse plans")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=cmd_perplexity, command="perplexity")

    p = subparsers.add_parser(
        "train-lm", help="train a causal LM under a plan (from scratch or a checkpoint)", formatter_class=formatter_class,
        description="Train a causal language model on a text corpus (a folder with train/ valid/ test/ .txt files) "
                    "under a plan: from scratch, a Llama of --layers x --hidden over a BPE tokenizer trained on the "
                    "train split (cached), or from --model. Rows of --context tokens; AdamW, warmup and linear "
                    "decay, bf16 on CUDA; validation perplexity every epoch; results.json like finetune's.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn train-lm --task books --context 1024 --epochs 2 --out out/lm/dense --save-model
              sparseattn train-lm --task books --plan "all: global_tokens(4) | neighbour(128)" --out out/lm/sw
              sparseattn train-lm --task ../shared/data/books --layers 2 --hidden 64 --heads 2 --context 128 \\
                  --limit-train 64 --limit-eval 16 --epochs 1 --out out/lm/tiny
            """))
    p.add_argument("--task", default=_D["task"].default,
                   help="the corpus: a folder, or a name found under $SPARSEATTN_DATA, beside $GLUE_DIR or in .bundle/")
    p.add_argument("--plan", default="dense", help="plan spec or a saved plan's folder")
    p.add_argument("--model", default=None, help="start from this checkpoint (hub id or folder); default: a new Llama")
    p.add_argument("--context", type=int, default=_D["max_length"].default, help="tokens per row")
    int_help = {"seed": "random seed (initialisation, data order)", "epochs": "passes over the training rows",
                "batch_size": "rows per optimizer step (per process under torchrun)", "layers": "decoder layers of a new model",
                "hidden": "hidden size of a new model", "heads": "attention heads of a new model",
                "vocab_size": "BPE vocabulary of the trained tokenizer"}
    for name, text in int_help.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=_D[name].default, help=text)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 8/3 x hidden, to 64)")
    float_help = {"lr": "peak learning rate (AdamW)", "warmup": "share of the steps spent warming up",
                  "weight_decay": "AdamW weight decay", "max_grad_norm": "gradient clipping norm"}
    for name, text in float_help.items():
        p.add_argument("--" + name.replace("_", "-"), type=float, default=_D[name].default, help=text)
    p.add_argument("--limit-train", type=int, default=None, help="a fixed random subset of this many train rows")
    p.add_argument("--limit-eval", type=int, default=None, help="likewise for the evaluation rows")
    p.add_argument("--eval-split", default=_D["eval_split"].default, choices=["valid", "test", "train"],
                   help="the corpus split whose perplexity is reported each epoch")
    p.add_argument("--tokenizer", default=None, help="a tokenizer (hub id or folder) instead of the trained BPE")
    p.add_argument("--backend", default="reference", help="attention backend for sparse plans")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--glue-dir", default=None, help="GLUE folder; a corpus name is also looked for beside it")
    p.add_argument("--out", default=None, help="folder for results.json (and model/ with --save-model)")
    p.add_argument("--save-model", action="store_true", help="save the model, its tokenizer and the plan under --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_lm, command="train-lm", data_parallel=True)
