"""A KV cache that keeps only the keys a plan can still attend to: sink + window plans.

Under a causal plan whose every head keeps no key outside the first ``sink`` positions and the last ``window``
before the query (``global_tokens(s) | neighbour(w)``, declared by ``Pattern.sink_window``), a key at position j
is dead once the next query is past j + window: no later query keeps it. ``SinkWindowCache`` drops dead keys,
so its size stays sink + window + (new tokens) whatever the context length. Keys are stored as the model made
them (rotated by RoPE at their own positions), so keeping a subset keeps them valid; the attention layers map
the cache's slots back to absolute positions (``SinkWindowCache.slots``) and apply the plan there.

    cache = sa.generation_cache(model)                  # for a model sparsified under a sink + window plan
    model.generate(**inputs, cache=cache, max_new_tokens=...)   # past_key_values=cache before transformers 5.2x
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SinkWindowLayer(DynamicLayer):
    """One layer's keys and values: the first ``head`` slots of the sequence and the last ``window`` before the
    current tokens, plus the current tokens. ``seen`` counts every token the layer was given."""

    def __init__(self, head: int, window: int):
        super().__init__()
        self.head, self.window = head, window
        self.seen = 0
        self.tail_first = 0  # the slot (index among all tokens seen) of the first key kept after the head

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # The keys held are the slots [0, min(head, tail_first)) and [tail_first, seen). Evict before appending:
        # this step's queries start at slot `seen` and look back `window` slots (left padding only precedes the
        # prompt, so an example's slots and positions differ by a constant).
        stored = self.keys.shape[-2] if self.keys.numel() else 0
        if stored:
            new_first = max(self.tail_first, self.seen - self.window)
            if new_first > self.tail_first:
                h_old, h_new = min(self.head, self.tail_first), min(self.head, new_first)
                cut = h_old + (new_first - self.tail_first)  # index of slot new_first among the keys held
                if cut > h_new:
                    self.keys = torch.cat([self.keys[..., :h_new, :], self.keys[..., cut:, :]], dim=-2)
                    self.values = torch.cat([self.values[..., :h_new, :], self.values[..., cut:, :]], dim=-2)
                self.tail_first = new_first
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        else:
            self.keys, self.values, self.tail_first = key_states, value_states, 0
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def slots(self, device) -> torch.Tensor:
        """(stored,) int64: the slot of each stored key among all the tokens seen."""
        stored = self.keys.shape[-2]
        n_head = min(self.head, self.tail_first)
        return torch.cat([torch.arange(n_head, device=device),
                          torch.arange(self.tail_first, self.tail_first + stored - n_head, device=device)])

    def get_seq_length(self) -> int:
        # every token seen: generate() and the model number new positions from it
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # as a cache holding every token: the causal mask over them is what sparseattn's mask function skips
        return self.seen + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkWindowCache evicts keys and cannot be cropped (assisted generation and "
                                  "contrastive search need a cache that keeps every key)")

    def reset(self) -> None:
        super().reset()
        self.seen, self.tail_first = 0, 0


class SinkWindowCache(Cache):
    """A transformers ``Cache`` for a model sparsified under a causal sink + window plan: per layer, the first
    ``sink`` tokens (plus the prompt's left padding) and the last ``window`` tokens are kept, nothing else.

    sink, window: the plan's bound (``LayerPlan.sink_window``); made by ``generation_cache(model)``.
    """

    sparseattn_evicts = True  # what sparseattn's attention looks for (integrations.hf._evicts)

    def __init__(self, num_layers: int, sink: int, window: int):
        if sink < 0 or window < 0:
            raise ValueError(f"sink and window must be >= 0, got sink={sink}, window={window}")
        self.sink, self.window = sink, window
        self.padding_open = True  # the prompt's left padding may not have been seen whole yet
        super().__init__(layers=[SinkWindowLayer(sink, window) for _ in range(num_layers)])

    def set_left_padding(self, padding: int, columns: int) -> None:
        """Keep ``padding`` more head slots: the sink of an example left-padded by up to ``padding`` tokens lies
        within the first sink + padding slots. Set by sparseattn's forward hook from the attention mask's first
        ``columns`` tokens: while an example shows no real token among them (a chunked prefill's first chunks),
        its padding may go on, and the hook reads the next call's mask too. Until then every slot is still held
        (the head reaches past the tokens seen), so the head may grow."""
        for layer in self.layers:
            layer.head = self.sink + padding
        self.padding_open = padding >= columns

    def reset(self) -> None:
        super().reset()
        for layer in self.layers:
            layer.head = self.sink
        self.padding_open = True

    def slots(self, kv_len: int, device) -> torch.Tensor:
        """(kv_len,) int64: the slot among all tokens seen of each key the layers hold now."""
        for layer in self.layers:
            if layer.is_initialized and layer.keys.shape[-2] == kv_len:
                return layer.slots(device)
        raise RuntimeError(f"SinkWindowCache holds no layer of {kv_len} keys; was it used by another model?")

    def stored_tokens(self) -> int:
        """Keys held per layer (the largest over layers)."""
        return max((layer.keys.shape[-2] for layer in self.layers if layer.is_initialized), default=0)


def generation_cache(model) -> SinkWindowCache:
    """A ``SinkWindowCache`` for ``model``, sparsified (``sparseattn.sparsify``) under a causal plan whose every
    layer and head keeps only sink + window keys (``global_tokens(s) | neighbour(w)``, or either alone). Pass it
    to ``model.generate(..., cache=cache)`` (``past_key_values=cache`` before transformers 5.2x); its memory stays constant in the context length. A plan
    with a dense layer or head, or a pattern that reaches keys at any distance, is refused with the layer that
    does it."""
    state = getattr(model, "_sparseattn", None)
    if state is None:
        raise ValueError("generation_cache needs a model sparsified with sparseattn.sparsify(model, plan)")
    modules = [m for m in state.modules if hasattr(m, "_sparseattn_state")]
    encoder = next((m for m in modules if not getattr(m, "is_causal", False)), None)
    if not modules or encoder is not None:
        what = "no sparsified attention" if not modules else f"{type(encoder).__name__} is not causal"
        raise ValueError(f"generation_cache needs a decoder (causal attention modules): {what}; an encoder's query "
                         "may attend to keys after it")
    sink = window = 0
    for lp in state.layer_plans:
        bound = lp.sink_window(causal=True)
        if bound is None:
            covered = set()
            for heads, _ in lp.entries:
                covered.update(range(lp.num_heads) if heads is None else heads)
            if len(covered) < lp.num_heads:
                what = "is dense" if lp.is_dense else f"leaves heads {sorted(set(range(lp.num_heads)) - covered)} dense"
            else:
                what = "keeps keys at any distance (" + ", ".join(p.spec() for p in lp.patterns) + ")"
            raise ValueError(f"generation_cache: layer {lp.layer} of the plan {state.plan.spec()!r} {what}; only "
                             "plans whose every layer and head is sink + window (global_tokens(s) | neighbour(w)) "
                             "can evict keys")
        sink, window = max(sink, bound[0]), max(window, bound[1])
    return SinkWindowCache(len(state.layer_plans), sink, window)
