"""Saving a plan with its masks: a folder with ``plan.json`` (the spec and metadata) and
``masks.safetensors`` (stored tables such as Attention Pruning masks, and the materialized per-layer
masks of position-only rules at a reference length, to check on load that the plan means the same)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..layout import TokenLayout
from .plan import Plan

FORMAT = "sparseattn-plan/1"


def is_plan_path(s: str) -> bool:
    p = Path(s)
    return (p.is_dir() and (p / "plan.json").exists()) or (p.suffix == ".json" and p.exists())


def as_plan(plan: Plan | str) -> Plan:
    """A Plan from a Plan, a spec string, or a saved plan's path (its folder or plan.json)."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        return load_plan(Path(plan)) if is_plan_path(plan) else Plan.parse(plan)
    raise TypeError(f"plan must be a Plan, a spec string or a saved plan's path, got {type(plan).__name__}")


def save_plan(plan: Plan, path, *, num_layers: int | None = None, num_heads: int | None = None,
              length: int | None = None, metadata: dict | None = None) -> Path:
    """Write ``plan`` to the folder ``path``. With num_layers, num_heads and length, also store every
    layer's keep-mask for one example of ``length`` tokens (position-only rules), checked on load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"table/{k}": v.contiguous() for k, v in plan.tensors().items()}
    info = {"format": FORMAT, "sparseattn_version": __version__, "spec": plan.spec(), "name": plan.name,
            "metadata": metadata or {}}
    if num_layers is not None and num_heads is not None and length is not None:
        layout = TokenLayout.from_lengths([length])
        checked = []
        for lp in plan.resolve(num_layers, num_heads):
            if any(p.input_dependent for p in lp.patterns):
                continue
            tensors[f"layer/{lp.layer}"] = lp.mask(layout)[0].expand(num_heads, -1, -1).contiguous()
            checked.append(lp.layer)
        info.update(num_layers=num_layers, num_heads=num_heads, length=length, materialized_layers=checked)
    save_file(tensors, str(path / "masks.safetensors"), metadata={"format": FORMAT})
    (path / "plan.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def load_plan(path, *, verify: bool = True) -> Plan:
    """Load a plan saved by ``save_plan`` (the folder, or its plan.json)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta_file = folder / "plan.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file} does not exist; a saved plan is a folder with plan.json and "
                                "masks.safetensors")
    try:
        info = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if info.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: format {info.get('format')!r}, expected {FORMAT!r}")
    tfile = folder / "masks.safetensors"
    tensors = load_file(str(tfile)) if tfile.exists() else {}
    tables = {k[len("table/"):]: v for k, v in tensors.items() if k.startswith("table/")}
    plan = Plan.parse(info["spec"], tables=tables)
    if verify and info.get("materialized_layers"):
        layout = TokenLayout.from_lengths([info["length"]])
        for lp in plan.resolve(info["num_layers"], info["num_heads"]):
            if lp.layer in info["materialized_layers"]:
                got = lp.mask(layout)[0].expand(info["num_heads"], -1, -1)
                if not torch.equal(got, tensors[f"layer/{lp.layer}"]):
                    raise ValueError(f"{folder}: layer {lp.layer}'s mask differs from the one saved (saved with "
                                     f"sparseattn {info.get('sparseattn_version')}); the pattern's meaning changed")
    return plan


def plan_metadata(path) -> dict:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return json.loads((folder / "plan.json").read_text())
