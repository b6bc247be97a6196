"""``sparseattn bench model``: whole models, dense against a 90%-sparse plan on the block backend.

- encoder: a BERT-style encoder with all-MiniLM-L6-v2's shape (6 layers, 12 heads of 32, hidden 384,
  intermediate 1536), position embeddings extended to the longest length, random weights; one training
  step (forward, backward, AdamW) in bf16 autocast on a sequence-classification loss;
- decoder: a Llama-style decoder (hidden 2048, 32 heads of 64, 8 key/value heads, intermediate 5632,
  TinyLlama-1.1B's shape with fewer layers), random weights, bf16, forward only.

Each step runs in the modes users run: ``eager``; ``compile`` (``torch.compile(model)``); ``reduce-overhead``
(``torch.compile(model, mode="reduce-overhead")``, CUDA graphs recorded by torch.compile); and ``graph``, the
whole step (forward, backward, optimizer) captured by hand as one CUDA graph. On ``unpadded`` batches, ``padded``
ones (real lengths uniform in [L/2, L]), ``packed`` rows (documents of 512-4096 tokens, with position_ids and
cu_seq_lens_q as transformers' flattening collator makes them) and ``padding-free`` ones (the padded batch's real
tokens as one packed row, ``sa.unpad``); dense attention cannot keep packed documents apart, so dense runs the same
documents one per row, padded to the longest (no padding, and no mask, for a single row). Speed-ups are real tokens per
second over the fastest dense step of the same batch kind, whatever its mode. A step's time (``ms/step``) is that of
steps queued back to back, as a training loop runs them when it does not wait for each step's loss; ``synced`` is a
step waited for alone, which adds the host's time to the step's first kernel. Eager sparse steps also report
the host time per attention call (the backend's Python and launches) and, for the Triton kernel, per backward
call (its launches; ``host us f/b``).

With ``compile_model``, every largest submodule that holds no attention module is compiled with
``compile_outside_attention``, for dense and sparse alike.

Every step holds the same number of positions (``tokens``; batch = tokens / length). Dense runs transformers' SDPA attention without a mask (flash attention or cuDNN, causal
for the decoder; through ``use_dense_sdpa``, so it stays mask-free under graph capture); sparse runs ``sparsify(model, plan, backend=BlockSparseBackend())``. The plan is
``neighbour(w) | global_tokens(g)`` on every layer with w chosen for 90% sparsity of the pairs the batch allows
(its real tokens, within each document), measured on that batch with sparseattn.sparsity and reported with its
block density: a padded or packed batch gets a narrower window than an unpadded row of L.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from ..backends.block import BlockSparseBackend, default_block_size
from ..integrations.hf import compile_outside_attention, head_dim, sparsify, use_dense_sdpa
from ..layout import TokenLayout
from ..plans.plan import Plan
from ..sparsity import measure_plan
from ..text.padding_free import unpad


@dataclass
class ModelResult:
    model: str
    length: int
    batch_size: int
    attention: str  # "dense" or the plan
    sparsity: float | None
    block_density: float | None
    step_ms: float | None  # queued steps (``_time_steps``): what real tokens/s and the speed-ups are taken from
    tokens_per_s: float | None
    peak_gib: float | None
    speedup: float | None = None
    note: str = ""
    kernel: str | None = None  # the block backend's kernel (flex or triton); None for dense
    mode: str = "eager"  # eager, compile (torch.compile(model)), reduce-overhead, or graph (captured by hand)
    compiled: bool = False  # the submodules outside attention ran compiled (dense and sparse alike)
    batch: str = "unpadded"  # unpadded, padded, packed or padding-free (see make_batch)
    host_us: float | None = None  # host time per attention call, eager sparse steps
    host_bwd_us: float | None = None  # host time per backward call of the Triton kernel (encoder steps)
    baseline: str | None = None  # what the speed-up is over: the fastest dense step of the same batch kind
    speedup_any: float | None = None  # over the fastest dense step of any batch kind (real tokens/s)
    synced_ms: float | None = None  # each step waited for: its latency, host time to its first kernel included
    block_size: int | None = None  # the block backend's tile (sparse runs)
    gc_ms: float | None = None  # Python's garbage collector per queued step (included in step_ms)
    full_gcs: float | None = None  # its full collections per queued step
    synced_mean_ms: float | None = None  # the mean of the steps waited for (synced_ms is their median)


def encoder(max_len: int):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=max_len, attention_probs_dropout_prob=0.0,
                     hidden_dropout_prob=0.1, num_labels=2)
    model = BertForSequenceClassification(cfg)
    use_dense_sdpa(model)
    return model


def decoder(max_len: int, layers: int = 4):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=5632, max_position_embeddings=max_len)
    model = LlamaModel(cfg)
    use_dense_sdpa(model)
    return model


def _kept(n: int, w: int, causal: bool, globals_: int) -> int:
    """Pairs ``neighbour(w) | global_tokens(g)`` keeps in one sequence of n tokens (its first g tokens global)."""
    w = min(w, n - 1)
    g = min(globals_, n)
    if causal:
        band = n * (w + 1) - w * (w + 1) // 2
        cols = sum(max(0, n - c - w - 1) for c in range(g))  # later queries reaching a global key past the window
        rows = sum(max(0, i - w) for i in range(g))  # a global query's earlier keys past the window
        both = sum(1 for i in range(g) for j in range(i) if i - j > w)
    else:
        band = n * (2 * w + 1) - w * (w + 1)
        cols = rows = sum(n - (min(n - 1, i + w) - max(0, i - w) + 1) for i in range(g))
        both = sum(1 for i in range(g) for j in range(g) if abs(i - j) > w)
    return band + cols + rows - both


def sparse_plan(length: int, *, causal: bool, sparsity: float = 0.9, globals_: int = 1,
                sequences: list[int] | None = None) -> Plan:
    """neighbour(w) | global_tokens(g) with the largest w (at least 1) whose sparsity over ``sequences`` (the real
    lengths of the batch's sequences and documents, each alone; default one sequence of ``length``) is at least the
    target: a plan 90% sparse on the pairs the batch allows, whatever its padding or packing."""
    w = neighbour_window(sequences or [length], causal=causal, sparsity=sparsity, globals_=globals_)
    return Plan.parse(f"all: neighbour({w}) | global_tokens({globals_})")


def neighbour_window(sequences: list[int], *, causal: bool, sparsity: float = 0.9, globals_: int = 1) -> int:
    """The largest w (at least 1) for which ``neighbour(w) | global_tokens(g)`` is at least ``sparsity`` sparse over
    sequences of these real lengths, each alone: the one window search of the benchmarks (``bench model``'s plans
    and ``bench generate``'s)."""
    allowed = sum(n * (n + 1) // 2 if causal else n * n for n in sequences)

    def sparse_enough(w: int) -> bool:  # sparsity falls as w grows
        return 1 - sum(_kept(n, w, causal, globals_) for n in sequences) / allowed >= sparsity

    lo, hi = 1, max(sequences)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sparse_enough(mid) else (lo, mid - 1)
    return lo


def batch_layout(batch: dict, *, causal: bool, device=None) -> TokenLayout:
    """The layout of a ``make_batch`` batch's sequences as the model sees them (padding, packed documents), for
    measuring a plan's sparsity and block density on the batch it runs on."""
    ids = batch["inputs"]["input_ids"]
    rows, width = ids.shape
    real = torch.zeros(rows, width, dtype=torch.bool)
    doc = torch.zeros(rows, width, dtype=torch.long)
    for i, (r, s, n) in enumerate(batch["documents"]):
        real[r, s:s + n] = True
        doc[r, s:] = i  # padding after a row's last document counts as that document's (not real: never allowed)
    packed = any(sum(1 for d in batch["documents"] if d[0] == r) > 1 for r in range(rows))
    return TokenLayout(real=real.to(device), causal=causal, document_ids=doc.to(device) if packed else None)


def _measure(plan: Plan, layout: TokenLayout, heads: int, block_size: int = 128) -> tuple[float, float]:
    rep = measure_plan(plan.resolve(1, heads)[:1], layout, block_size=block_size)
    return rep.overall, rep.block_density


def _fresh_peak() -> None:
    """Collect what earlier configs left (a sparsified model's hooks form reference cycles that only the
    garbage collector frees) and start counting the peak afresh."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


class _Timing(NamedTuple):
    queued_ms: float  # per step, steps queued back to back
    synced_ms: float  # per step, each waited for (the median)
    peak_gib: float
    gc_ms: float  # per queued step (of the median block): Python's garbage collector's share
    full_gcs: float  # per queued step (of the median block): the collector's full (generation 2) collections
    synced_mean_ms: float  # the mean of the steps waited for: above their median where some steps pause


class _CollectorClock:
    """The time Python's garbage collector takes while this is entered (``gc.callbacks``), and how many of its
    collections were full ones: a pause every few steps counts in a block of queued steps' mean, not in the median of
    single steps."""

    def __init__(self):
        self.seconds, self.full, self._start = 0.0, 0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.full += info["generation"] == 2
            self._start = None

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def _time_steps(step, warmup: int, steps: int, *, reset_peak: bool = True, blocks: int = 3) -> _Timing:
    """Queued and synced ms per step of ``step``, its peak memory, and the garbage collector's share of the queued
    steps. Queued: ``steps`` steps launched back to back with one wait at the end, as a training loop that does not
    read its loss every step runs them (the host prepares the next step while the GPU runs this one); the median of
    ``blocks`` such blocks, per step. Synced: the median of ``steps`` steps each waited for, which adds the host's
    time to the step's first kernel (its latency). Peak: memory allocated during the timed steps, which includes the
    model, its optimizer state and the inputs; reset_peak=False keeps the peak counted so far: a graph's replays
    reuse the memory its capture allocated, so its peak is the capture's."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()  # the first step waited for waits for its own work only
    if reset_peak:
        _fresh_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    queued = []  # (seconds, the collector's seconds, its full collections) of each block
    for _ in range(blocks):
        with _CollectorClock() as collector:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            queued.append((time.perf_counter() - t0, collector.seconds, collector.full))
    block, gc_s, full = sorted(queued)[len(queued) // 2]  # the median block (the upper one of an even count)
    return _Timing(block / steps * 1e3, statistics.median(times) * 1e3, torch.cuda.max_memory_allocated() / 2**30,
                   gc_s / steps * 1e3, full / steps, statistics.fmean(times) * 1e3)


def _graphed(body, warmup: int):
    """``body`` captured as one CUDA graph (after warm-up on a side stream, as torch.cuda.graph requires):
    returns the graph and its replay function."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph, graph.replay


MODES = ("eager", "compile", "reduce-overhead", "graph")
BATCHES = ("unpadded", "padded", "packed", "padding-free")


def make_batch(batch: str, length: int, rows: int, vocab: int, device, *, seed: int = 0) -> dict:
    """The model inputs of one step: ``rows`` rows of ``length`` tokens, as

    - unpadded: every token real, no attention mask;
    - padded: each row's real length drawn uniformly from [length / 2, length], right padding, an attention mask;
    - packed: each row filled with documents of 512-4096 tokens (the last one cut to fit), as transformers'
      flattening collator makes them: position_ids restarting at 0 and cu_seq_lens_q over the flattened rows;
    - padding-free: the padded batch's real tokens as one packed row (``sa.unpad``, on the CPU, rounded up to a
      multiple of 128 tokens by a padding segment): no layer runs over padding.

    Besides the inputs, "real" holds the number of real tokens and "documents" the (row, first token, count) of
    every sequence, from which ``unpacked`` makes dense attention's batch over the same sequences."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (rows, length), generator=g)
    out = {"input_ids": ids}
    docs = []
    if batch == "unpadded":
        docs = [(r, 0, length) for r in range(rows)]
    elif batch == "padded":
        lengths = torch.randint(length // 2, length + 1, (rows,), generator=g)
        mask = torch.arange(length)[None, :] < lengths[:, None]
        out["attention_mask"] = mask.long()
        docs = [(r, 0, int(n)) for r, n in enumerate(lengths)]
    elif batch == "padding-free":
        lengths = torch.randint(length // 2, length + 1, (rows,), generator=g)  # the padded batch's
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        out = dict(unpad({"input_ids": ids, "attention_mask": mask}, multiple_of=128))
        starts = [0, *lengths.cumsum(0).tolist()]
        docs = [(0, a, b - a) for a, b in zip(starts, starts[1:])]
    elif batch == "packed":
        pos = torch.zeros(rows, length, dtype=torch.long)
        for r in range(rows):
            start = 0
            while start < length:
                n = min(int(torch.randint(512, 4097, (1,), generator=g)), length - start)
                pos[r, start:start + n] = torch.arange(n)
                docs.append((r, start, n))
                start += n
        cu = torch.tensor([0] + [r * length + s + n for r, s, n in docs], dtype=torch.int32)
        out.update(position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=max(n for _, _, n in docs), max_length_k=max(n for _, _, n in docs))
    else:
        raise ValueError(f"batch must be one of {', '.join(BATCHES)}, got {batch!r}")
    out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return {"inputs": out, "real": sum(n for _, _, n in docs), "documents": docs}


def unpacked(batch: dict, device) -> dict:
    """Dense attention's inputs over the same sequences as ``batch``: one sequence per row, right-padded to the
    longest (what a model without packed attention trains on)."""
    docs = batch["documents"]
    ids = batch["inputs"]["input_ids"]
    width = max(n for _, _, n in docs)
    out = torch.zeros(len(docs), width, dtype=ids.dtype, device=device)
    mask = torch.zeros(len(docs), width, dtype=torch.long, device=device)
    for i, (r, s, n) in enumerate(docs):
        out[i, :n] = ids[r, s:s + n]
        mask[i, :n] = 1
    inputs = {"input_ids": out}
    if any(n < width for _, _, n in docs):  # no mask where no row is padded: SDPA keeps its flash kernel
        inputs["attention_mask"] = mask
    return {"inputs": inputs, "real": batch["real"], "documents": docs}


def _timed(fn, times: list):
    """``fn`` timed on the host into ``times``, the GPU's queue drained before each call, so that no launch waits
    for room in it."""

    def timed(*args, **kwargs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    return timed


class _HostTimer:
    """Host time per attention call of a backend (its Python, layout lookups and kernel launches), measured around
    ``attention``, and per backward call of the Triton kernel (its launches, around ``triton_kernel._backward_over``,
    which every path of the kernel's backward calls; autograd's engine, paid once a step, is not in it)."""

    def __init__(self, backend):
        from ..backends import triton_kernel

        self.backend, self.kernel, self.times, self.bwd_times = backend, triton_kernel, [], []
        self._inner, self._inner_bwd = backend.attention, triton_kernel._backward_over
        backend.attention = _timed(self._inner, self.times)
        triton_kernel._backward_over = _timed(self._inner_bwd, self.bwd_times)

    def us_per_call(self) -> tuple[float | None, float | None]:
        return tuple(statistics.median(t) * 1e6 if t else None for t in (self.times, self.bwd_times))

    def remove(self):
        self.backend.attention = self._inner
        self.kernel._backward_over = self._inner_bwd


def _host_us(backend, run) -> tuple[float | None, float | None]:
    """Median host microseconds per attention call and per backward call over one more eager step."""
    timer = _HostTimer(backend)
    try:
        run()
        torch.cuda.synchronize()
    finally:
        timer.remove()
    return timer.us_per_call()


def run_model(kind: str, length: int, *, tokens: int = 16384, warmup: int = 3, steps: int = 8, decoder_layers=4,
              kernel_options: dict | None = None, kernels=("triton",), modes=("eager",), batches=("unpadded",),
              compile_model: bool = False, decoder_cache: bool = True, block_size: int | None = None,
              backward: str = "auto", log=print) -> list[ModelResult]:
    """``run_models`` for one model kind and length."""
    return run_models([(kind, length)], tokens=tokens, warmup=warmup, steps=steps, decoder_layers=decoder_layers,
                      kernel_options=kernel_options, kernels=kernels, modes=modes, batches=batches,
                      compile_model=compile_model, decoder_cache=decoder_cache, block_size=block_size,
                      backward=backward, log=log)


def run_models(configs, *, tokens: int = 16384, warmup: int = 3, steps: int = 8, decoder_layers=4,
               kernel_options: dict | None = None, kernels=("triton",), modes=("eager",), batches=("unpadded",),
               compile_model: bool = False, decoder_cache: bool = True, block_size: int | None = None,
               backward: str = "auto", log=print, done=None) -> list[ModelResult]:
    """Dense and sparse (each of ``kernels``) in every mode of ``modes`` on every batch kind of ``batches``, for
    each (model kind, length) of ``configs``. Speed-ups are real tokens per second over the fastest dense step of
    the same model, length and batch kind, whatever its mode (and over that of any batch kind). decoder_cache: the
    decoder is called with its default cache (``use_cache=True``, as ``model(ids)`` runs it), or with
    ``use_cache=False``, where transformers looks for packed rows in the positions and, under torch.compile, makes an
    L x L mask for dense attention that keeps SDPA off its flash kernel (docs/benchmarks.md, twenty-first round).
    block_size: the block backend's tile size (its layouts, and the block density reported); None: the backend's
    own choice by head size (``default_block_size``). backward: the Triton
    kernel's backward pass (``BlockSparseBackend``'s ``backward``).

    Every eager step is timed first, before anything in the process is compiled or captured, as in users' eager
    runs: padded and packed eager steps timed after the compiled modes had run in the same process came out 10-12
    ms slower than in an eager-only run of the same batches (docs/benchmarks.md, tenth round). Then every
    ``torch.compile(model)`` step, before anything is captured as a CUDA graph, so that each mode runs in a process
    no later mode has changed (a capture turned out not to slow the compiled step: thirty-fourth round). ``done`` is
    called with the results so far after each batch kind (to keep them, whatever happens next)."""
    configs, modes, batches, kernels = list(configs), list(modes), list(batches), list(kernels)
    out = []
    phases = [m for m in ([m for m in modes if m == "eager"], [m for m in modes if m == "compile"],
                          [m for m in modes if m not in ("eager", "compile")]) if m]
    for phase in phases:
        for kind, length in configs:
            for batch in batches:
                out.extend(_run_batch(kind, length, batch, tokens=tokens, warmup=warmup, steps=steps,
                                      decoder_layers=decoder_layers, kernel_options=kernel_options, kernels=kernels,
                                      modes=phase, compile_model=compile_model, decoder_cache=decoder_cache,
                                      block_size=block_size, backward=backward, log=log))
                if done is not None:
                    done(_ranked(out, configs, kernels, modes, batches))
    return _ranked(out, configs, kernels, modes, batches)


def _ranked(results, configs, kernels, modes, batches) -> list[ModelResult]:
    """The results listed by model, length, batch kind, attention and mode, with their speed-ups."""
    attention = {a: i for i, a in enumerate([None, *kernels])}
    out = sorted(results, key=lambda r: (configs.index((r.model, r.length)), batches.index(r.batch),
                                         attention[r.kernel], modes.index(r.mode)))
    for kind, length in configs:
        same = [r for r in out if (r.model, r.length) == (kind, length)]
        for batch in batches:
            _speedups_over_best_dense([r for r in same if r.batch == batch])
        # and over the fastest dense step of any batch kind: unpadded dense is the bar to beat
        _speedups_over_best_dense(same, any_batch=True)
    return out


def _run_batch(kind, length, batch_kind, *, tokens, warmup, steps, decoder_layers, kernel_options, kernels, modes,
               compile_model, decoder_cache, block_size, backward, log) -> list[ModelResult]:
    """Dense, then each kernel of ``kernels``, in every mode of ``modes``, on one batch kind (speed-ups: ``_ranked``)."""
    import torch._dynamo

    bench = _Bench.make(kind, length, batch_kind, tokens=tokens, decoder_layers=decoder_layers,
                        decoder_cache=decoder_cache, block_size=block_size, kernels=kernels)
    out = []
    for attention in ("dense", *kernels):
        backend = None
        if attention != "dense":
            backend = BlockSparseBackend(bench.tile, kernel_options=kernel_options, kernel=attention,
                                         backward=backward)
            sparsify(bench.model, bench.plan, backend=backend)
        if compile_model and attention == "dense":  # once: the same compiled modules serve the sparse runs
            log(f"  compiled {len(compile_outside_attention(bench.model))} submodules outside attention")
        for mode in modes:
            res = bench.result(attention, mode, compile_model)
            _time_mode(bench, res, backend, warmup=warmup, steps=steps, log=log)
            out.append(res)
            log(_result_line(res))
    torch._dynamo.reset()
    return out


@dataclass
class _Bench:
    """One model and batch kind: the model (random weights, on the GPU), its optimizer (encoder), the plan with its
    measured sparsity and block density, and the sparse and dense batches over the same sequences."""

    kind: str
    length: int
    batch_kind: str
    rows: int
    model: torch.nn.Module
    opt: torch.optim.Optimizer | None
    plan: Plan
    sparsity: float
    block_density: float
    sparse_batch: dict
    dense_batch: dict
    decoder_cache: bool  # the decoder's forward with use_cache=True (its default) or False
    tile: int  # the block backend's tile, which block_density is measured at

    @classmethod
    def make(cls, kind, length, batch_kind, *, tokens, decoder_layers, decoder_cache=True,
             block_size: int | None = None, kernels=("triton",)) -> "_Bench":
        """block_size None: the backend's own choice, one tile for every kernel of ``kernels`` (FlexAttention's where
        it runs: its tiles must divide the layout's)."""
        device = "cuda"
        gc.collect()  # the previous config's models, before this one allocates
        torch.cuda.empty_cache()
        B = max(1, tokens // length)
        causal = kind == "decoder"
        torch.manual_seed(0)
        model = (encoder(length) if kind == "encoder" else decoder(length, decoder_layers)).to(device)
        sparse_batch = make_batch(batch_kind, length, B, model.config.vocab_size, device)
        # dense attention cannot tell packed documents apart: it runs the same documents one per row, padded
        dense_batch = unpacked(sparse_batch, device) if batch_kind in ("packed", "padding-free") else sparse_batch
        plan = sparse_plan(length, causal=causal, sequences=[n for _, _, n in sparse_batch["documents"]])
        tile = block_size or default_block_size(head_dim(model.config), "flex" if "flex" in kernels else "triton")
        sp, dens = _measure(plan, batch_layout(sparse_batch, causal=causal, device=device),
                            model.config.num_attention_heads, tile)
        opt = None
        if kind == "encoder":
            # capturable: the step count lives on the GPU, so the optimizer step can be captured in a graph
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True, capturable=True)
            model.train()
        else:
            model = model.to(torch.bfloat16).eval()
        return cls(kind, length, batch_kind, B, model, opt, plan, sp, dens, sparse_batch, dense_batch, decoder_cache,
                   tile)

    def batch(self, attention: str) -> dict:
        return self.dense_batch if attention == "dense" else self.sparse_batch

    def inputs(self, attention: str) -> dict:
        """The model's inputs (an encoder takes no cu_seq_lens_k / max_length_k)."""
        return {k: v for k, v in self.batch(attention)["inputs"].items()
                if self.kind == "decoder" or k not in ("cu_seq_lens_k", "max_length_k")}

    def result(self, attention: str, mode: str, compiled: bool) -> ModelResult:
        dense = attention == "dense"
        return ModelResult(self.kind, self.length, self.rows, "dense" if dense else self.plan.spec(),
                           None if dense else self.sparsity, None if dense else self.block_density, None, None, None,
                           kernel=None if dense else attention, mode=mode, compiled=compiled, batch=self.batch_kind,
                           block_size=None if dense else self.tile)

    def step(self, fwd, inputs: dict, mark: bool):
        """One step of ``fwd`` on ``inputs``: an encoder trains (forward, backward, AdamW; ``train(zero_grad=False)``
        leaves the gradients for a captured graph), a decoder runs forward. mark: a new step for the CUDA graphs
        torch.compile records (reduce-overhead)."""
        rows = inputs["input_ids"].shape[0]
        labels = torch.randint(0, 2, (rows,), device=inputs["input_ids"].device) if self.kind == "encoder" else None

        def train(zero_grad: bool = True):
            if mark:
                torch.compiler.cudagraph_mark_step_begin()
            if self.kind == "encoder":
                # no autocast cache: cast weights are re-made each step, as graph capture needs
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                    loss = fwd(**inputs, labels=labels).loss
                loss.backward()
                self.opt.step()
                if zero_grad:
                    self.opt.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    fwd(**inputs, use_cache=self.decoder_cache)
        return train

    def zero_grad(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)


def _time_mode(bench: _Bench, res: ModelResult, backend, *, warmup: int, steps: int, log) -> None:
    """Time ``res``'s attention in ``res.mode`` into ``res`` (a mode that fails, or runs out of memory, is noted
    in it, not raised)."""
    import torch._dynamo

    attention = res.kernel or "dense"
    batch, inputs, mode = bench.batch(attention), bench.inputs(attention), res.mode
    graph = None
    torch._dynamo.reset()
    try:
        fwd = bench.model
        if mode == "compile":
            fwd = torch.compile(bench.model)
        elif mode == "reduce-overhead":
            fwd = torch.compile(bench.model, mode="reduce-overhead")
        run = bench.step(fwd, inputs, mark=mode == "reduce-overhead")
        if mode == "graph":
            bench.zero_grad()
            run()  # layouts and autotuning happen eagerly, before capture
            _fresh_peak()
            body = bench.step(bench.model, inputs, mark=False)
            graph, run = _graphed((lambda: body(zero_grad=False)) if bench.kind == "encoder" else body, warmup)
        if mode == "reduce-overhead":
            # from before the warm-up that records torch.compile's graphs: their replays reuse the memory pool the
            # recording allocated and allocate nothing, so a peak reset after it counts only the live tensors
            _fresh_peak()
        t = _time_steps(run, warmup, steps, reset_peak=mode not in ("graph", "reduce-overhead"))
        res.step_ms, res.synced_ms, res.peak_gib, res.gc_ms, res.full_gcs, res.synced_mean_ms = t
        res.tokens_per_s = batch["real"] / (t.queued_ms / 1e3)
        if backend is not None and mode == "eager":
            res.host_us, res.host_bwd_us = _host_us(backend, run)
        if backend is not None:
            res.note = ", ".join(f"{k} {v}" for k, v in sorted(backend.stats.items()))
    except torch.OutOfMemoryError as e:
        res.note = f"out of memory: {str(e).splitlines()[0][:160]}"
    except Exception as e:  # a mode that fails is a result to report, not the end of the run
        res.note = f"{mode} failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        log(f"  {bench.kind} L={bench.length} {bench.batch_kind} {attention} {mode} failed:\n{e}")
        torch.cuda.synchronize()
    del graph
    bench.zero_grad()  # gradients captured in a graph's memory pool go with it
    gc.collect()
    torch.cuda.empty_cache()


def _result_line(res: ModelResult) -> str:
    return (f"  {res.model} L={res.length} B={res.batch_size} {res.batch} {res.kernel or 'dense'} {res.mode}"
            f"{' compiled' if res.compiled else ''}: "
            f"{res.step_ms and round(res.step_ms, 2)} ms/step queued ({res.synced_ms and round(res.synced_ms, 2)} "
            f"each waited for, mean {res.synced_mean_ms and round(res.synced_mean_ms, 2)}), "
            f"{res.tokens_per_s and round(res.tokens_per_s)} real tok/s, peak "
            f"{res.peak_gib and round(res.peak_gib, 2)} GiB"
            + (f", garbage collector {res.gc_ms:.2f} ms/step ({res.full_gcs:.1f} full)" if res.gc_ms is not None else "")
            + (f", host {res.host_us:.0f} us/attention call" if res.host_us else "")
            + (f", {res.host_bwd_us:.0f} us/backward call" if res.host_bwd_us else "")
            + (f" ({res.note})" if res.note else ""))


def _speedups_over_best_dense(results: list[ModelResult], *, any_batch: bool = False) -> None:
    """Each result's speed-up over the fastest dense step among ``results``, whatever its mode (``speedup`` and its
    ``baseline``; with ``any_batch``, ``speedup_any``)."""
    dense = [r for r in results if r.kernel is None and r.tokens_per_s]
    best = max(dense, key=lambda r: r.tokens_per_s) if dense else None
    for r in results:
        if best and r.tokens_per_s:
            if any_batch:
                r.speedup_any = r.tokens_per_s / best.tokens_per_s
            else:
                r.speedup = r.tokens_per_s / best.tokens_per_s
                r.baseline = f"dense {best.mode}"


def format_table(results: list[ModelResult]) -> str:
    head = (f"{'model':<8} {'L':>6} {'B':>3} {'batch':<12} {'attention':<10} {'mode':<24} {'sparsity':>8} "
            f"{'blk dens':>8} {'ms/step':>8} {'synced':>8} {'real tok/s':>11} {'peak GiB':>8} {'host us f/b':>11} {'speed-up':>8} "
            f"{'over':<22} {'x best dense':>12}")
    lines = [head, "-" * len(head)]
    for r in results:
        f = (lambda v, fmt: format(v, fmt) if v is not None else "-")
        attention = r.kernel + (f" {r.block_size}" if r.block_size else "") if r.kernel else "dense"
        lines.append(f"{r.model:<8} {r.length:>6} {r.batch_size:>3} {r.batch:<12} {attention:<10} "
                     f"{r.mode + (' +outside compiled' if r.compiled else ''):<24} "
                     f"{f(r.sparsity, '.1%'):>8} {f(r.block_density, '.1%'):>8} {f(r.step_ms, '.2f'):>8} {f(r.synced_ms, '.2f'):>8} "
                     f"{f(r.tokens_per_s, ',.0f'):>11} {f(r.peak_gib, '.2f'):>8} {_host_cell(r):>11} "
                     f"{f(r.speedup, '.2f'):>8} {r.baseline or '-':<22} {f(r.speedup_any, '.2f'):>12}"
                     + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def _host_cell(r: ModelResult) -> str:
    if r.host_us is None:
        return "-"
    return f"{r.host_us:.0f}/{r.host_bwd_us:.0f}" if r.host_bwd_us is not None else f"{r.host_us:.0f}"


def results_to_json(results: list[ModelResult], meta: dict) -> dict:
    return {"meta": meta, "results": [asdict(r) for r in results]}
