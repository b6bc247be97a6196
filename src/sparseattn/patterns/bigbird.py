"""bigbird(g, k, r): BigBird's union of global tokens, a neighbour window and random keys."""

from __future__ import annotations

from .base import Union, check_int, register
from .global_tokens import GlobalTokens
from .neighbour import Neighbour
from .random import Random


class BigBird(Union):
    def __init__(self, global_tokens: int, neighbour: int, random: int, seed: int = 0):
        self.g = check_int(global_tokens, "bigbird global_tokens")
        self.k = check_int(neighbour, "bigbird neighbour")
        self.r = check_int(random, "bigbird random")
        self.seed = check_int(seed, "bigbird seed")
        super().__init__((GlobalTokens(self.g), Neighbour(self.k), Random(self.r, self.seed)))
        self.name = f"bigbird_{self.g}_{self.k}_{self.r}" + (f"_seed{self.seed}" if self.seed else "")

    def spec(self):
        args = f"{self.g}, {self.k}, {self.r}" + (f", seed={self.seed}" if self.seed else "")
        return f"bigbird({args})"


@register
def bigbird(global_tokens: int, neighbour: int, random: int, seed: int = 0):
    """BigBird (Zaheer et al. 2020): global_tokens(g) | neighbour(k) | random(r).

    A degree of 0 drops that component (neighbour 0 leaves only the diagonal)."""
    return BigBird(global_tokens, neighbour, random, seed)


if __name__ == "__main__":  # draw it: python -m sparseattn.patterns.bigbird
    from ..reports.masks import draw_pattern

    print(draw_pattern(bigbird(1, 2, 2), path="bigbird_1_2_2.png"))
