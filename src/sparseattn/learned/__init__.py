"""Learned sparsity: learn each head's neighbour degree while penalizing density (Breaking BERT, part 3).

    degrees = attach_degrees(model, init_degree=32, global_tokens=1)
    loss = task_loss + lam * degrees.expected_density(layout)     # during training, annealing T
    plan = degrees.to_plan()                                      # hard windows: an ordinary plan
"""

from __future__ import annotations

from ..integrations.hf import sparsify, unsparsify
from ..models import text_config
from ..plans.plan import Plan
from .backend import SoftWindowBackend
from .soft_window import SoftNeighbourDegrees, annealed_temperature

ATTR = "sparseattn_degrees"


def attach_degrees(model, *, init_degree: float = 32.0, global_tokens: int = 1, temperature: float = 4.0,
                   layers: list[int] | None = None, tokenizer=None) -> SoftNeighbourDegrees:
    """Make ``model`` attend through learnable soft windows; returns the degrees module (also registered
    as ``model.sparseattn_degrees`` so it moves with the model). Its parameters are the degrees."""
    cfg = text_config(model)
    degrees = SoftNeighbourDegrees(cfg.num_hidden_layers, cfg.num_attention_heads, init_degree=init_degree,
                                   global_tokens=global_tokens, temperature=temperature, layers=layers)
    p = next(model.parameters())
    degrees.to(device=p.device)
    sparsify(model, Plan.dense(), backend=SoftWindowBackend(degrees), tokenizer=tokenizer)
    model.add_module(ATTR, degrees)
    return degrees


def detach_degrees(model) -> SoftNeighbourDegrees | None:
    """Back to ordinary attention; returns the degrees module that was attached."""
    degrees = getattr(model, ATTR, None)
    if degrees is not None:
        del model._modules[ATTR]
    unsparsify(model)
    return degrees


__all__ = ["SoftNeighbourDegrees", "SoftWindowBackend", "attach_degrees", "detach_degrees", "annealed_temperature"]
