"""Perplexity of a causal LM, under any plan, by the standard sliding window.

A document of n tokens is read in windows of ``context`` tokens that start every ``stride`` tokens (0,
stride, 2 stride, ...; the last window ends at the document's end). Each window scores only the tokens that
no earlier window scored, so every token but the first (which has no context) is scored exactly once, with
at least ``context - stride`` tokens before it. A window's first token is only context, so a window starts
at most one token before the previous one ended: with stride = context, consecutive windows share that one
token (else the token at each boundary would go unscored). This is the recipe of transformers' perplexity
guide with the tokens counted exactly (the guide weighs each window's mean loss by the number of its
targets, one more than it scores, and leaves every boundary token unscored when stride = context):

    perplexity = exp( sum over scored tokens of -log p(token | its window before it) / (n - 1) )

summed over every document (each file is one document; windows never cross files). The plan's sparsity
is measured on the windows as they ran (``sparseattn.sparsity``'s definition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from ..models import text_config
from ..plans.plan import Plan
from ..sparsity import SparsityReport, measure_plan


# -- checks -----------------------------------------------------------------------------------------
def model_positions(model) -> int | None:
    """How many positions the model has (max_position_embeddings), None if it does not say."""
    return getattr(text_config(model), "max_position_embeddings", None)


def check_context(model, context: int, *, what: str = "the model") -> None:
    """A context the model can take: at least 2 tokens, no more than its positions."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"the context must be an integer of at least 2 tokens, got {context!r}")
    n = model_positions(model)
    if n is not None and context > n:
        raise ValueError(f"the context of {context} tokens is longer than {what}'s {n} positions "
                         f"(max_position_embeddings); use a context of at most {n}")


def _leaves(pattern):
    parts = getattr(pattern, "parts", None)
    if not parts:
        yield pattern
        return
    for p in parts:
        yield from _leaves(p)


def check_plan_length(plan: Plan, context: int, num_layers: int, num_heads: int, *, what: str = "the plan") -> None:
    """Every stored mask of ``plan`` (static_mask, as Attention Pruning makes) covers ``context`` positions;
    else an error naming the layer, the mask and its length."""
    for lp in plan.resolve(num_layers, num_heads):
        for p in lp.patterns:
            for leaf in _leaves(p):
                n = getattr(leaf, "max_length", None)
                if isinstance(n, int) and n < context:
                    raise ValueError(f"{what}: layer {lp.layer}'s {leaf.spec()} stores a mask of {n} positions, "
                                     f"shorter than the context of {context} tokens; collect the mask at "
                                     f"{context} positions (ap collect --max-length {context}) or use a context "
                                     f"of at most {n}")


def check_plan_for_lm(plan: Plan) -> None:
    if plan.input_dependent:
        raise ValueError(f"the plan {plan.spec()!r} depends on each input's words (syntax, lexical, similar); the "
                         "language-model commands take position-only plans (neighbour, global_tokens, random, "
                         "static_mask, ...)")


# -- windows ----------------------------------------------------------------------------------------
def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a document of ``n`` tokens: windows start
every ``stride`` tokens, but at most one token before the previous window's end."""
    if not 1 <= stride <= context:
        raise ValueError(f"the stride must be in [1, context={context}], got {stride}")
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + context, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            return out
        begin = min(begin + stride, end - 1)


@dataclass
class Scored:
    """Summed negative log-likelihood (nats) and the number of tokens it sums over."""

    nll: float = 0.0
    tokens: int = 0

    def __add__(self, other: "Scored") -> "Scored":
        return Scored(self.nll + other.nll, self.tokens + other.tokens)

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")


def token_nll(model, ids: torch.Tensor, autocast=None) -> torch.Tensor:
    """(B, L-1) float32 -log p(ids[:, t] | ids[:, :t]) for t = 1..L-1, from one forward pass of (B, L) rows."""
    ctx = autocast() if autocast is not None else torch.autocast(ids.device.type, enabled=False)
    with ctx:
        logits = model(input_ids=ids, use_cache=False).logits
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


@torch.no_grad()
def score_document(model, ids, context: int, stride: int, *, batch_size: int = 4, autocast=None) -> tuple[Scored, dict]:
    """Sliding-window score of one document (1-D token ids); also {window length: how many windows ran}."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel()
    if n < 2:
        raise ValueError(f"a document needs at least 2 tokens to score one, got {n}")
    device = next(model.parameters()).device
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows(n, context, stride):
        by_len.setdefault(w[1] - w[0], []).append(w)
    total = torch.zeros((), dtype=torch.float64, device=device)
    counted = 0
    for length, ws in by_len.items():
        for s in range(0, len(ws), batch_size):
            part = ws[s:s + batch_size]
            batch = torch.stack([ids[b:e] for b, e, _ in part]).to(device)
            nll = token_nll(model, batch, autocast)  # (B, length - 1): entry t - 1 scores position begin + t
            first = torch.tensor([f - b for b, _, f in part], device=device)  # first scored offset in the window
            keep = torch.arange(1, length, device=device)[None, :] >= first[:, None]
            total += (nll.double() * keep).sum()
            counted += sum(e - f for _, e, f in part)
    if counted != n - 1:
        raise AssertionError(f"scored {counted} tokens of a document of {n}")
    return Scored(float(total), counted), {k: len(v) for k, v in by_len.items()}


def plan_sparsity(plan: Plan, num_layers: int, num_heads: int, rows_by_length: dict[int, int], *,
                  causal: bool = True, block_size: int | None = None) -> SparsityReport:
    """Sparsity of a position-only ``plan`` over full rows: {length: number of rows of that length}. Every row
    of one length has the same mask, so one row of each length is measured and counted that many times."""
    total = None
    layer_plans = plan.resolve(num_layers, num_heads)
    for length, count in sorted(rows_by_length.items()):
        rep = measure_plan(layer_plans, TokenLayout.from_lengths([length], causal=causal), block_size=block_size)
        rep = replace(rep, kept=rep.kept * count, allowed=rep.allowed * count, examples=count,
                      block_kept=None if rep.block_kept is None else rep.block_kept * count,
                      block_allowed=None if rep.block_allowed is None else rep.block_allowed * count)
        total = rep if total is None else total + rep
    if total is None:
        raise ValueError("plan_sparsity got no rows")
    return total


def perplexity(model, documents: list, *, context: int, stride: int | None = None, plan: Plan | None = None,
               batch_size: int = 4, autocast=None, names: list[str] | None = None) -> dict:
    """Sliding-window perplexity of ``model`` (a sparsified model runs its plan; pass that ``plan`` for the
    sparsity) over ``documents`` (1-D token ids each). Returns {'perplexity', 'loss', 'tokens', 'documents':
    [per document], 'windows', 'sparsity' (overall), 'sparsity_report'}."""
    stride = context if stride is None else stride
    check_context(model, context)
    cfg = text_config(model)
    plan = plan or Plan.dense()
    check_plan_for_lm(plan)
    check_plan_length(plan, context, cfg.num_hidden_layers, cfg.num_attention_heads)
    model.eval()
    total, per_doc, lengths = Scored(), [], {}
    for i, doc in enumerate(documents):
        s, by_len = score_document(model, doc, context, stride, batch_size=batch_size, autocast=autocast)
        total = total + s
        for k, v in by_len.items():
            lengths[k] = lengths.get(k, 0) + v
        per_doc.append({"name": names[i] if names else str(i), "tokens": s.tokens, "loss": s.loss,
                        "perplexity": s.perplexity})
    report = plan_sparsity(plan, cfg.num_hidden_layers, cfg.num_attention_heads, lengths)
    return {"perplexity": total.perplexity, "loss": total.loss, "tokens": total.tokens, "documents": per_doc,
            "windows": int(sum(lengths.values())), "context": context, "stride": stride, "plan": plan.spec(),
            "sparsity": report.overall, "sparsity_report": report}


@torch.no_grad()
def rows_score(model, rows: torch.Tensor, *, batch_size: int = 8, autocast=None) -> Scored:
    """The score of (N, L) rows, each read alone (L - 1 tokens scored per row): validation during training."""
    device = next(model.parameters()).device
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for s in range(0, len(rows), batch_size):
        total += token_nll(model, rows[s:s + batch_size].to(device, non_blocking=True), autocast).double().sum()
    return Scored(float(total), int(rows.shape[0]) * (int(rows.shape[1]) - 1))


def as_documents(ids_list) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.int64) for x in ids_list]
