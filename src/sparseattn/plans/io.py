"""Saving a plan with its masks: a folder with ``plan.json`` (the spec and metadata) and
``masks.safetensors`` (stored tables such as Attention Pruning masks, and the materialized per-layer
masks of position-only rules at a reference length, to check on load that the plan means the same).
``plan.json`` also holds a digest of every stored table, so a table changed anywhere, also beyond the
reference length, is caught on load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..errors import ConfigTypeError, NotFoundError
from ..layout import TokenLayout
from .errors import PlanFileError, PlanSpecError
from .plan import Plan

FORMAT = "sparseattn-plan/1"


def is_plan_path(s: str) -> bool:
    try:
        p = Path(s)
        return (p.is_dir() and (p / "plan.json").exists()) or (p.suffix == ".json" and p.exists())
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a path
        return False


def _looks_like_path(s: str) -> bool:
    """Text that means a file or folder rather than a spec (specs have no slashes and do not end in .json)."""
    try:
        return "/" in s or "\\" in s or s.strip().endswith(".json") or Path(s).exists()
    except (OSError, ValueError):
        return False


def as_plan(plan: Plan | str) -> Plan:
    """A Plan from a Plan, a spec string, or a saved plan's path (its folder or plan.json)."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        if is_plan_path(plan):
            return load_plan(Path(plan))
        try:
            return Plan.parse(plan)
        except PlanSpecError:
            if not _looks_like_path(plan):
                raise
        p = Path(plan)
        if p.is_dir():
            raise PlanFileError(f"{p}: this folder has no plan.json; a saved plan is a folder with plan.json and "
                                "masks.safetensors (written by save_plan or finetune --save-model)")
        raise NotFoundError(f"no saved plan at {plan!r}: the path does not exist (a plan is a spec such as "
                            "'later-half: neighbour(2)', or a saved plan's folder)")
    raise ConfigTypeError(f"plan must be a Plan, a spec string or a saved plan's path, got {type(plan).__name__}")


def table_digest(t: torch.Tensor) -> str:
    """A hash of a stored table's dtype, shape and every value."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())  # any dtype's bytes
    return h.hexdigest()[:32]


def save_plan(plan: Plan, path, *, num_layers: int | None = None, num_heads: int | None = None,
              length: int | None = None, metadata: dict | None = None) -> Path:
    """Write ``plan`` to the folder ``path``. With num_layers, num_heads and length, also store every
    layer's keep-mask for one example of ``length`` tokens (position-only rules), checked on load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"table/{k}": v.contiguous() for k, v in plan.tensors().items()}
    info = {"format": FORMAT, "sparseattn_version": __version__, "spec": plan.spec(), "name": plan.name,
            "metadata": metadata or {}, "table_digests": {k: table_digest(v) for k, v in plan.tensors().items()}}
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


def _read_info(folder: Path) -> dict:
    meta_file = folder / "plan.json"
    if not meta_file.is_file():
        raise NotFoundError(f"{meta_file} does not exist; a saved plan is a folder with plan.json and "
                            "masks.safetensors")
    try:
        info = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PlanFileError(f"{meta_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise PlanFileError(f"{meta_file}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                            f"{e.start})") from None
    except OSError as e:
        raise PlanFileError(f"{meta_file}: cannot be read ({e.strerror or e})") from None
    if not isinstance(info, dict):
        raise PlanFileError(f"{meta_file}: expected a JSON object with 'format' and 'spec', got a "
                            f"{type(info).__name__}")
    if info.get("format") != FORMAT:
        raise PlanFileError(f"{meta_file}: format {info.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(info.get("spec"), str):
        raise PlanFileError(f"{meta_file}: 'spec' must be the plan's spec as a string, got "
                            f"{info.get('spec', '(none)')!r}")
    return info


def _field(info: dict, name: str, meta_file: Path, check, expected: str):
    v = info.get(name)
    if not check(v):
        raise PlanFileError(f"{meta_file}: '{name}' must be {expected}, got {v!r}")
    return v


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def load_plan(path, *, verify: bool = True) -> Plan:
    """Load a plan saved by ``save_plan`` (the folder, or its plan.json)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta_file = folder / "plan.json"
    info = _read_info(folder)
    tfile = folder / "masks.safetensors"
    try:
        tensors = load_file(str(tfile)) if tfile.exists() else {}
    except Exception as e:  # safetensors raises its own SafetensorError (truncated, garbage) or OSError
        raise PlanFileError(f"{tfile}: cannot be read as safetensors ({type(e).__name__}: {e}); save the plan "
                            "again") from None
    tables = {k[len("table/"):]: v for k, v in tensors.items() if k.startswith("table/")}
    digests = info.get("table_digests")
    if verify and digests is not None:
        if not isinstance(digests, dict):
            raise PlanFileError(f"{meta_file}: 'table_digests' must be a mapping of table key to digest, got "
                                f"{digests!r}")
        for key, digest in digests.items():
            if key not in tables:
                raise PlanFileError(f"{tfile}: the table {key!r} that {meta_file.name} lists is missing")
            if table_digest(tables[key]) != digest:
                raise PlanFileError(f"{tfile}: the table {key!r} differs from the one saved (its digest is "
                                    f"{table_digest(tables[key])}, {meta_file.name} says {digest!r}); the file "
                                    "was changed after it was saved")
    try:
        plan = Plan.parse(info["spec"], tables=tables)
    except PlanSpecError as e:
        raise PlanSpecError(f"{meta_file}: 'spec': {e.reason}", e.text, e.start, e.end) from None
    if verify and info.get("materialized_layers"):
        layers = _field(info, "materialized_layers", meta_file,
                        lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                              for i in v), "a list of layer indices")
        num_layers = _field(info, "num_layers", meta_file, _positive_int, "a positive integer")
        num_heads = _field(info, "num_heads", meta_file, _positive_int, "a positive integer")
        length = _field(info, "length", meta_file, _positive_int, "a positive integer (the reference length)")
        for i in layers:
            t = tensors.get(f"layer/{i}")
            if t is None or tuple(t.shape) != (num_heads, length, length):
                got = "missing" if t is None else f"of shape {tuple(t.shape)}"
                raise PlanFileError(f"{tfile}: the saved mask 'layer/{i}' is {got}; {meta_file.name} says a "
                                    f"({num_heads}, {length}, {length}) mask of every layer in {layers}")
        layout = TokenLayout.from_lengths([length])
        for lp in plan.resolve(num_layers, num_heads):
            if lp.layer in layers:
                got = lp.mask(layout)[0].expand(num_heads, -1, -1)
                if not torch.equal(got, tensors[f"layer/{lp.layer}"]):
                    raise PlanFileError(f"{folder}: layer {lp.layer}'s mask differs from the one saved (saved "
                                        f"with sparseattn {info.get('sparseattn_version')}); the pattern's meaning "
                                        "changed")
    return plan


def plan_metadata(path) -> dict:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return _read_info(folder)
