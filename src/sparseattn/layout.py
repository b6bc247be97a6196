"""TokenLayout: what a pattern may know about a batch.

Patterns see token positions, padding, special tokens and (for input-dependent patterns) per-example
structure. They never see hidden states: a pattern is a function of the batch's layout alone.

Conventions used everywhere in sparseattn:
- masks are boolean, True = the query may attend to the key ("keep");
- shapes are (batch, heads, query, key); a head dimension of 1 broadcasts over heads;
- a pair is *allowed* when both tokens are real (not padding) and, for decoders, the key is not in
  the query's future. Sparsity counts removed pairs among allowed pairs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TokenLayout:
    """The layout of a padded batch.

    real: (B, L) bool, True for real tokens (either padding side works).
    special: (B, L) bool or None, True for special tokens such as [CLS] / [SEP].
    structure: a `sparseattn.text.BatchStructure` aligned with the L positions, or None.
    input_ids: (B, L) int64 or None.
    token_vectors: (B, L, E) float tensor, or a zero-argument callable producing it lazily (unit
        vectors of the model's input embeddings, for `similar`), or None.
    causal: True for decoders: keys after the query are not allowed.
    unpadded: True when the caller knows, without reading ``real``, that every token is real (the model
        got no attention mask): GPU code can then skip reading ``real`` back, a device sync that CUDA
        graph capture does not allow. False means "not known", not "padded".
    document_ids: (B, L) int64 or None: packed rows, several documents in one row. Tokens with the same id
        are one document (consecutive tokens; ids rise along a row); positions restart at 0 in each
        document, and no pair across documents is allowed, so every pattern applies within each document
        as if it were run alone. None: each row is one sequence.
    documents: (S, 3) int32 or None: the documents as (row, first token, token count), where known without
        reading the GPU (``from_cu_seqlens``); kernels that walk documents take them from here.
    given_positions: (B, L) int64 or None: each token's position where it is not its count among the real tokens
        before it: the keys of a generation cache that evicted keys (positions with gaps), or a cache read over
        fewer slots than the tokens seen. -1 for padding. None: positions are counted from ``real``.
    """

    real: torch.Tensor
    special: torch.Tensor | None = None
    structure: object | None = None
    input_ids: torch.Tensor | None = None
    token_vectors: torch.Tensor | Callable[[], torch.Tensor] | None = None
    causal: bool = False
    unpadded: bool = False
    document_ids: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    given_positions: torch.Tensor | None = None

    def __post_init__(self):
        if self.real.dim() != 2 or self.real.dtype != torch.bool:
            raise ValueError(f"TokenLayout.real must be a (batch, length) bool tensor, got {tuple(self.real.shape)} "
                             f"{self.real.dtype}")
        if self.special is not None and self.special.shape != self.real.shape:
            raise ValueError(f"TokenLayout.special has shape {tuple(self.special.shape)}, expected "
                             f"{tuple(self.real.shape)} like .real")
        if self.document_ids is not None and self.document_ids.shape != self.real.shape:
            raise ValueError(f"TokenLayout.document_ids has shape {tuple(self.document_ids.shape)}, expected "
                             f"{tuple(self.real.shape)} like .real")
        if self.given_positions is not None and self.given_positions.shape != self.real.shape:
            raise ValueError(f"TokenLayout.given_positions has shape {tuple(self.given_positions.shape)}, expected "
                             f"{tuple(self.real.shape)} like .real")
        self._positions = self.given_positions

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_lengths(cls, lengths, length: int | None = None, *, causal: bool = False, device=None,
                     special_first: int = 0, special_last: int = 0) -> "TokenLayout":
        """Right-padded batch of the given real lengths. ``special_first`` / ``special_last`` mark that
        many tokens at each end of every example as special (1 and 1 for a [CLS] ... [SEP] input)."""
        # checked and measured on the host, then moved: on a GPU each check would wait for it
        lengths = torch.as_tensor(lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths),
                                  dtype=torch.long)
        if lengths.numel() == 0:
            raise ValueError("TokenLayout.from_lengths got no lengths")
        if (lengths < 1).any():
            raise ValueError(f"every example needs at least one token, got lengths {lengths.tolist()}")
        L = int(lengths.max()) if length is None else int(length)
        if L < int(lengths.max()):
            raise ValueError(f"length {L} is shorter than the longest example ({int(lengths.max())} tokens)")
        lengths = lengths.to(device)
        pos = torch.arange(L, device=device)[None, :]
        real = pos < lengths[:, None]
        special = None
        if special_first or special_last:
            special = real & ((pos < special_first) | (pos >= (lengths[:, None] - special_last)))
        return cls(real=real, special=special, causal=causal)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor, **kw) -> "TokenLayout":
        return cls(real=attention_mask.bool(), **kw)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, real: torch.Tensor | None = None, **kw) -> "TokenLayout":
        """Packed rows as transformers' flattening collator makes them: a document starts wherever
        ``position_ids`` (B, L) does not go up by one from the token before (at each 0 of restarting positions), the
        rule transformers' own packed masks follow (``find_packed_sequence_indices``), so that both agree on every
        row. Computed on the device, no sync."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be (batch, length), got {tuple(position_ids.shape)}")
        step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
        ids = (step != 1).long().cumsum(-1)
        real = torch.ones_like(position_ids, dtype=torch.bool) if real is None else real.bool()
        return cls(real=real, document_ids=ids, **kw)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, batch: int, length: int, **kw) -> "TokenLayout":
        """Packed rows given as cumulative document lengths over the flattened (batch x length) tokens
        (flash-attention's ``cu_seqlens``, transformers' ``cu_seq_lens_q``); documents may not cross rows, and
        tokens after the last document are padding. Computed on the device, no sync."""
        cu = cu_seqlens.to(torch.long)
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D tensor of at least 2 offsets, got {tuple(cu.shape)}")
        starts, counts = cu[:-1], cu[1:] - cu[:-1]
        marks = torch.zeros(batch * length + 1, dtype=torch.long, device=cu.device)
        marks.index_add_(0, starts, torch.ones_like(starts))
        doc = marks[:-1].cumsum(0) - 1  # the document of each flattened token (the last one's for trailing padding)
        doc = doc.clamp(min=0)
        flat = torch.arange(batch * length, device=cu.device)
        real = (flat < (starts + counts)[doc]) & (flat >= starts[doc])
        documents = torch.stack([starts // length, starts % length, counts], dim=1).to(torch.int32)
        return cls(real=real.view(batch, length), document_ids=doc.view(batch, length), documents=documents, **kw)

    # -- derived quantities --------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.real.shape[0]

    @property
    def length(self) -> int:
        return self.real.shape[1]

    @property
    def device(self) -> torch.device:
        return self.real.device

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) real tokens per row (all its documents together)."""
        return self.real.sum(-1)

    @property
    def packed(self) -> bool:
        return self.document_ids is not None

    def longest_sequence(self) -> int:
        """Real tokens of the longest example, or of the longest document in packed rows (reads the GPU)."""
        if not self.packed:
            return int(self.lengths.max())
        return int(self.positions.max()) + 1

    @property
    def positions(self) -> torch.Tensor:
        """(B, L) int64: a token's index among the real tokens of its example, or of its document in packed
        rows (-1 for padding), so positional patterns mean the same under left or right padding and in
        every document of a packed row."""
        if self._positions is None:
            counted = self.real.long().cumsum(-1)
            p = counted - 1
            if self.packed:  # minus the real tokens before the document's first token (non-decreasing: cummax)
                first = torch.ones_like(self.real)
                first[:, 1:] = self.document_ids[:, 1:] != self.document_ids[:, :-1]
                before = torch.where(first, counted - self.real.long(), torch.zeros_like(p)).cummax(-1).values
                p = p - before
            self._positions = torch.where(self.real, p, torch.full_like(p, -1))
        return self._positions

    def vectors(self) -> torch.Tensor:
        tv = self.token_vectors() if callable(self.token_vectors) else self.token_vectors
        if tv is None:
            raise ValueError("this pattern needs token vectors (the model's input embeddings); apply it through "
                             "sparseattn.sparsify, or set TokenLayout.token_vectors")
        self.token_vectors = tv
        return tv

    def allowed(self) -> torch.Tensor:
        """(B, 1, L, L) bool: pairs that can carry attention before any sparsification."""
        a = self.real[:, None, :, None] & self.real[:, None, None, :]
        if self.packed:
            a = a & (self.document_ids[:, None, :, None] == self.document_ids[:, None, None, :])
        if self.causal:
            p = self.positions
            a = a & (p[:, None, None, :] <= p[:, None, :, None])
        return a

    def diagonal(self) -> torch.Tensor:
        """(B, 1, L, L) bool: each real token with itself."""
        eye = torch.eye(self.length, dtype=torch.bool, device=self.device)
        return eye[None, None] & self.real[:, None, :, None]

    # -- rows: the queries of an incremental call (generation with a KV cache) -------------------------
    # An incremental call has Lq queries over L keys; the queries are tokens of the layout, at indices
    # ``rows`` (Lq,) int64 (the last Lq of a dynamic cache, the slots being filled of a static one). The row
    # methods give the matching rows of the L x L ones, in O(Lq x L) memory.
    def allowed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, 1, Lq, L) bool: ``allowed()[:, :, rows]``."""
        a = self.real[:, None, rows, None] & self.real[:, None, None, :]
        if self.packed:
            a = a & (self.document_ids[:, None, rows, None] == self.document_ids[:, None, None, :])
        if self.causal:
            p = self.positions
            a = a & (p[:, None, None, :] <= p[:, None, rows, None])
        return a

    def diagonal_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, 1, Lq, L) bool: ``diagonal()[:, :, rows]``."""
        eye = rows[:, None] == torch.arange(self.length, device=self.device)[None, :]
        return eye[None, None] & self.real[:, None, rows, None]
