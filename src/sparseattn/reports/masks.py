"""Drawing masks: as text (for terminals) and as PNG (matplotlib, imported when a picture is drawn: it is
slow to import and the rest of sparseattn does not need it)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..layout import TokenLayout
from ..patterns.base import Pattern


def mask_text(mask: torch.Tensor, tokens: list[str] | None = None, *, keep: str = "■", drop: str = "·") -> str:
    """A (L, L) keep-mask as rows of characters, with token labels when given."""
    m = mask.bool().cpu()
    L = m.shape[-1]
    labels = [str(t) for t in tokens] if tokens is not None else [str(i) for i in range(L)]
    w = max(len(s) for s in labels[:L]) if L else 0
    rows = [f"{labels[i]:>{w}} " + " ".join(keep if m[i, j] else drop for j in range(L)) for i in range(L)]
    return "\n".join(rows)


def draw_mask(mask: torch.Tensor, *, title: str = "", path=None, tokens: list[str] | None = None):
    """Draw one (L, L) keep-mask; saves a PNG when ``path`` is given and returns the path or the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    m = mask.bool().cpu().numpy()
    L = m.shape[-1]
    size = min(12, 2 + 0.25 * L)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if tokens is not None and L <= 64:
        ax.set_xticks(range(L), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(L), tokens, fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_pattern(pattern: Pattern, layout: TokenLayout | None = None, *, path=None, layer: int = 0, head: int = 0,
                 tokens: list[str] | None = None):
    """Draw ``pattern``'s mask for one example (a 16-token sequence with a special token at each end by
    default); saves a PNG when ``path`` is given and returns the path or the figure."""
    layout = layout or TokenLayout.from_lengths([16], special_first=1, special_last=1)
    m = pattern.mask(layout, layer=layer, num_heads=head + 1)
    return draw_mask(m[0, min(head, m.shape[1] - 1)], title=pattern.name, path=path, tokens=tokens)


def draw_layers(masks: list[torch.Tensor], *, titles: list[str], path, tokens: list[str] | None = None,
                suptitle: str = ""):
    """A grid of (L, L) masks (one per layer, say) in one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(masks)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, m, t in zip(axes.flat, masks, titles):
        L = m.shape[-1]
        ax.imshow(m.bool().cpu().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(t, fontsize=9)
        if tokens is not None and L <= 40:
            ax.set_xticks(range(L), tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(L), tokens, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
