"""A run's results record: its key (a hash of the configuration), the package versions and device it ran
on, and where it is written (``results.json``)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from .._version import __version__


def run_key(config: dict) -> str:
    """A stable hash of a run's configuration (canonical JSON, sorted keys)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def package_versions() -> dict:
    import transformers  # here, not at the top: importing transformers takes seconds

    v = {"sparseattn": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
         "numpy": np.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def loss_curve(losses: torch.Tensor, points: int = 50) -> dict:
    """Per-step losses averaged over windows, about ``points`` of them."""
    values = losses.float().cpu().numpy()
    window = max(1, len(values) // points)
    return {"window_steps": window,
            "values": [float(values[i:i + window].mean()) for i in range(0, len(values), window)]}


def write_results(result: dict, out_dir) -> Path:
    """Write ``result`` to ``out_dir/results.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def one_class_warning(result: dict) -> str | None:
    """A warning when a run's model gave every evaluation example the same class (it learned nothing of the
    input; its metrics are the majority-class reference's at best), else None."""
    counts = result.get("predicted_classes")
    if not counts or sum(1 for n in counts.values() if n) != 1:
        return None
    cls = next(c for c, n in counts.items() if n)
    ref = result.get("majority_reference") or {}
    main = result.get("main_metric")
    note = ""
    if ref and main in ref.get("metrics", {}):
        note = f"; always '{ref['class']}' scores {main} {100 * ref['metrics'][main]:.2f}"
    return f"predicts '{cls}' for every one of the {sum(counts.values())} evaluation examples{note}"
