"""Pictures of Attention Pruning: the averaged attention and the mask, one panel per (layer, head).

Panels are tiled into one image (layers down, heads across), so a 32 x 32-head model draws as fast as
a small one. Pairs that cannot carry attention (a decoder's future) and pairs never observed are blank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .collect import AttentionStats


def _mosaic(panels: np.ndarray, gap: int) -> np.ndarray:
    """(rows, cols, N, N) -> one (rows*(N+gap)-gap, cols*(N+gap)-gap) array, NaN between panels."""
    R, C, N, _ = panels.shape
    out = np.full((R * (N + gap) - gap, C * (N + gap) - gap), np.nan)
    for r in range(R):
        for c in range(C):
            out[r * (N + gap):r * (N + gap) + N, c * (N + gap):c * (N + gap) + N] = panels[r, c]
    return out


def _select(n: int, which: Sequence[int] | None, what: str) -> list[int]:
    which = list(range(n)) if which is None else list(which)
    bad = [i for i in which if not 0 <= i < n]
    if bad:
        raise ValueError(f"{what} {bad[0]} is out of range (0-{n - 1})")
    return which


def _draw(image: np.ndarray, *, rows: list[int], cols: list[int], N: int, gap: int, path, title: str,
          row_labels: list[str], norm=None, cmap: str = "viridis", colorbar: str | None = None):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cell = min(1.2, 22.0 / max(len(cols), len(rows)))  # inches per panel, capped for big models
    fig, ax = plt.subplots(figsize=(1.6 + cell * len(cols) + (1.2 if colorbar else 0), 1.0 + cell * len(rows)))
    cm = matplotlib.colormaps[cmap].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(image), cmap=cm, norm=norm, interpolation="nearest")
    ax.set_xticks([c * (N + gap) + (N - 1) / 2 for c in range(len(cols))], [f"h{h}" for h in cols],
                  fontsize=7 if len(cols) <= 16 else 5)
    ax.set_yticks([r * (N + gap) + (N - 1) / 2 for r in range(len(rows))], row_labels,
                  fontsize=7 if len(rows) <= 16 else 5)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_title(title, fontsize=9)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label=colorbar)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=max(100, int(min(2 * N, 300) / cell)))  # about two pixels per grid cell
    plt.close(fig)
    return path


def draw_attention(stats: AttentionStats, path, *, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, title: str | None = None) -> Path:
    """PNG of the averaged attention, rows = layers, columns = heads, log colour scale (query down, key
    across in every panel)."""
    from matplotlib.colors import LogNorm

    rows = _select(stats.num_layers, layers, "layer")
    cols = _select(stats.num_heads, heads, "head")
    N = stats.length
    mean = stats.mean()[rows][:, cols].numpy().copy()
    seen = (stats.allowed() & (stats.counts > 0)).numpy()
    mean[..., ~seen] = np.nan
    positive = mean[np.isfinite(mean) & (mean > 0)]
    lo = max(float(np.percentile(positive, 1)) if positive.size else 1e-6, 1e-6)  # robust to a few tiny values
    gap = max(1, N // 16)
    meta = stats.metadata
    model = Path(str(meta.get("model", "model")))
    model = model.parent.name if model.name == "model" and model.parent.name else model.name  # a name, not a path
    title = title or (f"mean attention, {model} on {meta.get('data', 'data')}: "
                      f"{stats.num_examples} examples, grid {N}")
    return _draw(_mosaic(mean, gap), rows=rows, cols=cols, N=N, gap=gap, path=path, title=title,
                 row_labels=[f"layer {i}" for i in rows], norm=LogNorm(vmin=lo, vmax=1.0),
                 colorbar="mean probability")


def draw_mask(keep: torch.Tensor, path, *, allowed: torch.Tensor | None = None, layers: Sequence[int] | None = None,
              heads: Sequence[int] | None = None, title: str = "", row_sparsity: Sequence[float] | None = None) -> Path:
    """PNG of a (layers, heads, N, N) keep-mask: black = kept, light = pruned, blank = not allowed.
    ``row_sparsity``: one figure per layer to print beside it."""
    rows = _select(keep.shape[0], layers, "layer")
    cols = _select(keep.shape[1], heads, "head")
    N = keep.shape[-1]
    img = keep[rows][:, cols].float().numpy().copy()
    if allowed is not None:
        img[..., ~allowed.numpy()] = np.nan
    gap = max(1, N // 16)
    labels = [f"layer {i}" + (f"\n{row_sparsity[i]:.0%} pruned" if row_sparsity is not None else "") for i in rows]
    from matplotlib.colors import Normalize

    return _draw(_mosaic(img, gap), rows=rows, cols=cols, N=N, gap=gap, path=path, title=title, row_labels=labels,
                 cmap="Greys", norm=Normalize(vmin=-0.3, vmax=1.0))  # pruned: light grey, blank: white
