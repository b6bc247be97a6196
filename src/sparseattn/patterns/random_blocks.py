"""random_blocks(r, block): each block of queries attends to r random blocks of keys (BigBird's random part).

Token-level random connections scatter over nearly every block x block tile, so a block-sparse kernel
gains nothing from them. BigBird (Zaheer et al. 2020) draws its random connections per block; this
pattern does the same: positions are grouped into blocks of ``block`` real tokens, and every query block
keeps all pairs with r key blocks drawn at random (besides itself), per head and per layer. With
``block`` equal to the kernel's block size (128 for the ``block`` backend) every drawn block is a full
tile and costs no mask evaluation at all.
"""

from __future__ import annotations

import torch

from .base import Pattern, check_int, register
from .random import hash_uniform


class RandomBlocks(Pattern):
    symmetric = False
    per_head = True
    per_layer = True

    def __init__(self, r: int, block: int = 64, seed: int = 0):
        self.r = check_int(r, "random_blocks degree r")
        self.block = check_int(block, "random_blocks block", minimum=1)
        self.seed = check_int(seed, "random_blocks seed")
        self.name = f"random_blocks_{self.r}_block{self.block}" + (f"_seed{self.seed}" if self.seed else "")

    def block_relation(self, num_blocks: torch.Tensor, *, layer: int, num_heads: int, causal: bool) -> torch.Tensor:
        """(B, H, N, N) bool over blocks: query block i keeps key block j. ``num_blocks`` (B,): blocks of each
        example (N = the largest); an example's draws depend on its own length only, never on its batch."""
        N = int(num_blocks.max())
        query_blocks = torch.arange(N, device=num_blocks.device)[None]  # the same for every example: hashed once
        return self.block_rows(query_blocks, num_blocks, N, layer=layer, num_heads=num_heads, causal=causal)

    def block_rows(self, query_blocks: torch.Tensor, num_blocks: torch.Tensor, size: int, *, layer: int,
                   num_heads: int, causal: bool) -> torch.Tensor:
        """(B, H, Q, size) bool: the rows of ``block_relation`` at the query blocks ``query_blocks`` (B or 1, Q), over
        key blocks 0 to size - 1 (size at least the largest of ``num_blocks``; blocks past an example's own are
        never drawn)."""
        device = num_blocks.device
        qb = query_blocks[:, None, :, None]
        kb = torch.arange(size, device=device)[None, None, None, :]
        heads = torch.arange(num_heads, device=device)[None, :, None, None]
        u = hash_uniform(self.seed, layer, heads, qb, kb).float()  # (B or 1, H, Q, size)
        n = num_blocks[:, None, None, None]
        cand = (kb != qb) & (kb < n) & (qb < n)  # other blocks of the same example
        if causal:
            cand = cand & (kb < qb)
        u = torch.where(cand, u, torch.full_like(u, -1.0))
        top = u.topk(min(self.r, size), dim=-1)
        rel = torch.zeros(u.shape, dtype=torch.bool, device=device)
        return rel.scatter_(-1, top.indices, top.values >= 0)

    def relation(self, layout, *, layer, num_heads):
        if self.r == 0:
            return torch.zeros(layout.batch_size, 1, layout.length, layout.length, dtype=torch.bool,
                               device=layout.device)
        pos = layout.positions.clamp(min=0)  # (B, L) real-token index
        num_blocks = (layout.lengths + self.block - 1) // self.block
        rel = self.block_relation(num_blocks, layer=layer, num_heads=num_heads, causal=layout.causal)
        blk = pos // self.block  # (B, L)
        b = torch.arange(layout.batch_size, device=layout.device)[:, None, None, None]
        h = torch.arange(num_heads, device=layout.device)[None, :, None, None]
        return rel[b, h, blk[:, None, :, None], blk[:, None, None, :]]  # (B, H, L, L)

    def relation_rows(self, layout, rows, *, layer, num_heads):
        """``relation`` at the queries ``rows``, from their block rows alone (Lq x L / block draws, not (L / block)^2).
        Over a cache holding some keys (``given_positions``: a decoder's sliding window), a query still draws
        among every earlier block, held or not, as in the full mask."""
        B, L, Lq = layout.batch_size, layout.length, rows.shape[0]
        if self.r == 0:
            return torch.zeros(B, 1, Lq, L, dtype=torch.bool, device=layout.device)
        pos = layout.positions
        if layout.given_positions is None:
            num_blocks = (layout.lengths + self.block - 1) // self.block
            size = -(-L // self.block)  # positions are below L: nothing read back from the GPU
        else:
            if not layout.causal:
                raise ValueError(f"{self.spec()} over keys with given positions (a cache holding some keys) needs a "
                                 "decoder: an encoder's query draws among every block of its example")
            # a decoder's draws do not depend on the blocks after its query: the example's tokens so far will do
            num_blocks = pos.max(-1).values.clamp(min=0) // self.block + 1
            size = int(num_blocks.max())  # read back: caches holding some keys (sliding windows) run eagerly
        blk = pos.clamp(min=0) // self.block  # (B, L)
        rel = self.block_rows(blk[:, rows], num_blocks, size, layer=layer, num_heads=num_heads,
                              causal=layout.causal)  # (B, H, Lq, size)
        return rel.gather(-1, blk[:, None, None, :].expand(B, num_heads, Lq, L))

    def spec(self):
        extra = f", seed={self.seed}" if self.seed else ""
        return f"random_blocks({self.r}, block={self.block}{extra})"


@register
def random_blocks(r: int, block: int = 64, seed: int = 0) -> Pattern:
    """r random key blocks per query block (besides its own), BigBird's block-level random attention:
    blocks of `block` real tokens, drawn per head and per layer from a hash of (seed, layer, head, query
    block, key block).

    Use the kernel's block size (128 for the block backend) so that each drawn block is one full tile.
    Decoders draw only earlier blocks. A query block with fewer than r other candidates keeps them all."""
    return RandomBlocks(r, block, seed)



if __name__ == "__main__":  # draw it: python -m sparseattn.patterns.random_blocks
    from ..layout import TokenLayout
    from ..reports.masks import draw_pattern

    print(draw_pattern(random_blocks(2, block=4), TokenLayout.from_lengths([32]), path="random_blocks_2_block4.png"))
