"""sparseattn: which attention connections does a model need, and how to make it cheaper.

    import sparseattn as sa
    plan = sa.Plan.parse("later-half: neighbour(2) | global_tokens(1)")
    sa.sparsify(model, plan)            # exact masked attention (reference backend)
    enc = sa.encode(tokenizer, texts)   # tokens + the per-example structure input-dependent patterns need
    model(**enc)
    sa.measure_sparsity(model, enc)     # per layer, per head, overall
"""

from ._version import __version__ as __version__
from .errors import ConfigError, DataError, NotFoundError, SparseattnError, StorageError
from .integrations.hf import (
    UnsupportedModelError, compile_outside_attention, plan_of, sparsify, unsparsify, use_dense_sdpa,
)
from .layout import TokenLayout
from .model_sparsity import measure_sparsity
from .patterns import (
    Pattern, bigbird, causal, full, global_tokens, intersection, lexical, neighbour, random, similar,
    static_mask, strided, syntax, union,
)
from .plans import Plan, PlanError, PlanFileError, PlanSpecError, Rule, load_plan, parse_pattern, save_plan
from .sparsity import SparsityReport, mask_sparsity, measure_plan
from .text.padding_free import repad, unpad
from .text.parse import ParseCache
from .text.structure import BatchStructure, encode



def __getattr__(name):
    # the evicting cache subclasses transformers' Cache: imported when first asked for, so that
    # ``import sparseattn`` does not import transformers
    if name in ("generation_cache", "SinkWindowCache"):
        from .integrations import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'sparseattn' has no attribute {name!r}")


__all__ = [
    "Pattern", "neighbour", "global_tokens", "random", "strided", "full", "causal", "bigbird", "syntax",
    "lexical", "similar", "static_mask", "union", "intersection",
    "Plan", "Rule", "PlanError", "PlanSpecError", "PlanFileError", "parse_pattern", "save_plan", "load_plan",
    "TokenLayout", "SparsityReport", "mask_sparsity", "measure_plan", "measure_sparsity",
    "sparsify", "unsparsify", "plan_of", "UnsupportedModelError", "compile_outside_attention", "use_dense_sdpa",
    "generation_cache", "SinkWindowCache",
    "encode", "BatchStructure", "ParseCache", "unpad", "repad",
    "SparseattnError", "ConfigError", "DataError", "NotFoundError", "StorageError",
]
