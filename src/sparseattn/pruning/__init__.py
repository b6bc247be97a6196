"""Attention Pruning (Rugina et al., arXiv 2012.02030): data-informed global attention masks.

    from sparseattn.pruning import collect_attention, attention_pruning_mask, mask_plan
    stats = collect_attention(model, tokenizer, examples, length=64)      # sums and counts on a 64-grid
    keep = attention_pruning_mask(stats.cropped(stats.longest), 0.6)      # (layers, heads, N, N) bool
    plan = mask_plan(keep)                                                # one static_mask rule per layer
    save_plan(plan, "out/ap-p60", num_layers=..., num_heads=..., length=...)

The command line is ``sparseattn ap collect`` / ``sparseattn ap mask`` (see docs/attention-pruning.md).
"""

from .collect import AttentionStats, Example, RecordingBackend, collect_attention
from .mask import (BUDGETS, SCOPES, attention_pruning_mask, block_mask, candidates, data_report, expand_to_blocks,
                   grid_report, mask_plan, random_like, thresholds)

__all__ = [
    "AttentionStats", "Example", "RecordingBackend", "collect_attention",
    "attention_pruning_mask", "block_mask", "expand_to_blocks", "random_like", "candidates", "mask_plan",
    "grid_report", "data_report", "thresholds", "SCOPES", "BUDGETS",
]
