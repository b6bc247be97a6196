"""The README's code blocks, run as a new user types them: in a fresh shell (no GLUE_DIR, the package's
environment activated by the README's own line) in a folder laid out like a checkout next to
``../shared/data/glue``. Lines marked ``# long:`` (full-size runs, GPU benchmarks) are only parsed by the
command line; the small variant beside each is run. ``make`` lines are not run (they are the suite).

Needs the GLUE TSVs (GLUE_DIR, as ``make test`` sets it); about four minutes on two CPU cores."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sparseattn.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LONG = re.compile(r"#\s*long:")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def shell_lines(body: str) -> list[str]:
    """The block's commands: continuation lines joined, comment-only and blank lines dropped."""
    out, cur = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        line, cur = cur + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def readme_commands() -> tuple[list[str], list[str], str]:
    """(lines to run, long lines to parse only, the Python blocks as one script)."""
    run, parse_only, python = [], [], []
    for lang, body in code_blocks(README.read_text()):
        if lang == "python":
            python.append(body)
        elif lang == "bash":
            for line in shell_lines(body):
                if line.startswith("make "):
                    continue
                (parse_only if LONG.search(line) else run).append(line)
    return run, parse_only, "\n".join(python)


def test_readme_has_commands():
    run, parse_only, python = readme_commands()
    assert any(line.startswith("source ") for line in run) and any("GLUE_DIR" in line for line in run)
    assert len(run) >= 10 and len(parse_only) >= 5 and "sparsify" in python


@pytest.mark.parametrize("line", readme_commands()[1])
def test_long_readme_lines_parse(line):
    argv = shlex.split(line, comments=True)
    assert argv[0] == "sparseattn", line
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on a bad option
    if argv[1] == "sweep":
        assert (REPO / args.spec).is_file(), f"{line}: no {args.spec}"


@pytest.mark.slow
def test_readme_runs_as_typed(tmp_path):
    glue = os.environ.get("GLUE_DIR")
    if not glue or not (Path(glue) / "SST-2" / "train.tsv").is_file():
        pytest.skip("needs the GLUE TSVs: set GLUE_DIR (make test does)")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip("runs the README's `source .venv/bin/activate`: needs the tests to run in a virtual environment")
    # a checkout's neighbourhood: repo/ (its studies/ and .venv) beside shared/data/glue (and books)
    repo = tmp_path / "repo"
    (repo / "studies").mkdir(parents=True)
    for spec in (REPO / "studies").glob("*.yaml"):
        (repo / "studies" / spec.name).write_text(spec.read_text())
    (repo / ".venv").symlink_to(venv)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "glue").symlink_to(Path(glue).resolve())
    books = Path(glue).resolve().parent / "books"  # the books beside GLUE, as in ../shared/data
    if books.is_dir():
        (tmp_path / "shared" / "data" / "books").symlink_to(books)

    run, _, python = readme_commands()
    script = ["set -euo pipefail"]
    for line in run:
        script += [f"echo \">>> [$SECONDS s]\" {shlex.quote(line)}", line]
    script += ["echo '>>> the Python blocks'", "python - <<'PY'", python, "PY"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SPARSEATTN_CACHE": str(tmp_path / "cache")}  # no GLUE_DIR: the README's export line sets it
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    (tmp_path / "readme.log").write_text(out)  # what a user would have seen, kept for a look
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(">>> ")][-1:]
    assert proc.returncode == 0, f"README line failed: {failed}\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    assert (repo / "out" / "report-tiny" / "report.html").is_file()
