"""Generation under a plan: greedy ``generate()`` with transformers' caches (dynamic, static) and sparseattn's
evicting cache, against the specification: the logits of every generated step equal those of the whole sequence
run through the reference backend in one forward pass. And the row masks incremental calls use, against the
rows of the full masks."""

from __future__ import annotations

import pytest
import torch

import sparseattn as sa
from sparseattn.layout import TokenLayout
from sparseattn.patterns import bigbird, causal, full, global_tokens, neighbour, random, strided
from sparseattn.patterns.random_blocks import random_blocks
from sparseattn.plans.plan import Plan

from conftest import padded_real, tiny_llama

ATOL = 2e-5
MAX_POSITIONS = 64


# -- row masks ----------------------------------------------------------------------------------------
def ap_table(n: int = 40, heads: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(heads, n, n, generator=g) < 0.3


ROW_PATTERNS = {
    "neighbour": neighbour(2), "strided": strided(3), "global": global_tokens(2), "causal": causal(),
    "full": full(), "random": random(2), "random_blocks": random_blocks(1, block=3), "bigbird": bigbird(1, 1, 2),
    "sink_window": global_tokens(1) | neighbour(3), "and": neighbour(4) & strided(2),
    "static": sa.static_mask(ap_table(), "ap"), "static_heads": sa.static_mask(ap_table(heads=4), "aph"),
}


@pytest.mark.parametrize("name", sorted(ROW_PATTERNS))
@pytest.mark.parametrize("causal_", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_mask_rows_equal_rows_of_the_full_mask(name, causal_, side):
    pattern = ROW_PATTERNS[name]
    real = padded_real([13, 9, 4], side)
    if side == "left":  # a static cache: empty slots after the tokens seen
        real = torch.cat([real, torch.zeros(3, 5, dtype=torch.bool)], 1)
    layout = TokenLayout(real=real, causal=causal_)
    full_mask = pattern.mask(layout, layer=1, num_heads=4)
    for rows in (torch.arange(12, 13), torch.arange(9, 13), torch.arange(0, real.shape[1]), torch.tensor([3, 11])):
        got = pattern.mask_rows(TokenLayout(real=real, causal=causal_), rows, layer=1, num_heads=4)
        assert got.shape == (3, full_mask.shape[1], rows.numel(), real.shape[1])
        assert torch.equal(got, full_mask[:, :, rows]), rows


@pytest.mark.parametrize("name", sorted(ROW_PATTERNS))
def test_mask_rows_over_a_cache_holding_some_keys_equal_rows_of_the_full_mask(name):
    """A cache that holds only some keys (a sliding window, a sink + window) gives their positions
    (``given_positions``): each query's row over the keys held is its row of the full mask at those keys. Random
    patterns draw among every earlier key, held or not."""
    pattern = ROW_PATTERNS[name]
    real = padded_real([13, 9, 4], "left")
    full_mask = pattern.mask(TokenLayout(real=real, causal=True), layer=1, num_heads=4)
    positions = TokenLayout(real=real, causal=True).positions
    for held in (torch.arange(7, 13), torch.tensor([0, 1, 2, 3, 10, 11, 12])):
        layout = TokenLayout(real=real[:, held], causal=True, given_positions=positions[:, held])
        rows = torch.tensor([held.numel() - 2, held.numel() - 1])
        got = pattern.mask_rows(layout, rows, layer=1, num_heads=4)
        assert torch.equal(got, full_mask[:, :, held[rows]][..., held]), held


def test_layer_plan_rows_equal_rows_of_its_mask_with_per_head_rules():
    plan = Plan.parse("heads=0-1@all: neighbour(1); heads=3@all: strided(2) | global_tokens(1)")
    lp = plan.resolve(2, 4)[1]
    layout = TokenLayout(real=padded_real([11, 6], "left"), causal=True)
    rows = torch.arange(8, 11)
    assert torch.equal(lp.mask_rows(layout, rows), lp.mask(layout)[:, :, rows])


def test_given_positions_are_what_positional_patterns_see():
    """A cache that evicted keys: slots 0-1 and 7-9 of a sequence hold positions 0, 1, 7, 8, 9."""
    pos = torch.tensor([[0, 1, 7, 8, 9]])
    layout = TokenLayout(real=torch.ones(1, 5, dtype=torch.bool), causal=True, given_positions=pos)
    got = (global_tokens(1) | neighbour(1)).mask_rows(layout, torch.tensor([4]))
    assert got[0, 0, 0].tolist() == [True, False, False, True, True]  # position 9 keeps 0 (sink), 8 and itself


def test_neighbour_rows_at_position_50000_never_build_the_full_mask(monkeypatch):
    n = 50_001

    def refuse(*a, **k):
        raise AssertionError("an L x L mask was built")

    monkeypatch.setattr(TokenLayout, "allowed", refuse)
    monkeypatch.setattr(TokenLayout, "diagonal", refuse)
    for cls in {type(p) for p in ((neighbour(4) | global_tokens(1)).parts + (strided(7),))}:
        monkeypatch.setattr(cls, "relation", refuse)
    layout = TokenLayout(real=torch.ones(1, n, dtype=torch.bool), causal=True)
    rows = torch.tensor([n - 1])
    got = (neighbour(4) | global_tokens(1)).mask_rows(layout, rows)
    assert got.shape == (1, 1, 1, n)
    assert got[0, 0, 0].nonzero().flatten().tolist() == [0, *range(n - 5, n)]
    got = strided(7).mask_rows(layout, rows)
    assert got[0, 0, 0].nonzero().flatten().tolist() == list(range((n - 1) % 7, n, 7))


def test_stored_mask_rows_beyond_its_length_name_pattern_layer_length_and_position():
    pattern = sa.static_mask(ap_table(10), "ap")
    layout = TokenLayout(real=torch.ones(1, 12, dtype=torch.bool), causal=True)
    pattern.mask_rows(layout, torch.tensor([9]), layer=3)  # the last stored position is fine
    with pytest.raises(ValueError, match=r"static_mask\('ap'\) in layer 3 is stored for 10 positions.*position 11"):
        pattern.mask_rows(layout, torch.tensor([11]), layer=3)
    # compiled, where nothing is read back from the device: an asynchronous assert, not a clamped row
    rows = torch.compile(lambda r: pattern.mask_rows(layout, r, layer=3), fullgraph=True)
    assert rows(torch.tensor([9])).shape[-2:] == (1, 12)
    with pytest.raises(RuntimeError, match=r"static_mask\('ap'\) in layer 3 is stored for 10 positions"):
        rows(torch.tensor([11]))


def test_a_stored_table_on_another_device_is_copied_once_eagerly_and_read_as_is_when_traced():
    """The AP table lives on the host, the model on the GPU: the prefill copies it once, and a decoding step traced
    by torch.compile (fullgraph, as a static cache's step) reads that copy, neither copying from the host inside the
    graph nor mutating the pattern (which torch 2.11's Dynamo refuses: the GPU test of the traced step failed on it). "meta"
    stands in for the GPU here."""
    pattern = sa.static_mask(ap_table(10), "ap")
    first = pattern._table_on("meta")
    assert first.device.type == "meta" and pattern._table_on("meta") is first
    torch._dynamo.reset()
    traced = torch.compile(lambda: pattern._table_on(torch.device("meta")), fullgraph=True, backend="eager")
    assert traced().shape == first.shape


def test_stored_mask_rows_read_nothing_back_where_the_keys_fit_in_the_table():
    """A position counts real tokens, so it is below the number of keys: with no more keys than the table's length
    (a static cache no longer than the table; any cache early on), no query can be beyond it, and a decoding step
    does not wait for the GPU to check."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    pattern = sa.static_mask(ap_table(12), "ap")
    real = padded_real([12, 7], "left")
    with Reads():
        got = pattern.mask_rows(TokenLayout(real=real, causal=True), torch.tensor([11]), layer=0)
    assert Reads.count == 0
    assert torch.equal(got, pattern.mask(TokenLayout(real=real, causal=True))[:, :, 11:])


def test_input_dependent_patterns_refuse_rows_saying_why():
    from sparseattn.patterns import lexical

    layout = TokenLayout(real=torch.ones(1, 5, dtype=torch.bool), causal=True)
    with pytest.raises(ValueError, match="does not support incremental decoding"):
        lexical().mask_rows(layout, torch.tensor([4]))


# -- generate() against the reference -----------------------------------------------------------------
PLANS = {
    "neighbour": "all: neighbour(2)",
    "sink_window": "all: global_tokens(2) | neighbour(3)",
    "strided": "all: strided(3)",
    "random": "all: bigbird(1, 1, 2)",
    "random_blocks": "all: random_blocks(1, block=3) | neighbour(1)",
    "per_head": "heads=0-1@all: neighbour(1); heads=2@layers=1: strided(2)",
    "ap": None,  # a stored Attention-Pruning-style mask per layer (below)
}


def plan_of(name: str):
    if name != "ap":
        return PLANS[name]
    tables = {"ap0": ap_table(MAX_POSITIONS, heads=4, seed=1), "ap1": ap_table(MAX_POSITIONS, seed=2)}
    return Plan.parse("layers=0: static_mask('ap0'); layers=1: static_mask('ap1') | neighbour(1)", tables)


def prompts(lengths=(7, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(3, 120, (len(lengths), L), generator=g)
    am = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, L - n:] = 1
    return ids, am


def generate(model, ids, am, new_tokens, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)


def cache_kwarg(model, cache) -> dict:
    """transformers renamed generate()'s past_key_values to cache (5.2x); give the cache by the name it takes."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def reference_logits(plan, out, am, *, make_model=None, **sparsify_kw):
    """The whole generated sequence through the reference backend in one pass, on a fresh model of
    ``make_model()`` (default: the tiny Llama): logits (B, T, V)."""
    model = make_model() if make_model is not None else tiny_llama(max_position_embeddings=MAX_POSITIONS)
    sa.sparsify(model, plan, **sparsify_kw)
    seq = out.sequences
    full_am = torch.cat([am, torch.ones(am.shape[0], seq.shape[1] - am.shape[1], dtype=am.dtype)], 1)
    pos = (full_am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=seq, attention_mask=full_am, position_ids=pos).logits


def assert_steps_equal(out, ref, prompt_len, tol=ATOL):
    assert len(out.logits) > 1
    for t, step in enumerate(out.logits):
        torch.testing.assert_close(step.to(ref.device), ref[:, prompt_len - 1 + t], atol=tol, rtol=tol, msg=f"step {t}")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_greedy_generation_equals_the_reference_at_every_step(name, cache):
    model = tiny_llama(max_position_embeddings=MAX_POSITIONS)
    sa.sparsify(model, plan_of(name))
    ids, am = prompts()
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    out = generate(model, ids, am, 9, **kw)
    assert_steps_equal(out, reference_logits(plan_of(name), out, am), ids.shape[1])


def test_the_plan_changes_what_generation_computes():
    """The comparison above can fail: a dense model's steps differ from the sparse reference."""
    ids, am = prompts()
    out = generate(tiny_llama(max_position_embeddings=MAX_POSITIONS), ids, am, 6)
    ref = reference_logits("all: neighbour(1)", out, am)
    with pytest.raises(AssertionError):
        assert_steps_equal(out, ref, ids.shape[1])


def test_a_stored_mask_refuses_to_generate_beyond_its_length():
    tables = {"ap": ap_table(10)}
    model = tiny_llama(max_position_embeddings=MAX_POSITIONS)
    sa.sparsify(model, Plan.parse("all: static_mask('ap')", tables))
    ids, am = prompts((7, 4))
    generate(model, ids, am, 3)  # positions up to 9 (7 prompt tokens + 3, the last never attends)
    with pytest.raises(ValueError, match=r"static_mask\('ap'\) in layer 0 is stored for 10 positions.*position 10"):
        generate(model, ids, am, 5)


def test_decoding_builds_no_full_mask(monkeypatch):
    """After the prefill, each step computes only its own rows of the plan (a call to a full-mask method after
    the first forward pass fails the test)."""
    model = tiny_llama(max_position_embeddings=MAX_POSITIONS)
    sa.sparsify(model, "all: global_tokens(1) | neighbour(2)")
    calls = {"forward": 0}
    model.register_forward_pre_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    for name in ("allowed", "diagonal"):
        original = getattr(TokenLayout, name)

        def spy(self, _original=original, _name=name):
            if calls["forward"] > 1:
                raise AssertionError(f"TokenLayout.{_name} (L x L) called while decoding")
            return _original(self)
        monkeypatch.setattr(TokenLayout, name, spy)
    ids, am = prompts()
    out = generate(model, ids, am, 5)
    assert calls["forward"] == 5 and len(out.logits) == 5


# -- the evicting cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [(9,), (11, 6)])
def test_sink_window_cache_equals_the_reference_and_stays_small(lengths):
    plan = "all: global_tokens(2) | neighbour(3)"
    model = tiny_llama(max_position_embeddings=MAX_POSITIONS)
    sa.sparsify(model, plan)
    ids, am = prompts(lengths, seed=3)
    cache = sa.generation_cache(model)
    assert (cache.sink, cache.window) == (2, 3)
    sizes = []
    model.register_forward_hook(lambda *a: sizes.append(cache.stored_tokens()))
    out = generate(model, ids, am, 12, **cache_kwarg(model, cache))
    assert_steps_equal(out, reference_logits(plan, out, am), ids.shape[1])
    padding = max(lengths) - min(lengths)
    assert sizes[0] == ids.shape[1]  # the prefill holds the prompt until the next step evicts
    assert max(sizes[1:]) == 2 + padding + 3 + 1  # sink (+ left padding) + window + the new token


def test_sink_window_cache_after_a_chunked_prefill_equals_the_reference():
    """generate(prefill_chunk_size=4) gives the prompt in chunks of 4 columns of the attention mask: the first chunk
    shows no real token of the example padded by 5, whose sink then lies beyond the padding seen so far."""
    plan = "all: global_tokens(2) | neighbour(3)"
    model = tiny_llama(max_position_embeddings=MAX_POSITIONS)
    sa.sparsify(model, plan)
    ids, am = prompts((11, 6), seed=2)
    cache = sa.generation_cache(model)
    out = generate(model, ids, am, 6, prefill_chunk_size=4, **cache_kwarg(model, cache))
    assert_steps_equal(out, reference_logits(plan, out, am), ids.shape[1])
    assert cache.stored_tokens() == 2 + 5 + 3 + 1


def test_sink_window_cache_memory_is_constant_in_the_context_length():
    model = tiny_llama(max_position_embeddings=MAX_POSITIONS)
    sa.sparsify(model, "all: global_tokens(1) | neighbour(2)")
    held = []
    for prompt in (5, 30):
        ids, am = prompts((prompt,))
        cache = sa.generation_cache(model)
        generate(model, ids, am, 20, **cache_kwarg(model, cache))
        held.append(sum(layer.keys.numel() for layer in cache.layers))
    assert held[0] == held[1]


def test_beam_search_with_the_sink_window_cache_equals_it_with_a_dynamic_cache():
    """Beams reorder the cache's rows; every row holds the same slots, so eviction and reordering commute."""
    plan = "all: global_tokens(1) | neighbour(2)"
    model = tiny_llama(max_position_embeddings=MAX_POSITIONS)
    sa.sparsify(model, plan)
    ids, am = prompts((9, 5), seed=3)
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=8, num_beams=3, num_return_sequences=3,
              do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        evicting = model.generate(**kw, **cache_kwarg(model, sa.generation_cache(model)))
        dynamic = model.generate(**kw)
    assert torch.equal(evicting.sequences, dynamic.sequences)
    torch.testing.assert_close(evicting.sequences_scores, dynamic.sequences_scores, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("plan, why", [("all: strided(2)", "layer 0 .* keeps keys at any distance"),
                                       ("layers=0: neighbour(2)", "layer 1 .* is dense"),
                                       ("heads=0-1@all: neighbour(2)", r"layer 0 .* leaves heads \[2, 3\] dense")])
def test_generation_cache_refuses_plans_that_need_old_keys(plan, why):
    model = tiny_llama()
    sa.sparsify(model, plan)
    with pytest.raises(ValueError, match=why):
        sa.generation_cache(model)
    with pytest.raises(ValueError, match="sparsified"):
        sa.generation_cache(tiny_llama())


def test_generation_cache_refuses_an_encoder_naming_its_attention():
    from conftest import tiny_bert

    model = tiny_bert()
    sa.sparsify(model, "all: global_tokens(1) | neighbour(2)")
    with pytest.raises(ValueError, match=r"needs a decoder.*BertSelfAttention .* not causal"):
        sa.generation_cache(model)


def test_sink_window_bounds_of_patterns():
    assert (global_tokens(2) | neighbour(5)).sink_window(True) == (2, 5)
    assert neighbour(3).sink_window(False) is None
    assert (neighbour(3) & strided(2)).sink_window(True) == (0, 3)
    assert (neighbour(3) | strided(2)).sink_window(True) is None


# -- the block backend: prefill through the block kernel, decoding through the decode kernel --------------
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["sink_window", "strided", "ap"])
def test_generation_on_the_block_backend_runs_both_kernels(name, cache):
    """In Triton's interpreter on the CPU (force=True: the kernels run at any length)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs where there is no GPU; the GPU test is below")
    from sparseattn.backends.block import BlockSparseBackend

    model = tiny_llama(max_position_embeddings=MAX_POSITIONS)
    backend = BlockSparseBackend(block_size=32, force=True)
    sa.sparsify(model, plan_of(name), backend=backend)
    ids, am = prompts((9, 5))
    out = generate(model, ids, am, 4, **({"cache_implementation": "static"} if cache == "static" else {}))
    # the prefill through the block kernel (one call per layer; a static cache's too, over its first slots), the
    # three steps after it through the decode kernel
    assert backend.stats["block"] == 2
    assert backend.stats["decode"] == 2 * 3
    assert backend.stats["reference"] == 0
    assert_steps_equal(out, reference_logits(plan_of(name), out, am), ids.shape[1])


def test_a_static_cache_used_again_prefills_through_the_block_kernel():
    """A static cache that held tokens before (emptied by reset(), as a server reuses one; or set up ahead with
    early_initialization) counts its tokens in a tensor even at 0: its next prefill still runs as the full pass it
    is (the block kernel), not as decoding steps over every slot."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs where there is no GPU")
    from transformers import StaticCache

    from sparseattn.backends.block import BlockSparseBackend

    plan = "all: global_tokens(1) | neighbour(2)"
    model = tiny_llama(max_position_embeddings=MAX_POSITIONS)
    backend = BlockSparseBackend(block_size=32, force=True)
    sa.sparsify(model, plan, backend=backend)
    ids, am = prompts((9, 5))
    cache = StaticCache(config=model.config, max_cache_len=24)
    for _ in range(2):
        cache.reset()
        backend.stats.clear()
        out = generate(model, ids, am, 3, **cache_kwarg(model, cache))
        assert (backend.stats["block"], backend.stats["decode"]) == (2, 2 * 2)
        assert_steps_equal(out, reference_logits(plan, out, am), ids.shape[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["sink_window", "strided", "ap", "per_head"])
def test_generation_on_the_gpu_with_the_decode_kernel(name, cache):
    from sparseattn.backends.block import BlockSparseBackend

    model = tiny_llama(max_position_embeddings=MAX_POSITIONS).cuda()
    backend = BlockSparseBackend(block_size=32, force=True)
    sa.sparsify(model, plan_of(name), backend=backend)
    ids, am = (t.cuda() for t in prompts((9, 5)))
    # eager steps (a static cache is compiled by default on the GPU; the test below runs that), so stats count
    out = generate(model, ids, am, 6, **({"cache_implementation": "static", "disable_compile": True}
                                         if cache == "static" else {}))
    assert backend.stats["decode"] == 2 * 5
    ref_model = tiny_llama(max_position_embeddings=MAX_POSITIONS).cuda()
    sa.sparsify(ref_model, plan_of(name))
    seq = out.sequences
    full_am = torch.cat([am, torch.ones(2, seq.shape[1] - am.shape[1], dtype=am.dtype, device="cuda")], 1)
    with torch.no_grad():
        ref = ref_model(input_ids=seq, attention_mask=full_am, position_ids=(full_am.cumsum(-1) - 1).clamp(min=0)).logits
    for t, step in enumerate(out.logits):
        torch.testing.assert_close(step, ref[:, ids.shape[1] - 1 + t], atol=2e-3, rtol=2e-3, msg=f"step {t}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_cache_decoding_captures_under_reduce_overhead():
    """transformers compiles the decoding step of a static cache on the GPU (mode="reduce-overhead": CUDA graphs;
    fullgraph here, so a graph break fails); the decode kernel's step reads nothing back, so it captures, and the
    logits stay the eager ones."""
    from transformers.generation.configuration_utils import CompileConfig

    from sparseattn.backends.block import BlockSparseBackend

    from torch._dynamo.utils import counters

    plan = "all: global_tokens(1) | neighbour(3)"
    ids, am = (t.cuda() for t in prompts((9, 5)))
    outs = []
    torch._dynamo.reset()
    for compiled in (False, True):
        model = tiny_llama(max_position_embeddings=MAX_POSITIONS).cuda()
        sa.sparsify(model, plan, backend=BlockSparseBackend(block_size=32, force=True))
        kw = {"compile_config": CompileConfig(fullgraph=True)} if compiled else {"disable_compile": True}
        graphs = counters["stats"]["unique_graphs"]
        outs.append(generate(model, ids, am, 6, cache_implementation="static", **kw))
        # generate() decides by itself whether to compile the step: the compiled run must have made a graph
        assert not compiled or counters["stats"]["unique_graphs"] > graphs
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_the_generation_path_allocates_nothing_of_context_squared(cache, monkeypatch):
    """Every boolean tensor (a mask) made while generating from a 1100-token prompt on the block backend (prefill
    kernel, decode kernel, in the interpreter) holds fewer than L^2 / 4 elements: no L x L mask on the way. (The tile lists are
    built from slabs of rows of 2^24 pairs, a 4096 x 4096 mask's worth, set to 2^16 here so that the bound shows
    at this length; the position check of the lists looks at 512 tokens, 512^2 < 1100^2 / 4.)"""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs where there is no GPU")
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparseattn.backends.block import BlockSparseBackend

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.bool:
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    from sparseattn.backends.tile_mask import TileMask

    from_rows = TileMask.from_rows.__func__
    monkeypatch.setattr(TileMask, "from_rows", classmethod(lambda cls, *a, **k: from_rows(cls, *a, **k,
                                                                                          slab_pairs=2**16)))
    L = 1100
    model = tiny_llama(max_position_embeddings=L + 8)
    backend = BlockSparseBackend(block_size=64, force=True)
    sa.sparsify(model, "all: global_tokens(1) | neighbour(3)", backend=backend)
    ids, am = prompts((L, L - 37))
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    with Largest():
        generate(model, ids, am, 3, **kw)
    assert backend.stats["block"] == 2 and backend.stats["decode"] == 4
    assert 0 < Largest.largest < L * L // 4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("plan", ["layers=0: global_tokens(1) | neighbour(2)",  # layer 1 dense
                                  "heads=0,3@all: neighbour(1); heads=1@all: strided(2) | global_tokens(1)"])
def test_decoding_through_sdpa_reads_the_cache_heads_in_place(plan, cache, device):
    """Where the decode kernel does not run (a layer the plan leaves dense; short contexts; the CPU), a decoding step
    is SDPA over the plan's rows: the logits of every step equal the reference's (left-padded prompts, grouped-query
    heads; rows shared by the heads, and per-head rows with a dense head among them), and no tensor of the query's
    heads over the whole cache is made (the reference repeats the cache's key/value heads to the query's, a copy of
    the cache per layer and step)."""
    from types import SimpleNamespace

    from torch.utils._python_dispatch import TorchDispatchMode

    from sparseattn.backends.block import BlockSparseBackend

    model = tiny_llama(max_position_embeddings=MAX_POSITIONS).to(device)
    backend = BlockSparseBackend()  # at these lengths the decode kernel does not run on the GPU either
    sa.sparsify(model, plan, backend=backend)
    ids, am = (t.to(device) for t in prompts((9, 5)))
    heads, prompt = model.config.num_attention_heads, ids.shape[1]

    class Repeats(TorchDispatchMode):  # tensors of the query's heads over more keys than the prompt: the cache's
        found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == heads and t.shape[2] > prompt:
                    Repeats.found.append((str(func), tuple(t.shape)))
            return out

    kw = {"cache_implementation": "static"} if cache == "static" else {}
    with Repeats():
        out = generate(model, ids, am, 4, **kw)
    assert backend.stats["reference"] > 0 and backend.stats["decode"] == 0  # the SDPA path ran
    assert not Repeats.found, Repeats.found[:4]
    ref = reference_logits(plan, SimpleNamespace(sequences=out.sequences.cpu()), am.cpu())
    assert_steps_equal(out, ref, ids.shape[1], tol=ATOL if device == "cpu" else 2e-3)


# -- sparseattn bench generate ----------------------------------------------------------------------------
@pytest.mark.parametrize("length", [300, 1000])
def test_the_bench_window_gives_the_target_sparsity(length):
    from sparseattn.bench.generate import window_for

    w = window_for(length, 0.9)
    allowed = length * (length + 1) // 2

    def sparsity(w):  # measured on the pattern's own mask, not by the search's count
        keep = (global_tokens(1) | neighbour(w)).mask(TokenLayout.from_lengths([length], causal=True))
        return 1 - keep.sum().item() / allowed

    assert sparsity(w) >= 0.9 > sparsity(w + 1)  # the largest window at the target, as bench model's plans


def test_bench_generate_runs_on_the_cpu_with_the_tiny_model(tmp_path, capsys):
    import json

    from sparseattn.cli import main

    path = tmp_path / "gen.json"
    assert main(["bench", "generate", "--models", "tiny", "--lengths", "40", "--batches", "2", "--steps", "2",
                 "--repeats", "1", "--methods", "dense,sparse,sparse-evict", "--caches", "dynamic,static",
                 "--device", "cpu", "--json", str(path)]) == 0
    results = json.loads(path.read_text())["results"]
    assert [(r["cache"], r["method"]) for r in results] == [(c, m) for c in ("dynamic", "static")
                                                            for m in ("dense", "sparse", "sparse-evict")]
    for r in results:
        if (r["cache"], r["method"]) == ("static", "sparse-evict"):
            assert r["note"] == "the evicting cache is a dynamic one"
            continue
        assert r["note"] == "" and r["prefill_first_ms"] > 0 and r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0
    evict = next(r for r in results if r["method"] == "sparse-evict")
    sparse = next(r for r in results if r["method"] == "sparse")
    assert evict["cache_gib"] < sparse["cache_gib"]  # the window (w = 2 at 40 tokens) holds fewer keys
    assert "x dense" in capsys.readouterr().out


def test_bench_generate_compiles_the_step_with_sparseattns_hook(monkeypatch):
    """--reduce-overhead compiles the decoding step as transformers does, the model's __call__: its forward alone
    skips sparseattn's forward hook, and every step would run on the previous pass's inputs (the prefill's: an empty
    static cache, so each query attended to the first slot alone, fast and wrong)."""
    from sparseattn.bench import generate as bench
    from sparseattn.integrations import hf

    hook, calls = hf._pre_hook, []
    monkeypatch.setattr(hf, "_pre_hook", lambda *a: calls.append(1) or hook(*a))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # what is compiled is checked, not the compiler
    r = bench.run_one("tiny", 40, 2, "sparse", sparsity=0.9, steps=2, repeats=1, device=torch.device("cpu"),
                      dtype=torch.float32, cache_kind="static", reduce_overhead=True)
    assert r.note == "0 graphs compiled" and r.decode_tokens_per_s > 0  # torch.compile is the identity here
    assert len(calls) == 2 + 3 + 2  # the prefills (first and repeated), the untimed steps, the timed ones


def test_bench_generate_records_a_failing_method_and_goes_on(monkeypatch):
    """A method whose compiler fails (transformers' FlexAttention under reduce-overhead on the CPU, say) is a row
    naming the error, and the other methods of the call still run."""
    from sparseattn.bench import generate as bench

    run_one = bench.run_one

    def flaky(kind, length, batch, method, **kw):
        if method == "flex":
            raise RuntimeError("NoValidChoicesError: No choices to select\nmore")
        return run_one(kind, length, batch, method, **kw)

    monkeypatch.setattr(bench, "run_one", flaky)
    results = bench.run(["tiny"], [24], [1], ["flex", "dense"], steps=1, repeats=1, device="cpu",
                        caches=("static",), reduce_overhead=True, progress=lambda line: None)
    assert results[0].note == "failed: RuntimeError: NoValidChoicesError: No choices to select"
    assert results[0].cache == "static+reduce-overhead" and results[0].decode_tokens_per_s is None
    assert results[1].note.endswith("compiled") and results[1].decode_tokens_per_s > 0
    assert "failed: RuntimeError" in bench.format_table(results)


def test_bench_generate_compiles_each_methods_step_afresh():
    """Under --reduce-overhead every method's step is compiled for itself: Dynamo keys compiled code on Llama's
    forward, shared by every model of a run, so without a reset dense-flash replayed dense's graphs and sparse
    recompiled against a recompile limit that the methods before it had used up."""
    from sparseattn.bench import generate as bench

    results = bench.run(["tiny"], [24], [1], ["dense", "dense-flash", "sparse"], steps=2, repeats=1, device="cpu",
                        caches=("static",), reduce_overhead=True, progress=lambda line: None)
    for r in results:
        graphs = int(r.note.split()[0])
        assert graphs >= 1 and "recompiled" not in r.note, (r.method, r.note)


def test_bench_generate_says_when_a_compiled_step_breaks_or_recompiles():
    """A compiled step's row says how many graphs its warm-up compiled (more than one: graph breaks) and flags
    frames compiled while it was timed (a guard failing at every step: the time is not a steady-state step's)."""
    from sparseattn.bench.generate import _compile_note

    assert _compile_note((4, 2), (5, 3), (5, 3)) == "1 graph compiled"
    assert _compile_note((0, 0), (3, 3), (11, 11)) == ("3 graphs compiled; 8 frames recompiled while timed: not a "
                                                       "steady-state step")


def test_bench_generate_says_when_a_decode_kernel_compiled_while_timed():
    """A decode kernel variant compiled during the timed steps (the fourteenth round's sparse rows: a growing cache
    crossed into a new class of Triton's integer arguments) is flagged in the row, as a Dynamo recompile is."""
    from sparseattn.backends.decode_kernel import compiled_variants
    from sparseattn.bench.generate import _triton_note

    assert _triton_note(3, 3) == ""
    assert _triton_note(1, 2) == "1 decode kernel variant compiled while timed: not a steady-state step"
    assert compiled_variants(torch.device("cpu")) == 0


@pytest.mark.parametrize("plan, evicting", [("all: strided(3) | global_tokens(1)", False),
                                             ("all: bigbird(1, 1, 2)", False),
                                             ("all: random_blocks(1, block=3)", False),
                                             ("all: global_tokens(1) | neighbour(3)", True),
                                             ("all: global_tokens(8) | neighbour(1)", True)])
def test_a_sliding_window_model_generates_under_a_plan(plan, evicting):
    """Mistral's sliding-window cache holds the last keys only: their positions come from the whole 2-D mask, and
    the model's own window mask applies with the plan. (strided and global tokens: the first key of the window is
    not the sequence's first token; random patterns draw among every earlier key, not only those held.) With the
    evicting cache, the model's window mask covers every token seen, and applies to the keys the cache kept; a sink of
    8 keeps every key for a few steps, where the padding is the 2-D mask's, not the window mask's.)"""
    from transformers import MistralConfig, MistralForCausalLM

    def mistral():
        torch.manual_seed(0)
        return MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=64, vocab_size=120,
                                                max_position_embeddings=MAX_POSITIONS, sliding_window=5)).eval()

    model = mistral()
    sa.sparsify(model, plan)
    ids, am = prompts((9, 6))
    out = generate(model, ids, am, 8, **(cache_kwarg(model, sa.generation_cache(model)) if evicting else {}))
    assert out.past_key_values.layers[0].keys.shape[-2] < out.sequences.shape[1] - 1  # not every key
    assert_steps_equal(out, reference_logits(plan, out, am, make_model=mistral), ids.shape[1])


def test_a_sliding_window_model_decodes_without_an_attention_mask():
    """Steps called without a 2-D mask (one unpadded example): the window's keys are the last of the tokens seen,
    whose count the cache holds, so their positions are known without the mask."""
    from transformers import DynamicCache, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=120,
                                             max_position_embeddings=MAX_POSITIONS, sliding_window=5)).eval()
    sa.sparsify(model, "all: strided(3) | global_tokens(2)")
    ids = prompts((9,))[0]
    cache = DynamicCache(config=model.config)
    steps = []
    with torch.no_grad():
        nxt = model(input_ids=ids, use_cache=True, **cache_kwarg(model, cache)).logits[:, -1:].argmax(-1)
        for _ in range(6):
            ids = torch.cat([ids, nxt], 1)
            logits = model(input_ids=nxt, use_cache=True, **cache_kwarg(model, cache)).logits[:, -1]
            steps.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
        whole = model(input_ids=ids).logits
    for t, step in enumerate(steps):
        torch.testing.assert_close(step, whole[:, 9 + t], atol=ATOL, rtol=ATOL, msg=f"step {t}")


def test_a_model_mixing_sliding_and_full_layers_generates_under_a_plan():
    """Qwen2 with a sliding-window layer before a full one: in one decoding step the layers hold different numbers of
    keys (5 and every token seen), so each layer's rows of the plan are its own, not the other layer's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def qwen2():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=120,
                                            max_position_embeddings=MAX_POSITIONS, use_sliding_window=True,
                                            sliding_window=5,
                                            layer_types=["sliding_attention", "full_attention"])).eval()

    plan = "all: strided(3) | global_tokens(1)"
    model = qwen2()
    sa.sparsify(model, plan)
    ids, am = prompts((9, 6))
    out = generate(model, ids, am, 8)
    held = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert held[0] < held[1] == out.sequences.shape[1] - 1
    assert_steps_equal(out, reference_logits(plan, out, am, make_model=qwen2), ids.shape[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pytest.mark.parametrize("name", ["sink_window", "ap", "random", "random_blocks"])
def test_a_static_cache_decoding_step_traces_whole(name, device):
    """A static cache's decoding step under torch.compile(fullgraph=True), compiled as transformers compiles it (the
    model's __call__, sparseattn's forward hook included), called without an attention mask (the slots row is then
    made inside the graph, a tensor Dynamo has no source for): no graph break from the hook to the decode kernel,
    so nothing is read back from the device (what CUDA graph capture needs), with the eager step's logits, which
    are the reference's. (backend="eager": Dynamo's tracing is what is checked; the GPU test of generate() runs
    reduce-overhead. On the GPU the decode kernel is compiled, and Dynamo is the device image's version.)"""
    pytest.importorskip("triton")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the interpreter runs where there is no GPU")
    from types import SimpleNamespace

    from transformers import StaticCache

    from sparseattn.backends.block import BlockSparseBackend

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 120, (2, 9), generator=g).to(device)
    tol = ATOL if device == "cpu" else 2e-3
    logits, tokens = [], []
    for compiled in (False, True):
        model = tiny_llama(max_position_embeddings=MAX_POSITIONS).to(device)
        sa.sparsify(model, plan_of(name), backend=BlockSparseBackend(block_size=32, force=True))
        cache = StaticCache(config=model.config, max_cache_len=32)
        step = torch.compile(model.__call__, fullgraph=True, backend="eager") if compiled else model
        with torch.no_grad():
            nxt = model(input_ids=ids, use_cache=True, **cache_kwarg(model, cache)).logits[:, -1:].argmax(-1)
            for i in range(3):
                tokens.append(nxt.cpu())
                out = step(input_ids=nxt, use_cache=True, position_ids=torch.full((2, 1), 9 + i, device=device),
                           **cache_kwarg(model, cache))
                logits.append(out.logits.cpu())
                nxt = out.logits[:, -1:].argmax(-1)
    for eager, traced in zip(logits[:3], logits[3:]):
        torch.testing.assert_close(traced, eager, atol=tol, rtol=tol)
    whole = SimpleNamespace(sequences=torch.cat([ids.cpu(), *tokens[:3]], 1))
    ref = reference_logits(plan_of(name), whole, torch.ones_like(ids.cpu()))
    for i, eager in enumerate(logits[:3]):
        torch.testing.assert_close(eager[:, -1], ref[:, 9 + i], atol=tol, rtol=tol, msg=f"step {i}")


def test_bench_generate_takes_speedups_over_the_fastest_dense_method_too():
    """"x dense" is over transformers' SDPA as PyTorch dispatches it; "x best" over the fastest of the dense methods
    of the same cell (SDPA kept off cuDNN, FlexAttention), each quantity on its own."""
    from sparseattn.bench.generate import GenerateResult, format_table

    def row(method, first, prefill, decode):
        return GenerateResult("1b", 32768, 16, method, None, prefill_first_ms=first, prefill_ms=prefill,
                              decode_tokens_per_s=decode)

    table = format_table([row("dense", 400.0, 300.0, 100.0), row("dense-flash", 500.0, 200.0, 50.0),
                          row("flex", None, None, 200.0), row("sparse", 100.0, 100.0, 400.0)])
    sparse = table.splitlines()[-1].split()
    # prefill 1st: 4.00 over dense, 4.00 over the best (dense's 400); prefill: 3.00 and 2.00 (dense-flash's 200);
    # decode: 4.00 over dense, 2.00 over the best (flex's 200)
    assert sparse[5:14] == ["100.0", "4.00", "4.00", "100.0", "3.00", "2.00", "400.0", "4.00", "2.00"]
