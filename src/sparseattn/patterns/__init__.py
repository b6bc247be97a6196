"""Attention patterns: one small factory per pattern, each with a stable descriptive name.

>>> from sparseattn.patterns import neighbour, global_tokens
>>> (neighbour(2) | global_tokens(1)).name
'or(neighbour_2,global_tokens_1)'
"""

from .base import REGISTRY, Intersection, Pattern, Union, intersection, union
from .bigbird import bigbird
from .causal import causal
from .full import full
from .global_tokens import global_tokens
from .lexical import lexical, similar
from .neighbour import neighbour
from .random import random
from .random_blocks import random_blocks
from .static import static_mask
from .strided import strided
from .syntax import syntax

__all__ = [
    "Pattern", "Union", "Intersection", "union", "intersection", "REGISTRY",
    "neighbour", "global_tokens", "random", "random_blocks", "strided", "full", "causal", "bigbird",
    "syntax", "lexical", "similar", "static_mask",
]
