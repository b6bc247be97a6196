"""sparseattn: which attention connections does a model need, and how to make it cheaper.

    import sparseattn as sa
    plan = sa.Plan.parse("later-half: neighbour(2) | global_tokens(1)")
    sa.sparsify(model, plan)            # exact masked attention (reference backend)
    enc = sa.encode(tokenizer, texts)   # tokens + the per-example structure input-dependent patterns need
    model(**enc)
    sa.measure_sparsity(model, enc)     # per layer, per head, overall
"""

__version__ = "0.1.0"

from .integrations.hf import UnsupportedModelError, compile_outside_attention, plan_of, sparsify, unsparsify  # noqa: E402
from .layout import TokenLayout  # noqa: E402
from .patterns import (  # noqa: E402
    Pattern, bigbird, causal, full, global_tokens, intersection, lexical, neighbour, random, similar,
    static_mask, strided, syntax, union,
)
from .plans import Plan, PlanError, PlanSpecError, Rule, load_plan, parse_pattern, save_plan  # noqa: E402
from .sparsity import SparsityReport, mask_sparsity, measure_plan  # noqa: E402
from .text.parse import ParseCache  # noqa: E402
from .text.structure import BatchStructure, encode  # noqa: E402
from .measure import measure_sparsity  # noqa: E402

__all__ = [
    "Pattern", "neighbour", "global_tokens", "random", "strided", "full", "causal", "bigbird", "syntax",
    "lexical", "similar", "static_mask", "union", "intersection",
    "Plan", "Rule", "PlanError", "PlanSpecError", "parse_pattern", "save_plan", "load_plan",
    "TokenLayout", "SparsityReport", "mask_sparsity", "measure_plan", "measure_sparsity",
    "sparsify", "unsparsify", "plan_of", "UnsupportedModelError", "compile_outside_attention",
    "encode", "BatchStructure", "ParseCache",
]
