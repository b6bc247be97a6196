"""Where sparseattn keeps what it can make again: $SPARSEATTN_CACHE, else $XDG_CACHE_HOME/sparseattn, else
~/.cache/sparseattn."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("SPARSEATTN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sparseattn")
    return Path(base)
