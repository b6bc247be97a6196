"""Every command's --help: each option explained once (its default printed once), no literal "%%", examples."""

from __future__ import annotations

import argparse

import pytest

from sparseattn.cli import build_parser

NO_HELP_ALLOWED: set = set()  # (command, option) pairs allowed without help; none now


def _parsers(parser, name="sparseattn"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


PARSERS = dict(_parsers(build_parser()))


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_text(name):
    parser = PARSERS[name]
    text = parser.format_help()
    assert "%%" not in text, f"{name} --help shows a literal %%"
    assert "example" in text, f"{name} --help has no examples"
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[-1]
        if not action.help:
            assert (name, flag) in NO_HELP_ALLOWED, f"{name} {flag} has no help"
            continue
        shown = formatter._expand_help(action)
        assert shown.lower().count("default") <= 1, f"{name} {flag}: the default is given twice: {shown!r}"


def test_bench_attention_defaults_are_written_as_typed():
    args = build_parser().parse_args(["bench", "attention"])
    assert args.sparsity == [0.5, 0.78, 0.9, 0.95] and args.lengths[-1] == 32768 and args.head_dims == [64, 128]
    text = PARSERS["sparseattn bench attention"].format_help()
    assert "(default: 50,78,90,95)" in text
