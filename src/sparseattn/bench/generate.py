"""``sparseattn bench generate``: generation with a KV cache, dense against a 90%-sparse plan.

A Llama-shaped decoder with random weights in bf16 (``1b``: hidden 2048, 16 layers, 32 heads of 64, 8 key/value
heads, intermediate 8192, Llama-3.2-1B's shape with a 32k vocabulary; ``135m``: SmolLM-135M's shape, hidden 576,
30 layers, 9 heads, 3 key/value heads; ``tiny``: 2 layers of hidden 64, for a smoke test on the CPU), prompts of
random tokens, the forward passes ``generate()`` makes (``use_cache=True``, logits of the last position only):

- prefill, first call: the first forward pass at this length in a fresh model (what one ``generate()`` call pays:
  tile lists, autotuning, FlexAttention's compilation included);
- prefill: the median of repeated calls at the same length;
- decode: tokens per second (batch x steps / time) of greedy steps over the prompt's cache;
- peak memory of the prefill and the decode together.

Methods: ``dense`` (transformers' SDPA, whose backend PyTorch picks: cuDNN attention on Hopper), ``dense-flash`` (the
same kept off cuDNN: flash attention, or memory-efficient attention where a mask is passed; cuDNN plans for each new
key length, which a growing cache changes at every step), ``flex`` (``attn_implementation="flex_attention"``, transformers'
FlexAttention, dense causal), ``sparse`` (``sparsify(model, plan, backend="block")``: the block kernel for the
prefill, the decode kernel for the steps) and ``sparse-evict`` (the same with ``generation_cache``: keys no later
query attends are dropped). The plan is ``global_tokens(g) | neighbour(w)`` on every layer, w chosen for the
target sparsity of the causal pairs at each length. Ratios are over ``dense`` at the same length, batch and cache,
and over the fastest of the dense methods that ran there (``dense``, ``dense-flash``, ``flex``: "x best").
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import statistics
import time
from dataclasses import asdict, dataclass

import torch

MODELS = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=32000),
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256),
}
METHODS = ("dense", "dense-flash", "flex", "sparse", "sparse-evict")
DENSE_METHODS = ("dense", "dense-flash", "flex")


@dataclass
class GenerateResult:
    model: str
    length: int
    batch: int
    method: str
    plan: str | None
    cache: str = "dynamic"  # dynamic, static, or static+reduce-overhead (decode steps compiled, CUDA graphs)
    prefill_first_ms: float | None = None
    prefill_ms: float | None = None
    decode_tokens_per_s: float | None = None
    peak_gib: float | None = None
    cache_gib: float | None = None
    note: str = ""


def window_for(length: int, sparsity: float, sink: int = 1) -> int:
    """The window w of ``global_tokens(sink) | neighbour(w)``: the largest with at least ``sparsity`` of the causal
    pairs of ``length`` tokens removed (``bench.model.neighbour_window``, the search ``bench model`` uses too)."""
    from .model import neighbour_window

    return neighbour_window([length], causal=True, sparsity=sparsity, globals_=sink)


def plan_for(length: int, sparsity: float) -> str:
    """The sparse methods' plan at ``length`` tokens."""
    return f"all: global_tokens(1) | neighbour({window_for(length, sparsity)})"


def sdpa_backends(method: str):
    """The SDPA backends a method runs under: ``dense-flash`` keeps transformers' SDPA off cuDNN."""
    from ..backends.base import sdpa_without_cudnn

    return sdpa_without_cudnn() if method == "dense-flash" else contextlib.nullcontext()


def build_model(kind: str, max_len: int, method: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**MODELS[kind], max_position_embeddings=max_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.set_attn_implementation("flex_attention" if method == "flex" else "sdpa")
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model, cache) -> dict:
    # transformers renamed past_key_values to cache (5.2x)
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _compiled() -> tuple[int, int]:
    """(frames Dynamo compiled, graphs it made) so far in this process."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def _compile_note(before, warm, after) -> str:
    """What a compiled step's row must say: how many graphs its warm-up compiled (graph breaks cut a step into
    several, with eager code between them), and whether frames were compiled during the timed steps (a guard
    failing at every step: the time is of compiling, or of eager code once the recompile limit is hit)."""
    graphs, timed = warm[1] - before[1], after[0] - warm[0]
    note = f"{graphs} graph{'s' if graphs != 1 else ''} compiled"
    if timed:
        note += f"; {timed} frame{'s' if timed != 1 else ''} recompiled while timed: not a steady-state step"
    return note


def _triton_note(warm: int, after: int) -> str:
    """What a row must say when Triton compiled a decode kernel variant while the steps were timed (a new class of
    an argument, as a growing cache's length once was: the time is partly a compilation's)."""
    n = after - warm
    return f"{n} decode kernel variant{'s' if n != 1 else ''} compiled while timed: not a steady-state step" if n else ""


def _cache_label(cache_kind: str, reduce_overhead: bool) -> str:
    """The table's cache column: reduce-overhead compiles the steps of a static cache only."""
    return cache_kind + ("+reduce-overhead" if reduce_overhead and cache_kind == "static" else "")


def run_one(kind: str, length: int, batch: int, method: str, *, sparsity: float, steps: int, repeats: int,
            device, dtype, cache_kind: str = "dynamic", reduce_overhead: bool = False) -> GenerateResult:
    from ..backends import decode_kernel
    from ..backends.block import BlockSparseBackend
    from ..integrations.generation import generation_cache
    from ..integrations.hf import sparsify

    plan = None
    if method.startswith("sparse"):
        plan = plan_for(length, sparsity)
    res = GenerateResult(kind, length, batch, method, plan, cache=_cache_label(cache_kind, reduce_overhead))
    if method == "sparse-evict" and cache_kind != "dynamic":
        res.note = "the evicting cache is a dynamic one"
        return res
    max_len = length + steps + 4
    model = build_model(kind, max_len, method, device, dtype)
    if plan is not None:
        sparsify(model, plan, backend=BlockSparseBackend())
    ids = torch.randint(3, MODELS[kind]["vocab_size"], (batch, length), device=device)

    def new_cache():
        if method == "sparse-evict":
            return generation_cache(model)
        from transformers import DynamicCache, StaticCache

        return StaticCache(config=model.config, max_cache_len=max_len) if cache_kind == "static" else DynamicCache()

    def prefill():
        cache = new_cache()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **_cache_kwarg(model, cache))
        return out.logits[:, -1].argmax(-1, keepdim=True), cache

    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad(), sdpa_backends(method):
            _sync(device)
            t0 = time.perf_counter()
            nxt, cache = prefill()
            _sync(device)
            res.prefill_first_ms = (time.perf_counter() - t0) * 1e3
            times = []
            for _ in range(repeats):
                del cache
                _sync(device)
                t0 = time.perf_counter()
                nxt, cache = prefill()
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            res.prefill_ms = statistics.median(times)
            # as transformers runs a static cache's steps when it compiles them: CUDA graphs of the whole step, the
            # model's __call__ (its forward alone would skip sparseattn's forward hook, which reads each pass's inputs)
            step = model
            if reduce_overhead and cache_kind == "static":
                # Dynamo keys what it compiled on the code (Llama's forward), not on the model: without a reset a
                # method would replay an earlier method's graphs where their guards pass (dense-flash, dense's) and
                # recompile where they fail, sharing one recompile limit with every method before it, past which
                # it runs eagerly
                torch._dynamo.reset()
                step = torch.compile(model.__call__, mode="reduce-overhead", fullgraph=False)
            # untimed steps first (the decode kernel's compilation; torch.compile's and the graphs' recording)
            compiled_before = _compiled()
            for _ in range(3 if step is not model else 1):
                out = step(input_ids=nxt, use_cache=True, logits_to_keep=1, **_cache_kwarg(model, cache))
                nxt = out.logits[:, -1].argmax(-1, keepdim=True).clone()
            _sync(device)
            compiled_warm, variants_warm = _compiled(), decode_kernel.compiled_variants(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                out = step(input_ids=nxt, use_cache=True, logits_to_keep=1, **_cache_kwarg(model, cache))
                nxt = out.logits[:, -1].argmax(-1, keepdim=True).clone()
            _sync(device)
            res.decode_tokens_per_s = batch * steps / (time.perf_counter() - t0)
            notes = [_compile_note(compiled_before, compiled_warm, _compiled())] if step is not model else []
            notes.append(_triton_note(variants_warm, decode_kernel.compiled_variants(device)))
            res.note = "; ".join(n for n in notes if n)
            res.cache_gib = sum(t.numel() * t.element_size() for layer in cache.layers
                                for t in (layer.keys, layer.values) if t is not None) / 2**30
        if device.type == "cuda":
            res.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.OutOfMemoryError as e:
        res.note = "out of memory: " + str(e).split("\n")[0][:120]
    return res


def run(models, lengths, batches, methods, *, sparsity: float = 0.9, steps: int = 32, repeats: int = 3,
        device=None, dtype=None, caches=("dynamic",), reduce_overhead: bool = False,
        progress=print) -> list[GenerateResult]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    results = []
    for kind in models:
        for L in lengths:
            for B in batches:
                for cache_kind in caches:
                    for method in methods:
                        try:
                            r = run_one(kind, L, B, method, sparsity=sparsity, steps=steps, repeats=repeats,
                                        device=device, dtype=dtype, cache_kind=cache_kind,
                                        reduce_overhead=reduce_overhead)
                        except Exception as e:  # noqa: BLE001 - one method failing (a compiler's error) must not
                            # cost the other cells of a device call; the table says which failed and why
                            r = GenerateResult(kind, L, B, method, None, cache=_cache_label(cache_kind, reduce_overhead),
                                               note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                                               if str(e) else f"failed: {type(e).__name__}")
                        results.append(r)
                        gc.collect()  # the model of the last run is gone: return its memory before the next
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        progress(format_table([r]).splitlines()[-1])
    return results


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _fmt(x, spec):
    return "-".rjust(int(spec.split(".")[0])) if x is None else format(x, spec)


def _best_dense(results: list[GenerateResult], attr: str, pick) -> dict:
    """Per (model, length, batch, cache): ``pick`` (min for times, max for rates) of ``attr`` over the dense methods
    that measured it."""
    best: dict = {}
    for r in results:
        value = getattr(r, attr)
        if r.method in DENSE_METHODS and value is not None:
            k = (r.model, r.length, r.batch, r.cache)
            best[k] = value if k not in best else pick(best[k], value)
    return best


def format_table(results: list[GenerateResult]) -> str:
    """One row per (model, length, batch, cache, method); ratios over ``dense`` ("x dense") and over the fastest dense
    method ("x best") at the same (model, length, batch, cache; the evicting cache against the dynamic one): prefill
    speed-ups (dense time / time) for the first and the repeated call, decode tokens/s over dense's."""
    dense = {(r.model, r.length, r.batch, r.cache): r for r in results if r.method == "dense"}
    best_first, best_prefill = _best_dense(results, "prefill_first_ms", min), _best_dense(results, "prefill_ms", min)
    best_decode = _best_dense(results, "decode_tokens_per_s", max)
    head = (f"{'model':<6} {'length':>7} {'batch':>5} {'cache':<22} {'method':<13} {'prefill 1st ms':>14} {'x dense':>7} "
            f"{'x best':>6} {'prefill ms':>10} {'x dense':>7} {'x best':>6} {'decode tok/s':>12} {'x dense':>7} "
            f"{'x best':>6} {'peak GiB':>8} {'cache GiB':>9}  note")
    lines = [head]
    for r in results:
        k = (r.model, r.length, r.batch, r.cache if r.method != "sparse-evict" else "dynamic")
        d = dense.get(k)
        first = _ratio(d.prefill_first_ms, r.prefill_first_ms) if d else None
        rep = _ratio(d.prefill_ms, r.prefill_ms) if d else None
        dec = _ratio(r.decode_tokens_per_s, d.decode_tokens_per_s) if d else None
        lines.append(f"{r.model:<6} {r.length:>7} {r.batch:>5} {r.cache:<22} {r.method:<13} "
                     f"{_fmt(r.prefill_first_ms, '14.1f')} {_fmt(first, '7.2f')} "
                     f"{_fmt(_ratio(best_first.get(k), r.prefill_first_ms), '6.2f')} "
                     f"{_fmt(r.prefill_ms, '10.1f')} {_fmt(rep, '7.2f')} "
                     f"{_fmt(_ratio(best_prefill.get(k), r.prefill_ms), '6.2f')} "
                     f"{_fmt(r.decode_tokens_per_s, '12.1f')} {_fmt(dec, '7.2f')} "
                     f"{_fmt(_ratio(r.decode_tokens_per_s, best_decode.get(k)), '6.2f')} {_fmt(r.peak_gib, '8.2f')} "
                     f"{_fmt(r.cache_gib, '9.3f')}  {r.note}")
    return "\n".join(lines)


def results_to_json(results: list[GenerateResult], meta: dict) -> dict:
    return {"meta": meta, "results": [asdict(r) for r in results]}
