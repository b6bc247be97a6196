"""static_mask(table): a stored keep-table over positions, the same for every input (Attention Pruning)."""

from __future__ import annotations

import torch

from .base import Pattern, register


class StaticMask(Pattern):
    """A fixed (H or 1, N, N) bool table over real-token positions, cropped to each example's length."""

    def __init__(self, table: torch.Tensor, key: str):
        if not isinstance(table, torch.Tensor) or table.dim() not in (2, 3):
            raise ValueError(f"static_mask needs a (N, N) or (heads, N, N) tensor, got {getattr(table, 'shape', table)!r}")
        if table.shape[-1] != table.shape[-2]:
            raise ValueError(f"static_mask table must be square over positions, got {tuple(table.shape)}")
        if table.dim() == 2:
            table = table[None]
        if not key or not all(c.isalnum() or c in "_-." for c in key):
            raise ValueError(f"static_mask key must be a non-empty name of letters, digits, '_', '-', '.', got {key!r}")
        self.table = table.bool().contiguous()
        self.key = key
        self.name = f"static_{key}"
        self.per_head = self.table.shape[0] > 1
        self.symmetric = bool(torch.equal(self.table, self.table.transpose(1, 2)))
        self._copies: dict[str, torch.Tensor] = {}  # the table on other devices, by device name

    @property
    def max_length(self) -> int:
        return self.table.shape[-1]

    def relation(self, layout, *, layer, num_heads):
        n = layout.longest_sequence()
        if n > self.max_length:
            raise ValueError(f"{self.name} is defined for sequences of at most {self.max_length} tokens, but the batch "
                             f"has an example of {n}; collect the mask at a larger length")
        if self.per_head and self.table.shape[0] != num_heads:
            raise ValueError(f"{self.name} has {self.table.shape[0]} heads, the layer has {num_heads}")
        t = self._table_on(layout.device)
        p = layout.positions.clamp(min=0)
        rel = t[:, p[:, :, None], p[:, None, :]]  # (H, B, L, L)
        return rel.transpose(0, 1)

    def relation_rows(self, layout, rows, *, layer, num_heads):
        """The table's rows at the queries' positions; a position beyond the table is refused, naming the pattern,
        the layer, the stored length and the position (under torch.compile or CUDA graph capture, where nothing may
        be read back from the GPU, by an asynchronous assert on the device)."""
        if self.per_head and self.table.shape[0] != num_heads:
            raise ValueError(f"{self.name} has {self.table.shape[0]} heads, the layer has {num_heads}")
        p = layout.positions
        pq = p[:, rows]
        tracing = torch.compiler.is_compiling() or (p.is_cuda and torch.cuda.is_current_stream_capturing())
        seen = pq if layout.causal else p  # a decoder's keys after its queries are never kept: the queries count
        beyond = (f"{self.spec()} in layer {layer} is stored for {self.max_length} positions (0-"
                  f"{self.max_length - 1}), but decoding reached position {{}}; generate at most {self.max_length} "
                  "tokens in all (prompt included), or collect the mask at a larger length")
        if layout.given_positions is None and layout.length <= self.max_length:
            pass  # a position counts real tokens, so it is below the number of keys: none can be beyond the table
        elif tracing and seen.numel():
            # nothing may be read back here: an asynchronous assert stops the run on the device instead
            torch._assert_async(seen.max() < self.max_length, beyond.format(f">= {self.max_length}"))
        elif seen.numel():
            last = int(seen.max())
            if last >= self.max_length:
                raise ValueError(beyond.format(last))
        t = self._table_on(layout.device)
        n = self.max_length - 1
        pk = p.clamp(min=0, max=n)  # a decoder's keys beyond the table follow its queries (never allowed)
        rel = t[:, pq.clamp(min=0, max=n)[:, :, None], pk[:, None, :]]  # (H, B, Lq, L)
        return rel.transpose(0, 1)

    def _table_on(self, device) -> torch.Tensor:
        """The table on ``device``, copied once, eagerly (the prefill makes it), so that a decoding step traced by
        torch.compile reads the copy as an input instead of copying from the host inside the graph (which a CUDA
        graph cannot hold) or mutating this pattern (which Dynamo cannot trace)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" share one copy
            device = torch.device("cuda", torch.cuda.current_device())
        if self.table.device == device:
            return self.table
        copy = self._copies.get(str(device))
        if copy is None:
            copy = self.table.to(device)
            if not torch.compiler.is_compiling():
                self._copies[str(device)] = copy
        return copy

    def prefix_stable(self, causal: bool) -> bool:
        return True

    def spec(self):
        return f"static_mask('{self.key}')"

    def tensors(self):
        return {self.key: self.table}


@register
def static_mask(table, key: str = "mask") -> Pattern:
    """A stored keep-table (heads or 1, N, N) over positions, as Attention Pruning produces: the same
    mask for every input, cropped to each example's length; longer inputs are refused.

    In a plan spec, static_mask('key') names a table saved with the plan."""
    return StaticMask(table, key)
