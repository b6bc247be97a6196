"""The Triton kernel as Triton compiles it for a Hopper GPU, checked on the CPU (benchmarks/kernel_resources.py):
every loop over a tile list pipelines its key/value (or query/dO) loads into shared memory ahead of the dot
products (asynchronous copies in the compiled TTGIR), for whole rows and for the segments of padded and packed
batches alike. A branch in a loop body silently stops Triton from pipelining the loads behind it (the segmented
kernels had no asynchronous copy at all that way), which no numerical test notices. The compilation needs no GPU
(Triton ships ptxas and cuobjdump); it runs in a subprocess because conftest.py has the kernels interpreted in
this one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _compiled(*flags: str, configs: str = "fixed") -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--configs", configs,
                           "--head-dims", "64", "--json", *flags], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_segmented_kernels_pipeline_their_loads_like_whole_rows():
    whole, segments = _compiled(), _compiled("--varlen")
    assert [r["kernel"] for r in whole] == [r["kernel"] for r in segments] == ["fwd", "dq", "dkdv"]
    for w, s in zip(whole, segments):
        assert "error" not in w and "error" not in s, (w, s)
        assert w["async_copies"] > 0, f"{w['kernel']}: the whole-row kernel's loop loads are not pipelined"
        # the segmented kernel masks some loads the whole-row one does not, which costs it a few copies at most
        assert s["async_copies"] >= w["async_copies"] // 2, (
            f"{w['kernel']}: the segmented kernel has {s['async_copies']} asynchronous copies, the whole-row one "
            f"{w['async_copies']}: a loop over its lists is not pipelined")


def test_half_tile_candidates_pipeline_their_loads():
    """The autotuner's candidates whose programs own half a tile (ROWS 64 of 128) pipeline their loads as the
    whole-tile ones do, for whole rows and segments: the row offset inside the tile is no branch in the loop."""
    for flags in ((), ("--varlen",)):
        half = _compiled("--rows", "64", *flags, configs="candidates")
        assert {r["kernel"] for r in half} == {"fwd", "dq", "dkdv"} and all(r["rows"] == 64 for r in half)
        for r in half:
            assert "error" not in r, r
            assert r["async_copies"] > 0, f"{r}: a half-tile program's loop loads are not pipelined"
