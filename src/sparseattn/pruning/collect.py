"""Average attention over a data set, on a fixed length grid (step 1 of Attention Pruning).

For every (layer, head, query position i, key position j) of a grid of ``L`` positions we keep the SUM
of the softmax probabilities a model gives to the pair over the examples where the pair is *allowed*
(both tokens real; the key not in the query's future for decoders), and the COUNT of those examples.
The average is ``sum / count``: padding never enters it, so a batch padded to any length gives the same
average as the examples run one by one. (The 2021 AP code averaged padding in and kept only the last
batch's average.)

Probabilities come from the reference backend (exact softmax over the allowed keys): the model is
sparsified with the dense plan and a recording backend, which adds each layer's probabilities to the
sums as the layer runs, so no more than one layer's (B, H, Lb, Lb) probabilities exist at a time.
Memory is bounded by the sums, layers x heads x L x L (float64), plus one (L, L) int64 count table:
counts do not depend on the layer or head.

``collect_attention`` reads texts (tokenized, batched by length, padded); ``collect_attention_rows`` reads
token rows of one length, as a language model trains on them (no padding: a batch's sum is added to the
grid's corner directly).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .._version import __version__
from ..backends.base import AttentionCall, Backend
from ..backends.reference import ReferenceBackend
from ..integrations.hf import sparsify, unsparsify
from ..models import text_config
from ..plans.plan import Plan
from ..training.distributed import Distributed

FORMAT = "sparseattn-attention-stats/1"
LONGER_POLICIES = ("error", "truncate", "skip")


@dataclass
class AttentionStats:
    """Summed attention probabilities on a grid of ``length`` positions.

    sums: (layers, heads, L, L) float64: sum over examples of p(query i -> key j).
    counts: (L, L) int64: number of examples in which (i, j) is an allowed pair.
    causal: True for decoders (only j <= i is ever allowed).
    metadata: where the numbers came from (model, data, examples, truncated, ...), JSON-serializable.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    causal: bool
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.sums.dim() != 4 or self.sums.shape[-1] != self.sums.shape[-2]:
            raise ValueError(f"AttentionStats.sums must be (layers, heads, L, L), got {tuple(self.sums.shape)}")
        if tuple(self.counts.shape) != tuple(self.sums.shape[-2:]):
            raise ValueError(f"AttentionStats.counts must be (L, L) = {tuple(self.sums.shape[-2:])}, got "
                             f"{tuple(self.counts.shape)}")

    @property
    def num_layers(self) -> int:
        return self.sums.shape[0]

    @property
    def num_heads(self) -> int:
        return self.sums.shape[1]

    @property
    def length(self) -> int:
        return self.sums.shape[-1]

    @property
    def longest(self) -> int:
        """The longest example seen: positions at or beyond it were never observed."""
        seen = self.counts.diagonal() > 0
        return int(seen.nonzero().max()) + 1 if seen.any() else 0

    @property
    def num_examples(self) -> int:
        return int(self.counts[0, 0])

    def allowed(self, length: int | None = None) -> torch.Tensor:
        """(N, N) bool: grid pairs that can carry attention (all pairs; j <= i for decoders)."""
        n = self.length if length is None else length
        grid = torch.ones(n, n, dtype=torch.bool)
        return grid.tril() if self.causal else grid

    def mean(self) -> torch.Tensor:
        """(layers, heads, L, L) float64 average attention; 0 where a pair was never observed."""
        return self.sums / self.counts.clamp(min=1).to(self.sums.dtype)

    def cropped(self, length: int) -> "AttentionStats":
        """The same statistics on the first ``length`` positions (exact: a pair's sum does not depend on
        the grid size)."""
        if not 1 <= length <= self.length:
            raise ValueError(f"cannot crop attention statistics of length {self.length} to {length}")
        return AttentionStats(self.sums[..., :length, :length].clone(), self.counts[:length, :length].clone(),
                              self.causal, dict(self.metadata, length=length))

    def __add__(self, other: "AttentionStats") -> "AttentionStats":
        """Merge statistics of disjoint data (e.g. shards collected on different machines)."""
        if self.sums.shape != other.sums.shape or self.causal != other.causal:
            raise ValueError(f"cannot add attention statistics of shapes {tuple(self.sums.shape)} "
                             f"(causal={self.causal}) and {tuple(other.sums.shape)} (causal={other.causal})")
        meta = dict(self.metadata)
        for k in ("examples", "truncated", "skipped"):
            if k in self.metadata or k in other.metadata:
                meta[k] = self.metadata.get(k, 0) + other.metadata.get(k, 0)
        return AttentionStats(self.sums + other.sums, self.counts + other.counts, self.causal, meta)

    # -- files --------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write a safetensors file with ``sums``, ``counts`` and the metadata as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = dict(self.metadata, format=FORMAT, causal=self.causal, length=self.length,
                    num_layers=self.num_layers, num_heads=self.num_heads, sparseattn_version=__version__)
        save_file({"sums": self.sums.contiguous().cpu(), "counts": self.counts.contiguous().cpu()}, str(path),
                  metadata={"format": FORMAT, "sparseattn": json.dumps(info)})
        return path

    @classmethod
    def load(cls, path) -> "AttentionStats":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; make it with `sparseattn ap collect`")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r} (a file written by "
                                 "`sparseattn ap collect`)")
            info = json.loads(meta["sparseattn"])
            sums, counts = f.get_tensor("sums"), f.get_tensor("counts")
        return cls(sums, counts, bool(info["causal"]), info)


class _Accumulator:
    """Sums and counts on the device of the model, filled by the recording backend."""

    def __init__(self, num_layers: int, num_heads: int, length: int, device, dtype=torch.float64):
        self.length = length
        self.sums = torch.zeros(num_layers, num_heads, length * length, dtype=dtype, device=device)
        self.counts = torch.zeros(length * length, dtype=torch.long, device=device)
        self.causal: bool | None = None

    def reduce(self, dist: Distributed) -> None:
        """Add up every rank's sums and counts (data-parallel collection: each rank saw its share of the data)."""
        if not dist.active:
            return
        import torch.distributed as tdist

        tdist.all_reduce(self.sums)
        tdist.all_reduce(self.counts)
        seen = torch.tensor(-1 if self.causal is None else int(self.causal), device=self.sums.device)
        tdist.all_reduce(seen, op=tdist.ReduceOp.MAX)  # a rank left without a batch learns it from the others
        self.causal = None if int(seen) < 0 else bool(int(seen))

    def grid_index(self, layout) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed (B, Lb, Lb) bool, flat grid index i * L + j of each pair (B, Lb, Lb) int64).

        Positions are indices among an example's real tokens, so left and right padding land on the same
        grid cells."""
        allowed = layout.allowed()[:, 0]
        pos = layout.positions.clamp(min=0)
        if int(layout.lengths.max()) > self.length:
            raise ValueError(f"an example of {int(layout.lengths.max())} tokens does not fit the grid of "
                             f"{self.length} positions")
        return allowed, pos[:, :, None] * self.length + pos[:, None, :]

    def add_layer(self, layer: int, probs: torch.Tensor, layout) -> None:
        """probs: (B, H, Lb, Lb) softmax probabilities of one layer."""
        if not layout.packed and (layout.unpadded or bool(layout.real.all())):
            return self._add_full_rows(layer, probs, layout.causal)
        allowed, index = self.grid_index(layout)
        sel = index[allowed]  # (P,) grid cells of the allowed pairs
        p = probs.permute(1, 0, 2, 3)[:, allowed]  # (H, P)
        self.sums[layer].index_add_(1, sel, p.to(self.sums.dtype))
        if layer == 0:  # counts are the same for every layer: count each example once
            self.counts.index_add_(0, sel, torch.ones_like(sel))
            self.causal = layout.causal

    def _add_full_rows(self, layer: int, probs: torch.Tensor, causal: bool) -> None:
        """Rows without padding (a language model's training rows): every row has the same allowed pairs, at
        the grid's first Lb positions, so the batch's sum lands on one corner of the grid with no index."""
        B, H, Lb = probs.shape[0], probs.shape[1], probs.shape[-1]
        if Lb > self.length:
            raise ValueError(f"rows of {Lb} tokens do not fit the grid of {self.length} positions")
        allowed = torch.ones(Lb, Lb, dtype=torch.bool, device=probs.device)
        if causal:
            allowed = allowed.tril()
        L = self.length
        corner = self.sums[layer].view(H, L, L)[:, :Lb, :Lb]
        corner += torch.sum(probs, 0, dtype=self.sums.dtype) * allowed
        if layer == 0:
            self.counts.view(L, L)[:Lb, :Lb] += allowed.long() * B
            self.causal = causal

    def stats(self, metadata: dict) -> AttentionStats:
        L = self.length
        return AttentionStats(self.sums.view(*self.sums.shape[:2], L, L).cpu(), self.counts.view(L, L).cpu(),
                              bool(self.causal), metadata)


class RecordingBackend(Backend):
    """The reference backend, adding every layer's attention probabilities to an accumulator."""

    name = "recording"

    def __init__(self, accumulator: _Accumulator):
        self.accumulator = accumulator
        self.reference = ReferenceBackend()

    def attention(self, call: AttentionCall):
        if call.q_len != call.key.shape[2]:
            raise ValueError("attention statistics need full sequences, not incremental decoding with a cache")
        out, probs = self.reference.attention(dataclasses.replace(call, need_weights=True))
        self.accumulator.add_layer(call.layer_plan.layer, probs.detach(), call.layout)
        return out, probs if call.need_weights else None


@contextlib.contextmanager
def recording(model, acc: _Accumulator):
    """The model in eval mode under the dense plan with a recording backend that adds each layer's attention
    to ``acc`` as the layer runs, without gradients; afterwards the model is as it was."""
    was_training = model.training
    model.eval()
    sparsify(model, Plan.dense(), backend=RecordingBackend(acc))
    try:
        with torch.no_grad():
            yield
    finally:
        unsparsify(model)
        model.train(was_training)


def _no_cache(model) -> dict:
    """``use_cache=False`` where the model takes it: a key/value cache would only cost memory here."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@dataclass
class Example:
    """One input: a text and an optional second segment."""

    text: str
    pair: str | None = None


def tokenize_lengths(tokenizer, examples: Sequence[Example]) -> list[int]:
    """The number of tokens of every example, without truncation."""
    texts = [e.text for e in examples]
    pairs = [e.pair for e in examples] if any(e.pair is not None for e in examples) else None
    if pairs is not None and any(p is None for p in pairs):
        raise ValueError("either every example has a second segment or none does")
    enc = tokenizer(texts, pairs, truncation=False, padding=False)
    return [len(ids) for ids in enc["input_ids"]]


def collect_attention(model, tokenizer, examples: Sequence[Example], *, length: int, batch_size: int = 32,
                      longer: str = "error", progress: bool = True, metadata: dict | None = None,
                      sum_dtype=torch.float64, dist: Distributed | None = None) -> AttentionStats:
    """Average attention of ``model`` (a transformers model, encoder or decoder) over ``examples``.

    length: the grid size L. Examples longer than L are an error (``longer='error'``), cut to L tokens
        (``'truncate'``) or left out (``'skip'``); the number truncated / skipped goes into the metadata.
    batch_size: examples per forward pass. Examples are batched by length (less padding, same result).
    Returns AttentionStats with sums (layers, heads, L, L) and counts (L, L); the model comes back as it
    was (not sparsified).
    dist: data-parallel (under torchrun, its process group joined): each rank runs every world_size-th batch
        and every rank returns the sums over all of them.
    """
    if longer not in LONGER_POLICIES:
        raise ValueError(f"longer must be one of {LONGER_POLICIES}, got {longer!r}")
    if length < 1:
        raise ValueError(f"the grid length must be >= 1, got {length}")
    examples = list(examples)
    if not examples:
        raise ValueError("collect_attention got no examples")
    for i, e in enumerate(examples):
        if not isinstance(e.text, str) or not e.text.strip():
            raise ValueError(f"example {i} has an empty text ({e.text!r})")
    if tokenizer.pad_token is None:  # decoders often have none; padding is masked out anyway
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token

    lengths = tokenize_lengths(tokenizer, examples)
    too_long = [i for i, n in enumerate(lengths) if n > length]
    if too_long and longer == "error":
        i = too_long[0]
        raise ValueError(f"{len(too_long)} of {len(examples)} examples are longer than the grid of {length} tokens "
                         f"(the first is example {i}, {lengths[i]} tokens: {examples[i].text[:60]!r}); raise "
                         "--max-length, or pass --longer truncate / --longer skip to cut or leave them out "
                         "(the number is recorded)")
    keep = [i for i in range(len(examples)) if not (longer == "skip" and lengths[i] > length)]
    if not keep:
        raise ValueError(f"every example is longer than {length} tokens; nothing to collect")
    order = sorted(keep, key=lambda i: (min(lengths[i], length), i))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    dist = dist or Distributed()
    batches = batches[dist.rank::dist.world_size]

    cfg = text_config(model)
    device = next(model.parameters()).device
    acc = _Accumulator(cfg.num_hidden_layers, cfg.num_attention_heads, length, device, sum_dtype)
    extra = _no_cache(model)
    # token_type_ids only where the model takes them (a BERT tokenizer may feed a decoder in tests)
    inputs = {"input_ids", "attention_mask"} | ({"token_type_ids"} & set(inspect.signature(model.forward).parameters))
    with recording(model, acc):
        bar = tqdm(total=sum(map(len, batches)), unit="ex", desc="collecting attention", disable=not progress)
        for idx in batches:
            texts = [examples[i].text for i in idx]
            pairs = [examples[i].pair for i in idx] if examples[idx[0]].pair is not None else None
            # right padding: a decoder's positions then start at 0 for every example, as when run alone
            enc = tokenizer(texts, pairs, padding=True, padding_side="right", truncation=longer == "truncate",
                            max_length=length if longer == "truncate" else None, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in inputs}
            model(**enc, **extra)
            bar.update(len(idx))
        bar.close()
    acc.reduce(dist)
    n_trunc = len(too_long) if longer == "truncate" else 0
    meta = dict(metadata or {})
    meta.update(examples=len(keep), truncated=n_trunc, skipped=len(examples) - len(keep),
                longer_policy=longer, length=length, decoder=bool(acc.causal),
                longest_tokens=max(lengths), sum_dtype=str(sum_dtype).replace("torch.", ""))
    return acc.stats(meta)


def collect_attention_rows(model, rows: torch.Tensor, *, length: int | None = None, batch_size: int = 8,
                           progress: bool = True, metadata: dict | None = None,
                           sum_dtype=torch.float64, dist: Distributed | None = None) -> AttentionStats:
    """Average attention of ``model`` over token rows of equal length, ``rows`` (N, L) int64: a language
    model's training rows, each read whole (no padding). ``length``: the grid (default L, the rows' length).

    Memory: the sums (layers x heads x grid x grid) and one layer's (batch, heads, L, L) probabilities at a
    time, which are added to the sums as the layer runs (``RecordingBackend``). dist: data-parallel, as in
    ``collect_attention`` (each rank every world_size-th batch, the sums of all on every rank)."""
    rows = torch.as_tensor(rows)
    if rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] == 0 or rows.dtype != torch.long:
        raise ValueError(f"collect_attention_rows needs (rows, tokens) int64 token ids, got {tuple(rows.shape)} "
                         f"{rows.dtype}")
    L = rows.shape[1]
    length = L if length is None else length
    if L > length:
        raise ValueError(f"rows of {L} tokens do not fit the grid of {length} positions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = text_config(model)
    device = next(model.parameters()).device
    acc = _Accumulator(cfg.num_hidden_layers, cfg.num_attention_heads, length, device, sum_dtype)
    extra = _no_cache(model)
    dist = dist or Distributed()
    with recording(model, acc):
        for s in tqdm(range(0, rows.shape[0], batch_size)[dist.rank::dist.world_size], unit="batch",
                      desc="collecting attention", disable=not progress):
            model(input_ids=rows[s:s + batch_size].to(device), **extra)
    acc.reduce(dist)
    meta = dict(metadata or {})
    meta.update(examples=int(rows.shape[0]), truncated=0, skipped=0, longer_policy="rows", length=length,
                decoder=bool(acc.causal), longest_tokens=L, sum_dtype=str(sum_dtype).replace("torch.", ""))
    return acc.stats(meta)
