"""benchmarks/prefill_ceiling.py: the fit of dense prefill times and the plan's causal tile density behind the
ceiling that docs/benchmarks.md quotes for issue 25."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("prefill_ceiling", ROOT / "benchmarks" / "prefill_ceiling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _causal_tiles(L, w, bs=128):
    """Tiles of 128 that `global_tokens(1) | neighbour(w)` keeps among the causal ones, counted by hand: a query tile
    keeps the key tiles its window reaches and the first (the global token's)."""
    n = L // bs
    kept = sum(len(set(range(max(0, (bs * i - w) // bs), i + 1)) | {0}) for i in range(n))
    return kept / (n * (n + 1) // 2)


def test_the_fit_separates_the_work_outside_attention_and_the_ceiling_uses_the_plans_tiles(tmp_path):
    mod = _module()
    n, a = 2e-3, 5e-8  # ms per token outside attention, ms per L^2 x B of dense attention
    t = lambda L, B: n * L * B + a * L * L * B  # noqa: E731
    rows = [{"model": "x", "length": L, "batch": B, "method": "dense", "cache": "dynamic", "prefill_ms": t(L, B)}
            for L, B in ((1024, 8), (2048, 4), (2048, 1))]
    rows.append({"model": "x", "length": 2048, "batch": 4, "method": "dense-flash", "cache": "dynamic",
                 "prefill_ms": 2 * t(2048, 4)})  # slower: the fastest dense of the cell is fitted
    plan = "all: global_tokens(1) | neighbour(300)"
    rows.append({"model": "x", "length": 2048, "batch": 4, "method": "sparse", "cache": "dynamic", "plan": plan,
                 "prefill_ms": 20.0})
    (tmp_path / "b.json").write_text(json.dumps({"meta": {}, "results": rows}))
    got = mod.fit({(r["length"], r["batch"]): r["prefill_ms"] for r in rows if r["method"] == "dense"})
    assert got == pytest.approx((n, a), rel=1e-9)
    density = mod.plan_density(plan, 2048, 1, 1)
    assert density == pytest.approx(_causal_tiles(2048, 300))  # the backend's own layout, counted another way
    ceiling = n * 2048 * 4 + density * a * 2048 * 2048 * 4
    text = mod.table(mod.load_rows([tmp_path / "b.json"]))
    assert f"| x | 2048 | 4 | {t(2048, 4):,.0f} (+0.0%) | {ceiling:,.0f} | {t(2048, 4) / ceiling:.2f}x | sparse | 20 |" \
        in text
    # one length only: nothing to separate, said in the table
    only = [r for r in rows if r["length"] == 2048]
    assert "needs dense cells at two lengths" in mod.table(only)
    with pytest.raises(SystemExit, match="MODEL:LENGTH:BATCH:METHOD:MS"):
        mod.parse_row("1b:32768:16:5072")
