"""``sparseattn bench attention``, ``sparseattn bench model`` and ``sparseattn bench generate``."""

from __future__ import annotations

import argparse
import json
import os
import textwrap


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            out.append(int(part[:-1] if part.endswith("k") else part) * mult)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers (4096 or 4k), got {part!r}") from None
    return out


def _fractions(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            v = float(part.strip().rstrip("%"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated sparsities (0.9 or 90), got {part!r}") from None
        v = v / 100 if v > 1 else v
        if not 0 <= v < 1:
            raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1) (or a percentage), got {part!r}")
        out.append(v)
    return out


def _fraction(text: str) -> float:
    values = _fractions(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one sparsity (0.9 or 90), got {text!r}")
    return values[0]


def _names(allowed):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; expected some of {', '.join(allowed)}")
        return names
    return parse


def _need_cuda():
    import torch

    if not torch.cuda.is_available():
        raise OSError("the benchmarks time CUDA kernels and need a CUDA GPU; none is visible")


def _write_json(path: str, data: dict, *, quiet: bool = False) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    if not quiet:
        print(f"wrote {path}")


def _kernel_settings(args) -> dict | None:
    """Apply --compile-mode to the block kernel; return --kernel-options as a dict (or None)."""
    if args.compile_mode:
        from ..backends.flex_kernel import set_compile_mode

        set_compile_mode(args.compile_mode)
    return json.loads(args.kernel_options) if args.kernel_options else None


def cmd_attention(args) -> int:
    import torch

    from .attention import device_meta, format_table, results_to_json, run_config

    _need_cuda()
    kernel_options = _kernel_settings(args)
    results = []
    meta = device_meta()
    meta.update(command="sparseattn bench attention", heads=args.heads, tokens=args.tokens, block_size=args.block_size,
                dtype="bfloat16", compile_mode=args.compile_mode, kernel_options=kernel_options)
    print(f"device: {meta.get('device')}, torch {meta['torch']}, triton {meta.get('triton')}")
    for D in args.head_dims:
        for L in args.lengths:
            for layout in args.layouts:
                for s in args.sparsity:
                    rs = run_config(layout, L, s, D, heads=args.heads, tokens=args.tokens,
                                    block_size=args.block_size, methods=args.methods, fwd_only=args.fwd_only,
                                    kernel_options=kernel_options)
                    results.extend(rs)
                    torch.cuda.empty_cache()  # the config's inputs and masks are gone: return their memory
                    print(format_table(rs).splitlines()[-1], flush=True)
                    if args.json:  # keep what is done, whatever happens next
                        _write_json(args.json, results_to_json(results, meta), quiet=True)
    print()
    print(format_table(results))
    _print_tuned(next((r.extra["tuned_configs"] for r in reversed(results) if "tuned_configs" in r.extra), None))
    if args.json:
        _write_json(args.json, results_to_json(results, meta))
    return 0


def _print_tuned(tuned: dict | None) -> None:
    """The Triton kernel's autotuned configurations, if it ran (key: head size, length, precision, dtypes)."""
    if tuned:
        print("\nTriton kernel configurations chosen by the autotuner:")
        for name, by_key in tuned.items():
            for key, config in by_key.items():
                print(f"  {name} {key.split(', ')[:2]}: {config}")


def cmd_model(args) -> int:
    from .attention import device_meta
    from .model import format_table, results_to_json, run_models

    _need_cuda()
    kernel_options = _kernel_settings(args)
    meta = device_meta()
    modes = list(args.modes) + (["graph"] if args.graphs and "graph" not in args.modes else [])
    meta.update(command="sparseattn bench model", tokens=args.tokens, compile_mode=args.compile_mode,
                kernel_options=kernel_options, torch_compile=args.torch_compile, modes=modes, batches=args.batches,
                decoder_cache=args.decoder_cache, backward=args.backward,
                # the tile asked for; "auto": the backend's choice by head size, each result's own block_size
                block_size=args.block_size or "auto")

    def keep(so_far):  # what is done, whatever happens next
        if args.json:
            _write_json(args.json, results_to_json(so_far, meta), quiet=True)

    results = run_models([(kind, L) for kind in args.models for L in args.lengths], tokens=args.tokens,
                         steps=args.steps, decoder_layers=args.decoder_layers, kernel_options=kernel_options,
                         kernels=args.kernels, modes=modes, batches=args.batches, compile_model=args.torch_compile,
                         decoder_cache=args.decoder_cache, block_size=args.block_size, backward=args.backward,
                         done=keep)
    print()
    print(format_table(results))
    if "triton" in args.kernels:
        from ..backends.triton_kernel import autotuning, tuned_configs

        _print_tuned(tuned_configs() if autotuning() else None)
    if args.json:
        _write_json(args.json, results_to_json(results, meta))
    return 0


def cmd_generate(args) -> int:
    import torch

    from .attention import device_meta
    from .generate import format_table, results_to_json, run

    if args.device == "cuda":
        _need_cuda()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and any(m != "tiny" for m in args.models):
        raise OSError(f"the {', '.join(m for m in args.models if m != 'tiny')} model(s) are timed on a CUDA GPU; "
                      "on the CPU run --models tiny (a smoke test)")
    meta = device_meta() if device.type == "cuda" else {"device": "cpu", "torch": torch.__version__}
    meta.update(command="sparseattn bench generate", sparsity=args.sparsity, steps=args.steps, repeats=args.repeats,
                caches=args.caches, reduce_overhead=args.reduce_overhead)
    results = run(args.models, args.lengths, args.batches, args.methods, sparsity=args.sparsity, steps=args.steps,
                  repeats=args.repeats, device=device, caches=args.caches, reduce_overhead=args.reduce_overhead)
    print()
    print(format_table(results))
    if args.json:
        _write_json(args.json, results_to_json(results, meta))
    return 0


def register(subparsers, formatter_class) -> None:
    from .attention import LAYOUTS, METHODS

    bench = subparsers.add_parser(
        "bench", help="time sparse attention on the GPU: kernels and whole models", formatter_class=formatter_class,
        description="Benchmarks of the block backend against dense attention (CUDA GPU only). Each prints a table "
                    "of speed-ups over named dense baselines; --json keeps every result.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn bench attention --lengths 4k,8k,16k --json out/bench.json   # one attention call
              sparseattn bench model --lengths 4k,8k,16k --graphs                     # whole training steps
              sparseattn bench attention --help                                      # every option
            """))
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])

    p = sub.add_parser(
        "attention", help="attention kernels: dense, SDPA with a mask, FlexAttention, the block backend",
        formatter_class=formatter_class,
        description="Forward and forward+backward median time and peak memory of one attention call (bf16) for "
                    "sliding-window, BigBird (random blocks) and AP-like per-head layouts made at a target block "
                    "sparsity, as speed-ups over dense SDPA and as fractions of the ideal speed-up "
                    "(1 / block density). Configs that run out of memory are reported, not fatal.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn bench attention --lengths 8k,16k --sparsity 90 --head-dims 64
              sparseattn bench attention --lengths 512,1k,4k,8k,16k,32k --sparsity 50,78,90,95 --json out/bench.json
            """))
    p.add_argument("--lengths", type=_ints, default="512,1k,4k,8k,16k,32k", help="sequence lengths (4096 or 4k)")
    p.add_argument("--sparsity", type=_fractions, default="50,78,90,95",
                   help="target block sparsities, in percent (or as fractions: 0.9)")
    p.add_argument("--layouts", type=_names(LAYOUTS), default=",".join(LAYOUTS), help="sliding, bigbird, ap")
    p.add_argument("--head-dims", type=_ints, default="64,128", help="head sizes")
    p.add_argument("--methods", type=_names(METHODS), default=",".join(METHODS), help="which implementations")
    p.add_argument("--heads", type=int, default=12, help="attention heads")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens / length)")
    p.add_argument("--block-size", type=int, default=128, help="tile size of the block layouts")
    p.add_argument("--fwd-only", action="store_true", help="time the forward pass only")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for FlexAttention, e.g. max-autotune-no-cudagraphs (slow first calls)")
    p.add_argument("--kernel-options", default=None,
                   help='FlexAttention kernel options for the flex_full, flex_mask and block (FlexAttention) methods, '
                        'as JSON, e.g. \'{"USE_TMA": true}\' or \'{"BLOCK_M": 64, "BLOCK_N": 64}\' where a mask_mod '
                        'asks for more shared memory than the default tiles allow; the triton method autotunes its '
                        'own (SPARSEATTN_TRITON_AUTOTUNE=0: fixed)')
    p.add_argument("--json", default=None, help="write all results here")
    p.set_defaults(func=cmd_attention)

    from ..backends.triton_kernel import BACKWARDS
    from .model import BATCHES, MODES

    p = sub.add_parser(
        "model", help="whole models: encoder training step and decoder forward, dense vs a 90%%-sparse plan",
        formatter_class=formatter_class,
        description="Real tokens per second, peak memory and host time per attention call of a MiniLM-shaped "
                    "encoder training step and a Llama-style decoder forward pass, dense SDPA against a "
                    "90%-sparse plan on the block backend, in the modes users run them (eager, "
                    "torch.compile(model), torch.compile(model, mode='reduce-overhead'), a CUDA graph captured by "
                    "hand) on unpadded, padded, packed and padding-free batches. Speed-ups are over the fastest "
                    "dense step of the same batch kind, whatever its mode; dense runs packed documents one per "
                    "padded row.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn bench model --models encoder --lengths 16k --modes eager,compile,reduce-overhead
              sparseattn bench model --models encoder,decoder --lengths 4k,16k --batches unpadded,padded,packed
            """))
    p.add_argument("--lengths", type=_ints, default=_ints("4k,8k,16k"), help="row lengths (4096 or 4k)")
    p.add_argument("--models", type=_names(("encoder", "decoder")), default=["encoder", "decoder"],
                   help="encoder (a training step), decoder (a forward pass), or both")
    p.add_argument("--modes", type=_names(MODES), default=["eager"],
                   help=f"how each step runs: {', '.join(MODES)} (graph: captured by hand)")
    p.add_argument("--batches", type=_names(BATCHES), default=["unpadded"],
                   help=f"batch kinds: {', '.join(BATCHES)} (padded: lengths in [L/2, L]; packed: documents of "
                        "512-4096 tokens filling each row; padding-free: the padded batch unpadded by sa.unpad)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens / length)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--decoder-layers", type=int, default=4, help="layers of the decoder")
    p.add_argument("--decoder-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="call the decoder with its default cache (use_cache=True), as model(ids) runs it, or without "
                        "(--no-decoder-cache: use_cache=False, where transformers looks for packed rows in the "
                        "positions and, under torch.compile, gives dense SDPA an L x L mask); dense and sparse alike")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the block kernel, e.g. max-autotune-no-cudagraphs (slow first calls)")
    p.add_argument("--kernel-options", default=None, help="FlexAttention kernel options for the flex kernel, as JSON")
    p.add_argument("--kernels", type=_names(("flex", "triton")), default=["triton"],
                   help="the block backend's kernels to run the sparse plan with (flex: FlexAttention; triton: "
                        "sparseattn's Triton kernel)")
    p.add_argument("--block-size", type=int, default=None,
                   help="the block backend's tile size (default: its choice by head size, 64 up to 32 dimensions, "
                        "else 128; 64: finer layouts, fewer pairs computed in partial tiles)")
    p.add_argument("--backward", choices=BACKWARDS, default="auto",
                   help="the Triton kernel's backward pass: auto (two passes, whole lists under deterministic "
                        "algorithms), two-pass, or fused (dQ added atomically by the dK/dV pass)")
    p.add_argument("--graphs", action="store_true", help="add the graph mode (the same as --modes ...,graph)")
    p.add_argument("--torch-compile", action="store_true",
                   help="torch.compile (Inductor, default mode) every submodule outside the attention modules, "
                        "dense and sparse alike: the layers' other work runs fused, attention as it is")
    p.add_argument("--json", default=None, help="write all results here (kept after each configuration)")
    p.set_defaults(func=cmd_model)

    from .generate import METHODS as GEN_METHODS, MODELS as GEN_MODELS

    p = sub.add_parser(
        "generate", help="generation with a KV cache: prefill and decode, dense vs FlexAttention vs a sparse plan",
        formatter_class=formatter_class,
        description="A Llama-shaped decoder with random weights (1b: hidden 2048, 16 layers, 32 heads, 8 key/value "
                    "heads; 135m: SmolLM-135M's shape; tiny: a CPU smoke test), bf16 on the GPU: prefill time (the "
                    "first call at a new length, and repeated), decode tokens/s and peak memory, for dense SDPA, "
                    "FlexAttention, and global_tokens(1) | neighbour(w) at the target sparsity on the block backend "
                    "(sparse; sparse-evict adds the cache that drops keys no query attends). Ratios over dense.",
        epilog=textwrap.dedent("""\
            examples:
              sparseattn bench generate --models 1b --lengths 4k,16k,32k,64k --batches 1,16 --json out/gen.json
              sparseattn bench generate --models 1b --lengths 32k --batches 16 --caches static --reduce-overhead
              sparseattn bench generate --models tiny --lengths 64,128 --batches 1,2 --steps 4   # CPU smoke test
            """))
    p.add_argument("--models", type=_names(tuple(GEN_MODELS)), default=["1b"], help="1b, 135m or tiny")
    p.add_argument("--lengths", type=_ints, default=_ints("4k,16k,32k,64k"), help="prompt lengths (4096 or 4k)")
    p.add_argument("--batches", type=_ints, default=_ints("1,16"), help="batch sizes")
    p.add_argument("--methods", type=_names(GEN_METHODS), default=list(GEN_METHODS),
                   help=f"which to run, of {', '.join(GEN_METHODS)}")
    p.add_argument("--sparsity", type=_fraction, default=0.9,
                   help="target sparsity of the plan's causal pairs, in percent or as a fraction")
    p.add_argument("--caches", type=_names(("dynamic", "static")), default=["dynamic"],
                   help="transformers' caches to decode with: dynamic, static (sparse-evict runs its own, dynamic)")
    p.add_argument("--reduce-overhead", action="store_true",
                   help="compile the static cache's decoding steps with torch.compile(mode='reduce-overhead') (CUDA "
                        "graphs), dense and sparse alike, as transformers does for static caches")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--repeats", type=int, default=3, help="repeated prefill calls (their median is reported)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="where to run (the GPU where there is one)")
    p.add_argument("--json", default=None, help="write all results here")
    p.set_defaults(func=cmd_generate)
