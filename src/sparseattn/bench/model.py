"""``sparseattn bench model``: whole models, dense against a 90%-sparse plan on the block backend.

- encoder: a BERT-style encoder with all-MiniLM-L6-v2's shape (6 layers, 12 heads of 32, hidden 384,
  intermediate 1536), position embeddings extended to the longest length, random weights; one training
  step (forward, backward, AdamW) in bf16 autocast on a sequence-classification loss;
- decoder: a Llama-style decoder (hidden 2048, 32 heads of 64, 8 key/value heads, intermediate 5632,
  TinyLlama-1.1B's shape with fewer layers), random weights, bf16, forward only.

Steps run eagerly and, with ``graphs``, also as one captured CUDA graph per configuration (forward,
backward and optimizer step replayed without Python): at 16k tokens the eager sparse step is bound by the
host's launch time (the GPU idles between kernels), so the graph mode shows what the GPU work itself costs.
Dense and sparse are compared within one mode.

With ``compile_model``, every largest submodule that holds no attention module (embeddings, each layer's
attention output, intermediate and output blocks, the head) is compiled with ``torch.compile`` (Inductor,
default mode), for dense and sparse alike: the layers' other work (layer norms, GELU, dropout, residuals)
then runs as fused kernels in both, and the attention modules (their projections and the attention itself)
run as they are, so both paths compile exactly the same code.

Every step holds the same number of tokens (``tokens``; batch = tokens / length), so tokens/s compare
across lengths. Dense runs transformers' SDPA attention without a mask (flash attention or cuDNN, causal
for the decoder; through ``use_dense_sdpa``, so it stays mask-free under graph capture); sparse runs ``sparsify(model, plan, backend=BlockSparseBackend())``. The plan is
``neighbour(w) | global_tokens(g)`` on every layer with w chosen for 90% sparsity of the allowed pairs
(measured with sparseattn.sparsity, reported with its block density).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .. import sparsify
from ..backends.block import BlockSparseBackend
from ..integrations.hf import compile_outside_attention, use_dense_sdpa
from ..layout import TokenLayout
from ..plans.plan import Plan
from ..sparsity import measure_plan


@dataclass
class ModelResult:
    model: str
    length: int
    batch: int
    attention: str  # "dense" or the plan
    sparsity: float | None
    block_density: float | None
    step_ms: float | None
    tokens_per_s: float | None
    peak_gib: float | None
    speedup: float | None = None
    note: str = ""
    kernel: str | None = None  # the block backend's kernel (flex or triton); None for dense
    mode: str = "eager"  # "eager", or "graph": the whole step captured once and replayed as a CUDA graph
    compiled: bool = False  # the submodules outside attention ran compiled (dense and sparse alike)


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


def sparse_plan(length: int, *, causal: bool, sparsity: float = 0.9, globals_: int = 1) -> Plan:
    """neighbour(w) | global_tokens(g) with the smallest w whose sparsity is at most ``sparsity``'s target
    (pairs kept about (2w + 1) L, or (w + 1) L for decoders, plus the global rows and columns)."""
    allowed = length * (length + 1) / 2 if causal else length * length
    per_row = (1 - sparsity) * allowed / length - 2 * globals_
    w = max(1, int(per_row - 1) if causal else int((per_row - 1) / 2))
    return Plan.parse(f"all: neighbour({w}) | global_tokens({globals_})")


def _measure(plan: Plan, length: int, heads: int, causal: bool, device) -> tuple[float, float]:
    layout = TokenLayout.from_lengths([length], causal=causal, device=device)
    rep = measure_plan(plan.resolve(1, heads)[:1], layout, block_size=128)
    return rep.overall, rep.block_density


def _fresh_peak() -> None:
    """Collect what earlier configs left (a sparsified model's hooks form reference cycles that only the
    garbage collector frees) and start counting the peak afresh."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _time_steps(step, warmup: int, steps: int, *, reset_peak: bool = True) -> tuple[float, float]:
    """Median step time (ms) and peak memory allocated (GiB) during the timed steps, which includes the
    model, its optimizer state and the inputs. reset_peak=False keeps the peak counted so far: a graph's
    replays reuse the memory its capture allocated, so its peak is the capture's."""
    for _ in range(warmup):
        step()
    if reset_peak:
        _fresh_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, torch.cuda.max_memory_allocated() / 2**30


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


def run_model(kind: str, length: int, *, tokens: int = 16384, warmup: int = 3, steps: int = 8, decoder_layers=4,
              kernel_options: dict | None = None, kernels=("flex",), graphs: bool = False,
              compile_model: bool = False, log=print) -> list[ModelResult]:
    device = "cuda"
    gc.collect()  # the previous config's models, before this one allocates
    torch.cuda.empty_cache()
    B = max(1, tokens // length)
    causal = kind == "decoder"
    torch.manual_seed(0)
    model = (encoder(length) if kind == "encoder" else decoder(length, decoder_layers)).to(device)
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab, (B, length), device=device)
    labels = torch.randint(0, 2, (B,), device=device)
    plan = sparse_plan(length, causal=causal)
    sp, dens = _measure(plan, length, model.config.num_attention_heads, causal, device)
    if kind == "encoder":
        # capturable: the step count lives on the GPU, so the optimizer step can be captured in a graph
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True, capturable=True)

        def train(zero_grad: bool = True):
            # no autocast cache: cast weights are re-made each step, as graph capture needs
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            if zero_grad:
                opt.zero_grad(set_to_none=True)

        def capture():
            opt.zero_grad(set_to_none=True)  # the captured backward then writes the gradients afresh each replay
            return _graphed(lambda: train(zero_grad=False), warmup)

        step = train
        model.train()
    else:
        model = model.to(torch.bfloat16).eval()

        def step():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

        def capture():
            return _graphed(step, warmup)
    out = []
    for attention in ("dense", *kernels):
        if attention != "dense":
            backend = BlockSparseBackend(kernel_options=kernel_options, kernel=attention)
            sparsify(model, plan, backend=backend)
        if compile_model and attention == "dense":  # once: the same compiled modules serve the sparse runs
            log(f"  compiled {len(compile_outside_attention(model))} submodules outside attention")
        for mode in ("eager", "graph") if graphs else ("eager",):
            res = ModelResult(kind, length, B, "dense" if attention == "dense" else plan.spec(),
                              None if attention == "dense" else sp, None if attention == "dense" else dens,
                              None, None, None, kernel=None if attention == "dense" else attention, mode=mode,
                              compiled=compile_model)
            graph = None
            try:
                run = step
                if mode == "graph":
                    step()  # layouts and autotuning happen eagerly, before capture
                    _fresh_peak()
                    graph, run = capture()
                ms, peak = _time_steps(run, warmup, steps, reset_peak=mode == "eager")
                res.step_ms, res.peak_gib, res.tokens_per_s = ms, peak, B * length / (ms / 1e3)
                if attention != "dense":
                    res.note = ", ".join(f"{k} {v}" for k, v in sorted(backend.stats.items()))
            except torch.OutOfMemoryError as e:
                res.note = f"out of memory: {str(e).splitlines()[0][:160]}"
            except RuntimeError as e:  # a capture that fails is a result to report, not the end of the run
                if mode != "graph":
                    raise
                res.note = f"graph capture failed: {str(e).splitlines()[0][:160]}"
                log(f"  graph capture of {kind} L={length} {attention} failed:\n{e}")
                torch.cuda.synchronize()
            del graph
            for p in model.parameters():  # gradients captured in the graph's memory pool go with it
                p.grad = None
            gc.collect()
            torch.cuda.empty_cache()
            out.append(res)
            log(f"  {kind} L={length} B={B} {attention} {mode}{' compiled' if compile_model else ''}: "
                f"{res.step_ms and round(res.step_ms, 1)} ms/step, "
                f"{res.tokens_per_s and round(res.tokens_per_s)} tok/s, peak "
                f"{res.peak_gib and round(res.peak_gib, 2)} GiB" + (f" ({res.note})" if res.note else ""))
    for mode in ("eager", "graph"):  # speed-ups against dense in the same mode
        dense = next((r for r in out if r.mode == mode and r.kernel is None), None)
        for r in out:
            if r.mode == mode and r.kernel is not None and dense and dense.tokens_per_s and r.tokens_per_s:
                r.speedup = r.tokens_per_s / dense.tokens_per_s
    return out


def format_table(results: list[ModelResult]) -> str:
    head = (f"{'model':<8} {'L':>6} {'B':>3} {'attention':<10} {'mode':<14} {'sparsity':>8} {'blk dens':>8} {'ms/step':>8} "
            f"{'tokens/s':>10} {'peak GiB':>8} {'speed-up':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        f = (lambda v, fmt: format(v, fmt) if v is not None else "-")
        lines.append(f"{r.model:<8} {r.length:>6} {r.batch:>3} {(r.kernel or 'dense'):<10} "
                     f"{r.mode + (' compiled' if r.compiled else ''):<14} "
                     f"{f(r.sparsity, '.1%'):>8} {f(r.block_density, '.1%'):>8} {f(r.step_ms, '.1f'):>8} "
                     f"{f(r.tokens_per_s, ',.0f'):>10} {f(r.peak_gib, '.2f'):>8} {f(r.speedup, '.2f'):>8}"
                     + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def results_to_json(results: list[ModelResult], meta: dict) -> dict:
    return {"meta": meta, "results": [asdict(r) for r in results]}
