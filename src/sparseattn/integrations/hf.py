"""Run Hugging Face models under a plan, through transformers' attention interface.

``sparsify(model, plan)`` registers an attention function (and the mask function that hands it a full
boolean padding/causal mask) under the name ``sparseattn``, switches the model to it, and tags every
self-attention module with the layer's plan. A forward pre-hook on the model takes the optional
``sparse_structure`` input (made by ``sparseattn.encode``) out of the call and keeps the batch's layout
for the layers. ``unsparsify(model)`` undoes all of it.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch

from ..backends import Backend, get_backend
from ..backends.base import AttentionCall
from ..layout import TokenLayout
from ..models import text_config
from ..plans.io import as_plan
from ..plans.plan import LayerPlan, Plan

log = logging.getLogger("sparseattn")

ATTN_NAME = "sparseattn"
DENSE_ATTN_NAME = "sparseattn_sdpa"  # transformers' SDPA attention with sparseattn's mask choices (use_dense_sdpa)
STRUCTURE_KWARG = "sparse_structure"
BATCH_KWARG = "sparseattn_batch"  # the pre-hook's per-call context, passed down to the attention layers
_registered = False
# transformers.masking_utils and its SDPA attention, bound by _register(): the mask and attention functions run
# inside torch.compile's trace, where dynamo cannot follow an import through transformers' lazy modules.
_mu = None
_sdpa_attention = None


class UnsupportedModelError(TypeError):
    """The model cannot be sparsified; the message names what is missing."""


ATTN_NAME_FULL_MASK = "sparseattn_full_mask"


def _mask_function(*args, **kwargs):
    """transformers' SDPA mask with its own choices: no mask at all (None) for a batch without padding whose
    mask would be plain causal or plain bidirectional. The layout then rebuilds that structure from the
    attention module's ``is_causal``, so the L x L boolean mask is never materialized for such batches
    (at 16k tokens it is 256 MiB per example); used when every sparsified module declares ``is_causal``.

    Some transformers versions never skip the mask during CUDA graph capture or under torch.compile (with
    torch before 2.14, dynamo reads torch.compiler.is_exporting() as True), even for a batch that came
    without any padding mask (nothing to read from the GPU): the materialized mask then sends SDPA off its
    fast kernels and the block backend off its sync-free path. Such a call is skipped here, where it is
    plainly bidirectional or plainly causal over equal lengths, as transformers does outside capture and
    compile."""
    mu = _mu
    if (not args and kwargs.get("attention_mask") is None and kwargs.get("local_size") is None
            and (torch.compiler.is_compiling()
                 or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))):
        fn = kwargs.get("mask_function", mu.causal_mask_function)
        q_len, kv_len, q_offset = kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("q_offset", 0)
        if fn is getattr(mu, "bidirectional_mask_function", None) and kwargs.get("allow_is_bidirectional_skip"):
            return None
        if (fn is mu.causal_mask_function and kwargs.get("allow_is_causal_skip", True) and q_len == kv_len
                and isinstance(q_offset, int) and q_offset == 0 and kwargs.get("kv_offset", 0) == 0):
            return None
    return mu.sdpa_mask(*args, **kwargs)


def _closure(fn) -> dict:
    """A function's free variables by name (empty for one without a closure)."""
    code = getattr(fn, "__code__", None)
    return dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ()))) if code else {}


def _named(fn, factory: str) -> bool:
    return getattr(fn, "__qualname__", "").startswith(f"{factory}.<locals>.")


def _plain(fn) -> bool:
    return fn is _mu.causal_mask_function or fn is getattr(_mu, "bidirectional_mask_function", None)


def _packed_plain(fn) -> bool:
    """Whether ``fn`` is transformers' mask for packed rows it found from position_ids (a batch without a 2-D mask
    or a cache): plain causality or none, by positions (``remap_positions_for_packed_sequence``, where the version
    has it), and within documents (``packed_sequence_mask_function``). Its documents are the layout's: both split
    the rows where the positions do not go up by one (``TokenLayout.from_position_ids``). False under
    torch.compile: dynamo cannot read a closure made in its trace, and transformers makes this mask function there
    for every batch without a cache (it cannot tell one document from several while tracing), so the mask is made."""
    if torch.compiler.is_compiling() or not _named(fn, "and_masks"):
        return False
    parts = _closure(fn).get("mask_functions", ())
    if len(parts) != 2 or not _named(parts[1], "packed_sequence_mask_function"):
        return False
    base = parts[0]
    if _named(base, "remap_positions_for_packed_sequence"):
        base = _closure(base).get("mask_function")
    return _plain(base)


def _layout_mask_function(*args, **kwargs):
    """The mask function of the ``sparseattn`` attention: no mask (None) wherever the model's mask would be plain
    padding and causality (or none) over a full forward pass, since the batch's layout holds exactly that (from
    the 2-D attention mask, and the modules' ``is_causal``): nothing L x L is made, and nothing is read back from
    the GPU to compare it with the layout. So too for packed rows transformers found from position_ids: the layout
    holds their documents (``_packed_plain``). The same for incremental decoding with a dynamic KV cache under the
    plain causal mask: the layout knows the padding from the 2-D attention mask over every token seen, so
    transformers' (B, 1, Lq, Lk) mask is not made either; a static cache gets one (B, 1, 1, Lk) row of the slots
    holding tokens. Other masks (sliding windows, chunked or custom mask functions) are materialized as
    transformers makes them."""
    mu = _mu
    fn = kwargs.get("mask_function", mu.causal_mask_function)
    am = kwargs.get("attention_mask")
    plain = _plain(fn) or (am is None and _packed_plain(fn))
    q_len, kv_len, q_offset = kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("q_offset", 0)
    if (not args and plain and kwargs.get("local_size") is None and q_len is not None and q_len == kv_len
            and isinstance(q_offset, int) and q_offset == 0 and kwargs.get("kv_offset", 0) == 0
            and (am is None or (am.dim() == 2 and am.shape[1] == kv_len))):
        return None
    if (not args and fn is mu.causal_mask_function and kwargs.get("local_size") is None and q_len is not None
            and isinstance(q_offset, int) and kv_len == q_offset + q_len and kwargs.get("kv_offset", 0) == 0
            and (am is None or (am.dim() == 2 and am.shape[1] == kv_len))):
        # incremental, plain causal, keys = every token seen (a dynamic cache, or sparseattn's evicting cache,
        # which reports its sizes so): the layout holds it (see _kv_layout)
        return None
    if (not args and fn is mu.causal_mask_function and kwargs.get("local_size") is None and q_len is not None
            and kwargs.get("kv_offset", 0) == 0 and kv_len is not None
            and (am is None or (am.dim() == 2 and am.shape[1] <= kv_len))):
        # A cache of fixed slots (static): one (B, 1, 1, kv_len) row, the slots that hold real tokens up to the
        # last query, instead of transformers' (B, 1, Lq, kv_len) mask (L x max_cache_len at the prefill). The
        # layout takes the padding from it and the queries' positions from the cache; the plan's rows are causal.
        # generate() turns the 2-D mask into this before the forward pass, so the row is the only padding the
        # layers get.
        device = am.device if am is not None else kwargs.get("device", "cpu")
        slots = torch.arange(kv_len, device=device)
        held = slots < q_offset + q_len
        if am is not None:
            held = held & torch.nn.functional.pad(am.bool(), (0, kv_len - am.shape[1]), value=False)
        else:
            held = held[None].expand(kwargs.get("batch_size", 1), kv_len)
        return held[:, None, None, :]
    return _mask_function(*args, **kwargs)


def _full_mask_function(*args, **kwargs):
    """transformers' SDPA mask, always materialized: for models whose attention modules do not say whether
    they are causal, the padding and causal structure must come from the mask itself."""
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return _mu.sdpa_mask(*args, **kwargs)


def _register() -> None:
    global _registered, _mu, _sdpa_attention
    if _registered:
        return
    import transformers.masking_utils
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    _mu, _sdpa_attention = transformers.masking_utils, sdpa_attention_forward

    for name, mask_fn in ((ATTN_NAME, _layout_mask_function), (ATTN_NAME_FULL_MASK, _full_mask_function)):
        AttentionInterface.register(name, _attention_forward)
        AttentionMaskInterface.register(name, mask_fn)
    AttentionInterface.register(DENSE_ATTN_NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(DENSE_ATTN_NAME, _mask_function)
    _registered = True


def use_dense_sdpa(model) -> None:
    """Switch a (not sparsified) model to transformers' own SDPA attention with the mask choices of
    ``_mask_function``: the same computation as attn_implementation="sdpa", but a batch given without an
    attention mask runs mask-free under torch.compile and CUDA graph capture too, where transformers may make
    the full L x L mask and send SDPA off its flash kernel (a fair dense baseline there)."""
    _register()
    model.set_attn_implementation(DENSE_ATTN_NAME)


@dataclass
class _State:
    """Per-model state shared by its attention modules."""

    layer_plans: list[LayerPlan]
    backend: Backend
    plan: Plan
    special_ids: torch.Tensor | None
    embeddings: torch.nn.Module | None
    original_impl: str | None
    hooks: list = field(default_factory=list)
    batch: dict = field(default_factory=dict)  # inputs of the latest forward pass (fallback, see _pre_hook)
    open_passes: int = 0  # eager calls of the model under way (between its pre- and post-hook)
    kwargs_reach_attention: bool = False  # whether the model's forward passes **kwargs down to attention
    max_positions: int | None = None
    modules: list = field(default_factory=list)

    def __getstate__(self):
        # a pickled or copied model leaves the latest pass behind (its tensors, a closure over the embeddings)
        return {**self.__dict__, "batch": {}, "open_passes": 0}

    def __setstate__(self, state):
        # unpickled in a fresh process, the model's attention implementation must exist before it runs
        self.__dict__.update(state)
        _register()


def _attention_modules(model: torch.nn.Module):
    """Self-attention modules that dispatch through transformers' attention interface."""
    found, cross = [], []
    seen_classes: dict[type, bool] = {}
    for name, m in model.named_modules():
        cls = type(m)
        if cls not in seen_classes:
            try:
                src = inspect.getsource(cls.forward)
            except (OSError, TypeError):
                src = ""
            seen_classes[cls] = "ALL_ATTENTION_FUNCTIONS" in src
        if not seen_classes[cls]:
            continue
        if "Cross" in cls.__name__ or getattr(m, "is_cross_attention", False):
            cross.append((name, m))
        else:
            found.append((name, m))
    return found, cross


def compile_outside_attention(model: torch.nn.Module, **compile_kwargs) -> list[str]:
    """``Module.compile(**compile_kwargs)``, in place, on every largest submodule that holds no attention module
    and has parameters (for BERT: the embeddings, each layer's attention output, intermediate and output
    blocks, the pooler and the head); returns their names. The attention modules (their projections and the
    attention itself) run as they are, whatever backend they use, so the block backend needs no graph
    break and a dense and a sparsified model compile exactly the same code. Works before or after
    ``sparsify``; parameter names and state dicts are unchanged. With the block backend's Triton kernel,
    ``torch.compile(model)`` traces the whole sparsified model (the kernel is an operator) and needs none of this;
    it serves attention that breaks the graph (FlexAttention's layouts made per batch, the reference backend's
    input-dependent patterns)."""
    found, cross = _attention_modules(model)
    attention = {id(m) for _, m in found + cross}
    compiled = []

    def visit(module, prefix):
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if id(child) in attention:
                continue
            if any(id(m) in attention for m in child.modules()):
                visit(child, path + ".")
            elif next(child.parameters(), None) is not None:
                child.compile(**compile_kwargs)
                compiled.append(path)

    visit(model, "")
    return compiled


def sparsify(model, plan: Plan | str, backend: str | Backend = "reference", *, tokenizer=None):
    """Run ``model`` under ``plan`` (a Plan, a spec string, or a saved plan's path). In place; returns the model.

    backend: "reference" (exact masked softmax through SDPA, any device) or another registered backend.
    tokenizer: lets patterns that need special tokens (global_tokens('special'), syntax's special='global')
        find them from input_ids when inputs do not come from ``sparseattn.encode``.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise UnsupportedModelError(f"sparsify needs a transformers PreTrainedModel, got {type(model).__name__}")
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not support transformers' AttentionInterface "
            "(its _supports_attention_backend is False), so its attention cannot be routed to sparseattn")
    if getattr(model, "_sparseattn", None) is not None:
        unsparsify(model)
    plan = as_plan(plan)
    cfg = text_config(model)
    for attr in ("num_hidden_layers", "num_attention_heads"):
        if not hasattr(cfg, attr):
            raise UnsupportedModelError(f"{type(model).__name__}'s config has no {attr}; sparseattn needs it")
    num_layers, num_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    layer_plans = plan.resolve(num_layers, num_heads)

    modules, cross = _attention_modules(model)
    if not modules:
        raise UnsupportedModelError(f"found no self-attention module in {type(model).__name__} that dispatches through "
                                    "transformers' ALL_ATTENTION_FUNCTIONS")
    idx = [getattr(m, "layer_idx", None) for _, m in modules]
    if not all(isinstance(li, int) for li in idx):
        # Some architectures (DistilBERT, ALBERT) do not number their attention modules; one module per layer,
        # in the order the model holds them, is the layer order.
        if any(isinstance(li, int) for li in idx) or len(modules) != num_layers:
            name, m = next((n, m) for (n, m), li in zip(modules, idx) if not isinstance(li, int))
            raise UnsupportedModelError(
                f"attention module {name} ({type(m).__name__}) has no integer layer_idx and the model's "
                f"{len(modules)} attention modules do not map one-to-one onto its {num_layers} layers")
        idx = list(range(num_layers))
    if sorted(idx) != list(range(num_layers)):
        raise UnsupportedModelError(f"expected one self-attention module per layer 0-{num_layers - 1}, found layer "
                                    f"indices {sorted(idx)}")
    for (_, m), li in zip(modules, idx):
        m._sparseattn_layer = li

    _register()
    special_ids = None
    if tokenizer is not None:
        special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    state = _State(layer_plans=layer_plans, backend=get_backend(backend), plan=plan, special_ids=special_ids,
                   embeddings=model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None,
                   original_impl=getattr(model.config, "_attn_implementation", None),
                   max_positions=_max_positions(model, cfg))
    for _, m in modules:
        m._sparseattn_state = state
        state.modules.append(m)
    for _, m in cross:
        m._sparseattn_dense = True  # cross-attention stays dense
        state.modules.append(m)
    state.kwargs_reach_attention = any(p.kind is inspect.Parameter.VAR_KEYWORD
                                       for p in inspect.signature(model.forward).parameters.values())
    state.hooks.append(model.register_forward_pre_hook(_pre_hook, with_kwargs=True))
    state.hooks.append(model.register_forward_hook(_post_hook, always_call=True))
    model._sparseattn = state
    if hasattr(state.backend, "prepare"):  # e.g. the block backend chooses its tile and registers tile lists
        state.backend.prepare(layer_plans, head_dim=head_dim(cfg))
    # Where every sparsified module says whether it is causal, transformers may skip the mask of unpadded
    # batches (the layout knows their structure); otherwise the mask is always materialized.
    declared = all(isinstance(getattr(m, "is_causal", None), bool) for _, m in modules)
    model.set_attn_implementation(ATTN_NAME if declared else ATTN_NAME_FULL_MASK)
    return model


def head_dim(cfg) -> int | None:
    """The attention heads' size from the config (``head_dim``, else hidden_size / heads), None if it says neither."""
    d = getattr(cfg, "head_dim", None)
    if isinstance(d, int) and d > 0:
        return d
    hidden = getattr(cfg, "hidden_size", None)
    return hidden // cfg.num_attention_heads if isinstance(hidden, int) and hidden > 0 else None


def _max_positions(model, cfg) -> int | None:
    """How many tokens the model can take. RoBERTa-style embeddings number positions from
    padding_idx + 1, so they take padding_idx + 1 fewer than max_position_embeddings."""
    n = getattr(cfg, "max_position_embeddings", None)
    if n is None:
        return None
    emb = getattr(getattr(model, "base_model", model), "embeddings", None)
    offset = getattr(emb, "padding_idx", None)
    if isinstance(offset, int) and hasattr(emb, "create_position_ids_from_inputs_embeds"):
        n -= offset + 1
    return n


def unsparsify(model):
    """Undo ``sparsify``: the model's original attention implementation, no hooks, no tags."""
    state = getattr(model, "_sparseattn", None)
    if state is None:
        return model
    for h in state.hooks:
        h.remove()
    for m in state.modules:
        for attr in ("_sparseattn_state", "_sparseattn_dense", "_sparseattn_layer", "_sparseattn_batch_arrives"):
            if hasattr(m, attr):
                delattr(m, attr)
    model._sparseattn = None
    model.set_attn_implementation(state.original_impl or "sdpa")
    return model


def plan_of(model) -> Plan | None:
    state = getattr(model, "_sparseattn", None)
    return state.plan if state is not None else None


def _pre_hook(model, args, kwargs):
    state: _State = model._sparseattn
    if not torch.compiler.is_compiling():  # traced, the count would be a guarded constant: a recompile each call
        state.open_passes += 1
    structure = kwargs.pop(STRUCTURE_KWARG, None)
    input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    kv_cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.2x names it cache
    seen = kv_cache.get_seq_length() if kv_cache is not None and hasattr(kv_cache, "get_seq_length") else 0
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if isinstance(seen, torch.Tensor):  # a static cache's own counter, which its update() advances in place
        seen = seen.clone()
        if ref is not None and ref.shape[1] > 1 and not _tracing(seen):
            # a prefill (eager): one read, so that an emptied cache's first pass runs as the full pass it is
            # (_query_offset 0); a decoding step keeps the count on the device, for torch.compile and capture
            seen = int(seen)
    if _evicts(kv_cache) and kv_cache.padding_open:
        # the prompt's left padding precedes the sink: keep it (one read at the prefill; one per chunk of a chunked
        # prefill while an example has shown no real token)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            padding = int((attention_mask.long().cumsum(-1) == 0).sum(-1).max())
            kv_cache.set_left_padding(padding, attention_mask.shape[1])
        else:
            kv_cache.set_left_padding(0, 1)  # no mask: no padding
    if ref is not None:
        L = ref.shape[1]
        if L == 0:
            raise ValueError("the input has no tokens; every example needs at least one")
        # packed rows number positions per document (position_ids), so a row may outgrow the model's positions
        packed = kwargs.get("position_ids") is not None or kwargs.get("cu_seq_lens_q") is not None
        # a static cache counts its tokens on the device: comparing would read it back (a sync each step)
        if state.max_positions and isinstance(seen, int) and L + seen > state.max_positions and not packed:
            raise ValueError(f"the input has {L + seen} tokens but {type(model).__name__} supports at most "
                             f"{state.max_positions} (max_position_embeddings, less any position offset); truncate it explicitly")
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "structure": structure, "cache": {},
             "position_ids": kwargs.get("position_ids"), "cu_seqlens": kwargs.get("cu_seq_lens_q"),
             "kv_cache": kv_cache, "seen": seen}
    if not state.kwargs_reach_attention:  # a model without **kwargs would refuse it; the layout carries it
        kwargs.pop("cu_seq_lens_q", None)
    state.batch = batch
    if state.kwargs_reach_attention:
        # The batch travels with the call's kwargs into every attention layer, so gradient checkpointing,
        # which saves and replays a layer's kwargs, recomputes a layer with its own batch even when other
        # forward passes ran in between. Models that drop kwargs on the way use state.batch instead.
        kwargs[BATCH_KWARG] = batch
    return args, kwargs


def _post_hook(model, args, output):
    state: _State = model._sparseattn
    if not torch.compiler.is_compiling():
        state.open_passes = max(0, state.open_passes - 1)


def _outside_the_model(state: _State) -> bool:
    """Whether an attention layer runs eagerly outside any call of the sparsified model (its ``forward()`` or a
    submodule called directly): the pre-hook did not see the pass's inputs, so the layer would use another
    pass's padding and documents. Recomputation in the backward (gradient checkpointing) replays a pass that
    was seen."""
    return (not torch.compiler.is_compiling() and state.open_passes == 0
            and torch._C._current_graph_task_id() == -1)


def _tracing(t: torch.Tensor) -> bool:
    """Whether torch.compile traces or a CUDA graph captures, where nothing may be read back from ``t``."""
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _query_offset(batch: dict, q_len: int, kv_len: int):
    """The index among the keys of the call's first query: None for the last q_len keys (a full pass, a dynamic
    cache, a cache that evicts); the tokens seen before this pass for a cache of fixed slots (a static cache,
    whose keys beyond them are empty slots). Read from the cache before the pass (``_pre_hook``), so no GPU
    value is read back."""
    cache = batch.get("kv_cache")
    if cache is None or kv_len == q_len and not isinstance(batch.get("seen"), torch.Tensor):
        return None
    if getattr(cache, "is_compileable", False) and not _evicts(cache):
        if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
            # a static sliding-window layer rolls its slots: where the queries sit is not the tokens seen
            raise ValueError(f"{type(cache).__name__} has sliding-window layers, whose slots roll; sparseattn "
                             "decodes with dynamic caches, static caches without sliding layers, and "
                             "sparseattn.generation_cache")
        return batch.get("seen", 0)
    return None


def _evicts(cache) -> bool:
    """Whether ``cache`` is sparseattn's evicting cache (``generation.SinkWindowCache``), told by a class flag: no
    import here (that module imports transformers' caches, which ``import sparseattn`` does not)."""
    return getattr(cache, "sparseattn_evicts", False)


def _kv_layout(batch: dict, am, kv_len: int, q_len: int, q_offset, device):
    """(real, given positions or None) over the kv_len keys of a call whose 2-D attention mask ``am`` (or None)
    covers every token seen, past and present: the same slots (a full pass, a dynamic cache), more slots than
    tokens (a static cache: the rest are empty), or fewer (a cache that evicted keys: its slot table says which
    tokens it kept; another cache keeps the last kv_len)."""
    cache = batch.get("kv_cache")
    seen_now = None if am is None else am.shape[1]
    if am is None:
        if q_offset is None and not _evicts(cache):
            return torch.ones(1, kv_len, dtype=torch.bool, device=device), None
        if q_offset is not None:  # a static cache: slots up to the last query hold tokens
            return (torch.arange(kv_len, device=device) < q_offset + q_len)[None], None
    am = am.to(device=device).bool() if am is not None else None
    if am is not None and seen_now == kv_len:
        return am, None
    if am is not None and seen_now < kv_len:
        return torch.nn.functional.pad(am, (0, kv_len - seen_now), value=False), None
    # fewer slots than tokens seen: which tokens the slots hold
    if _evicts(cache):
        slots = cache.slots(kv_len, device)
    else:
        slots = torch.arange(seen_now - kv_len, seen_now, device=device)
    if am is None:
        return torch.ones(1, kv_len, dtype=torch.bool, device=device), slots[None].clone()
    positions = am.long().cumsum(-1) - 1
    real = am[:, slots]
    return real, torch.where(real, positions[:, slots], torch.full_like(positions[:, slots], -1))


def _layout_for(module, state: _State, batch: dict, model_mask: torch.Tensor | None, batch_size: int, kv_len: int,
                device, q_len: int | None = None, q_offset=None) -> TokenLayout:
    key = ("layout", kv_len, bool(getattr(module, "is_causal", False)))
    if key in batch["cache"]:
        return batch["cache"][key]
    am = batch.get("attention_mask")
    given_positions = None
    q_len = kv_len if q_len is None else q_len
    am2 = am if isinstance(am, torch.Tensor) and am.dim() == 2 else None
    seen = batch.get("seen")
    if am2 is None and isinstance(seen, int) and seen + q_len > kv_len:
        # no 2-D mask, so no padding: a cache over fewer slots than the tokens seen (a sliding window) holds the
        # last of them, whose positions the count of tokens seen gives
        am2 = torch.ones(batch_size, seen + q_len, dtype=torch.bool, device=device)
    if am2 is not None and am2.shape[1] == kv_len:
        real = am2.to(device=device).bool()
    elif (am2 is not None and am2.shape[1] > kv_len) or (
            model_mask is None and (q_len != kv_len or q_offset is not None or batch.get("kv_cache") is not None)):
        # keys over fewer slots than tokens seen (an evicting or sliding-window cache) take their positions from
        # the whole 2-D mask, whatever mask the model made; so do calls that came without one
        real, given_positions = _kv_layout(batch, am2, kv_len, q_len, q_offset, device)
        real = real.expand(batch_size, kv_len)
        if given_positions is not None:
            given_positions = given_positions.expand(batch_size, kv_len)
    elif model_mask is not None:
        real = model_mask.any(dim=-2)[:, 0] if model_mask.shape[1] == 1 else model_mask.any(dim=-2).any(dim=1)
    else:  # no padding information at all: every token is real
        real = torch.ones(batch_size, kv_len, dtype=torch.bool, device=device)
    unpadded = am is None and model_mask is None and q_offset is None and not _evicts(batch.get("kv_cache"))
    packed = _packed(batch, real, kv_len, am) if given_positions is None else None
    structure = batch.get("structure")
    input_ids = batch.get("input_ids")
    if input_ids is not None and input_ids.shape[1] != kv_len:
        input_ids = None  # generation with a cache: the ids of past tokens are not at hand
    special = None
    if structure is not None:
        if structure.word_ids.shape[1] != kv_len:
            raise ValueError(f"sparse_structure covers {structure.word_ids.shape[1]} tokens but attention runs over "
                             f"{kv_len}; input-dependent patterns do not support incremental decoding")
        structure = structure.to(device) if structure.word_ids.device != device else structure
        special = real & (structure.word_ids < 0)
    elif input_ids is not None and state.special_ids is not None:
        if state.special_ids.device != device:  # move once: a host-to-device copy each pass would sync the stream
            state.special_ids = state.special_ids.to(device)
        special = real & torch.isin(input_ids.to(device), state.special_ids)
    vectors = None
    if input_ids is not None and state.embeddings is not None:
        emb, ids = state.embeddings, input_ids

        def vectors():
            with torch.no_grad():
                return emb(ids.to(device)).float()
    docs = packed is not None
    layout = TokenLayout(real=real & packed.real if docs else real, special=special, structure=structure,
                         input_ids=input_ids, token_vectors=vectors, causal=bool(getattr(module, "is_causal", False)),
                         unpadded=unpadded and not docs, document_ids=packed.document_ids if docs else None,
                         documents=packed.documents if docs else None, given_positions=given_positions)
    batch["cache"][key] = layout
    return layout


def _packed(batch: dict, real: torch.Tensor, kv_len: int, attention_mask) -> TokenLayout | None:
    """Packed rows (several documents in one row, as transformers' flattening collator makes them): from
    ``cu_seq_lens_q`` (document offsets over the flattened batch), or from ``position_ids`` restarting at 0 in a
    batch without an attention mask (as transformers reads them). None for rows that are one sequence each."""
    B = real.shape[0]
    cu = batch.get("cu_seqlens")
    if isinstance(cu, torch.Tensor) and (B * kv_len) >= int(cu.shape[0]) - 1 >= 1:
        return TokenLayout.from_cu_seqlens(cu.to(real.device), B, kv_len)
    pos = batch.get("position_ids")
    if attention_mask is None and isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[1] == kv_len:
        return TokenLayout.from_position_ids(pos.to(real.device).expand(B, kv_len))
    return None


def _wants_weights(module, kwargs) -> bool:
    """Whether the model collects attention probabilities: transformers passes output_attentions down only
    when the call names it; a model loaded with output_attentions=True has it in its config instead."""
    if "output_attentions" in kwargs:
        return bool(kwargs["output_attentions"])
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def _attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The function registered as attn_implementation='sparseattn'."""
    if getattr(module, "_sparseattn_dense", False):
        return _sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    state: _State | None = getattr(module, "_sparseattn_state", None)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} runs with attn_implementation='sparseattn' but was not "
                           "sparsified; call sparseattn.sparsify(model, plan)")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2  # additive -> boolean
    batch = kwargs.pop(BATCH_KWARG, None)
    if batch is not None:
        if not torch.compiler.is_compiling() and not module.__dict__.get("_sparseattn_batch_arrives"):
            module._sparseattn_batch_arrives = True  # from now on its absence means the hook was skipped
    elif getattr(module, "_sparseattn_batch_arrives", False) or _outside_the_model(state):
        raise RuntimeError(
            f"{type(module).__name__} of layer {module._sparseattn_layer} ran outside a call of the model given to "
            "sparseattn.sparsify(): sparseattn reads each pass's inputs (padding, packed documents, the KV cache) "
            "in that model's forward hook, which model.forward(), torch.compile(model.forward) and calls of its "
            "submodules skip (so do wrappers that call model.forward()). Call the model itself (or "
            "torch.compile(model))")
    else:
        batch = state.batch
    if not batch:
        batch = state.batch = {"input_ids": None, "attention_mask": None, "structure": None, "cache": {}}
    kv_len, q_len = key.shape[2], query.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] > kv_len and _evicts(batch.get("kv_cache")):
        # the model's own mask (a sliding window) covers every token seen; the keys are the slots the cache kept
        attention_mask = attention_mask.index_select(-1, batch["kv_cache"].slots(kv_len, attention_mask.device))
    q_offset = _query_offset(batch, q_len, kv_len)
    layout = _layout_for(module, state, batch, attention_mask, query.shape[0], kv_len, query.device, q_len, q_offset)
    call = AttentionCall(
        query=query, key=key, value=value, layer_plan=state.layer_plans[module._sparseattn_layer], layout=layout,
        model_mask=attention_mask, scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        dropout_p=dropout, cache=batch["cache"], need_weights=_wants_weights(module, kwargs), q_offset=q_offset)
    out, weights = state.backend.attention(call)
    return out.transpose(1, 2).contiguous(), weights
