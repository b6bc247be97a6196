"""random(r): each query attends to r random keys, drawn independently per head and per layer."""

from __future__ import annotations

import torch

from .base import Pattern, check_int, positional_grid, register

_M32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) on int64 tensors holding values in [0, 2**32).

    Multiplications may wrap around in int64; the low 32 bits stay exact, so the result is the same on
    every device."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def hash_uniform(seed: int, layer: int, head: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """Deterministic uniform numbers in [0, 1) indexed by (seed, layer, head, query pos, key pos).

    A draw depends on positions only, never on the batch or its padding, so an example gets the same
    random connections whatever it is batched with."""
    h = hash32(torch.tensor(seed * 0x9E3779B1 + layer, dtype=torch.long, device=head.device))
    h = hash32(h ^ head)
    h = hash32(h ^ (qpos & _M32))
    h = hash32(h ^ (kpos & _M32))
    return h.double() / 2.0**32


class Random(Pattern):
    symmetric = False
    per_head = True
    per_layer = True

    def __init__(self, r: int, seed: int = 0):
        self.r = check_int(r, "random degree r")
        self.seed = check_int(seed, "random seed")
        self.name = f"random_{self.r}" + (f"_seed{self.seed}" if self.seed else "")

    def relation(self, layout, *, layer, num_heads):
        B, L = layout.batch_size, layout.length
        H = num_heads
        if self.r == 0:
            return torch.zeros(B, 1, L, L, dtype=torch.bool, device=layout.device)
        qi, kj = positional_grid(layout)  # (B,1,L,1), (B,1,1,L)
        heads = torch.arange(H, device=layout.device)[None, :, None, None]
        # float64 holds the 32-bit hash exactly; float32 would make ties that topk breaks differently per device
        u = hash_uniform(self.seed, layer, heads, qi.clamp(min=0), kj.clamp(min=0))  # (B,H,L,L)
        # candidates: allowed keys other than the query itself
        cand = layout.allowed() & ~layout.diagonal()
        u = torch.where(cand, u, torch.full_like(u, -1.0))
        k = min(self.r, L)
        top = u.topk(k, dim=-1)
        rel = torch.zeros(B, H, L, L, dtype=torch.bool, device=layout.device)
        rel.scatter_(-1, top.indices, top.values >= 0)
        return rel

    def relation_rows(self, layout, rows, *, layer, num_heads):
        """The same draws as ``relation`` for the queries at ``rows``: each row's top r among its own allowed keys."""
        B, L, Lq = layout.batch_size, layout.length, rows.shape[0]
        if self.r == 0:
            return torch.zeros(B, 1, Lq, L, dtype=torch.bool, device=layout.device)
        if layout.given_positions is not None:
            return self._rows_over_positions(layout, rows, layer=layer, num_heads=num_heads)
        qi, kj = positional_grid(layout, rows)
        heads = torch.arange(num_heads, device=layout.device)[None, :, None, None]
        u = hash_uniform(self.seed, layer, heads, qi.clamp(min=0), kj.clamp(min=0))  # (B, H, Lq, L)
        cand = layout.allowed_rows(rows) & ~layout.diagonal_rows(rows)
        u = torch.where(cand, u, torch.full_like(u, -1.0))
        top = u.topk(min(self.r, L), dim=-1)
        rel = torch.zeros(B, num_heads, Lq, L, dtype=torch.bool, device=layout.device)
        rel.scatter_(-1, top.indices, top.values >= 0)
        return rel

    def _rows_over_positions(self, layout, rows, *, layer, num_heads):
        """Rows over a cache holding some keys (``given_positions``: a decoder's sliding window): each query draws
        among every earlier position, held or not, as in the full mask; the draws at the positions held are
        returned."""
        if not layout.causal:
            raise ValueError(f"{self.spec()} over keys with given positions (a cache holding some keys) needs a "
                             "decoder: an encoder's query draws among every key of its example")
        B, L, Lq = layout.batch_size, layout.length, rows.shape[0]
        p = layout.positions  # (B, L), -1 for padding
        q = p[:, rows][:, None, :, None]  # (B, 1, Lq, 1)
        P = int(p.max()) + 1  # read back: caches holding some keys (sliding windows) run eagerly
        k = torch.arange(P, device=layout.device)[None, None, None, :]
        heads = torch.arange(num_heads, device=layout.device)[None, :, None, None]
        u = hash_uniform(self.seed, layer, heads, q.clamp(min=0), k)  # (B, H, Lq, P)
        u = torch.where(k < q, u, torch.full_like(u, -1.0))  # the earlier positions (none for a padding query)
        top = u.topk(min(self.r, P), dim=-1)
        drawn = torch.zeros(u.shape, dtype=torch.bool, device=layout.device).scatter_(-1, top.indices,
                                                                                      top.values >= 0)
        held = p.clamp(min=0)[:, None, None, :].expand(B, num_heads, Lq, L)
        return drawn.gather(-1, held) & (p >= 0)[:, None, None, :]

    def prefix_stable(self, causal: bool) -> bool:
        # a decoder's query draws among the keys before it, whatever follows; an encoder's among all n keys
        return causal

    def spec(self):
        return f"random({self.r})" if not self.seed else f"random({self.r}, seed={self.seed})"


@register
def random(r: int, seed: int = 0) -> Pattern:
    """r random keys per query (besides itself), drawn per head and per layer from a hash of
    (seed, layer, head, query position, key position).

    The same seed gives the same connections on any device and under any padding. A query with fewer
    than r other allowed keys keeps all of them."""
    return Random(r, seed)


if __name__ == "__main__":  # draw it: python -m sparseattn.patterns.random
    from ..reports.masks import draw_pattern

    print(draw_pattern(random(3), path="random_3.png"))
