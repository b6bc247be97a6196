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
    """

    real: torch.Tensor
    special: torch.Tensor | None = None
    structure: object | None = None
    input_ids: torch.Tensor | None = None
    token_vectors: torch.Tensor | Callable[[], torch.Tensor] | None = None
    causal: bool = False
    unpadded: bool = False

    def __post_init__(self):
        if self.real.dim() != 2 or self.real.dtype != torch.bool:
            raise ValueError(f"TokenLayout.real must be a (batch, length) bool tensor, got {tuple(self.real.shape)} "
                             f"{self.real.dtype}")
        if self.special is not None and self.special.shape != self.real.shape:
            raise ValueError(f"TokenLayout.special has shape {tuple(self.special.shape)}, expected "
                             f"{tuple(self.real.shape)} like .real")
        self._positions = None

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_lengths(cls, lengths, length: int | None = None, *, causal: bool = False, device=None,
                     special_first: int = 0, special_last: int = 0) -> "TokenLayout":
        """Right-padded batch of the given real lengths. ``special_first`` / ``special_last`` mark that
        many tokens at each end of every example as special (1 and 1 for a [CLS] ... [SEP] input)."""
        lengths = torch.as_tensor(list(lengths), dtype=torch.long, device=device)
        if lengths.numel() == 0:
            raise ValueError("TokenLayout.from_lengths got no lengths")
        if (lengths < 1).any():
            raise ValueError(f"every example needs at least one token, got lengths {lengths.tolist()}")
        L = int(lengths.max()) if length is None else int(length)
        if L < int(lengths.max()):
            raise ValueError(f"length {L} is shorter than the longest example ({int(lengths.max())} tokens)")
        pos = torch.arange(L, device=device)[None, :]
        real = pos < lengths[:, None]
        special = None
        if special_first or special_last:
            special = real & ((pos < special_first) | (pos >= (lengths[:, None] - special_last)))
        return cls(real=real, special=special, causal=causal)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor, **kw) -> "TokenLayout":
        return cls(real=attention_mask.bool(), **kw)

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
        return self.real.sum(-1)

    @property
    def positions(self) -> torch.Tensor:
        """(B, L) int64: a token's index among the real tokens of its example (-1 for padding), so
        positional patterns mean the same under left or right padding."""
        if self._positions is None:
            p = self.real.long().cumsum(-1) - 1
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
        if self.causal:
            p = self.positions
            a = a & (p[:, None, None, :] <= p[:, None, :, None])
        return a

    def diagonal(self) -> torch.Tensor:
        """(B, 1, L, L) bool: each real token with itself."""
        eye = torch.eye(self.length, dtype=torch.bool, device=self.device)
        return eye[None, None] & self.real[:, None, :, None]
