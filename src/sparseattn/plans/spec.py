"""The text form of plans and patterns, as the CLI and sweep files accept them: the one parser of plan
specs. It turns text into rule parts; ``Plan.parse`` (plans.plan) makes the Plan of them.

Grammar (rules separated by ';' or new lines; '#' starts a comment)::

    plan      := 'dense' | rule (';' rule)*
    rule      := [selector ':'] pattern          (no selector: every layer, every head)
    selector  := part ('@' part)*
    part      := 'all' | 'later-half' | 'first-half' | 'layers=' ranges | 'heads=' ranges
    ranges    := 'all' | range (',' range)*      range := N | N-M
    pattern   := call | pattern '|' pattern | pattern '&' pattern | '(' pattern ')'
    call      := name '(' [literal (',' literal)*] [name '=' literal ...] ')'

Errors point at the offending part with a caret.
"""

from __future__ import annotations

import ast
import difflib
import re
from typing import NamedTuple

import torch

from ..patterns.base import REGISTRY, Pattern, intersection, union
from ..errors import ConfigTypeError
from .errors import PlanSpecError


class RuleParts(NamedTuple):
    """One rule of a spec: its pattern, layers ('all', 'later-half', 'first-half' or indices), heads (None for
    all, 'all', or indices) and the text it came from."""

    pattern: Pattern
    layers: tuple[int, ...] | str
    heads: tuple[int, ...] | str | None
    source: str


def _outside_quotes(text: str):
    """(index, character, parenthesis depth after it) of each character of ``text`` outside quotes."""
    depth, quote = 0, None
    for i, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        else:
            depth += (c == "(") - (c == ")")
            yield i, c, depth


def _split(text: str, seps: str) -> list[tuple[int, str]]:
    """Split at top-level separators (outside parentheses and quotes), keeping offsets."""
    out, start = [], 0
    for i, c, depth in _outside_quotes(text):
        if c in seps and depth == 0:
            out.append((start, text[start:i]))
            start = i + 1
    out.append((start, text[start:]))
    return out


def _strip(offset: int, s: str) -> tuple[int, str]:
    lead = len(s) - len(s.lstrip())
    return offset + lead, s.strip()


_RANGES = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$")
MAX_INDEX = 65535  # the largest layer or head index a spec may name


def _parse_ranges(s: str, what: str, text: str, at: int):
    if s == "all":
        return "all"
    compact = s.replace(" ", "")
    if not _RANGES.match(compact):
        raise PlanSpecError(f"bad {what} {s!r}: expected 'all' or ranges like 0,2,4-7", text, at, at + len(s))
    vals = []
    for part in compact.split(","):
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b) if b else int(a)
        if hi > MAX_INDEX:
            raise PlanSpecError(f"bad {what} {part!r}: indices go up to {MAX_INDEX}", text, at, at + len(s))
        if hi < lo:
            raise PlanSpecError(f"bad {what} range {part!r}: the end is before the start", text, at, at + len(s))
        vals.extend(range(lo, hi + 1))
    return tuple(vals)


def _parse_selector(sel: str, text: str, at: int):
    layers, heads = None, None
    for off, part in _split(sel, "@"):
        p_at, part = _strip(at + off, part)
        if part in ("all", "later-half", "first-half"):
            value, kind = part, "layers"
        elif part.startswith("layers="):
            value, kind = _parse_ranges(part[7:].strip(), "layers", text, p_at + 7), "layers"
        elif part.startswith("heads="):
            value, kind = _parse_ranges(part[6:].strip(), "heads", text, p_at + 6), "heads"
        else:
            raise PlanSpecError(f"unknown selector {part!r}: expected all, later-half, first-half, layers=..., "
                                "heads=... (joined with @)", text, p_at, p_at + len(part))
        if kind == "layers":
            if layers is not None:
                raise PlanSpecError("layers given twice in one selector", text, p_at, p_at + len(part))
            layers = value
        else:
            if heads is not None:
                raise PlanSpecError("heads given twice in one selector", text, p_at, p_at + len(part))
            heads = value
    return layers or "all", heads


def parse_selector(text: str) -> tuple[tuple[int, ...] | str, tuple[int, ...] | str | None]:
    """The (layers, heads) a rule's selector names, e.g. ``"later-half"`` or ``"heads=0-3@layers=2,5"``."""
    at, sel = _strip(0, text)
    return _parse_selector(sel, text, at)


def parse_ranges(text: str, what: str = "indices") -> tuple[int, ...] | str:
    """Indices written as ranges (``"0,2,4-7"``), or ``"all"``; ``what`` names them in errors."""
    at, s = _strip(0, text)
    return _parse_ranges(s, what, text, at)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _literal(node: ast.AST, text: str, at: int):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and _is_number(node.operand.value):
        return -node.operand.value
    raise PlanSpecError("pattern arguments must be numbers or quoted strings", text, at + node.col_offset,
                        at + (node.end_col_offset or node.col_offset + 1))


def _combine(parts: list[Pattern], op: str, text: str, span: tuple[int, int]) -> Pattern:
    try:
        return union(*parts) if op == "|" else intersection(*parts)
    except (TypeError, ValueError) as e:  # e.g. two different stored tables under one key
        raise PlanSpecError(str(e), text, *span) from None


def _build(node: ast.AST, text: str, at: int, tables: dict | None) -> Pattern:
    span = (at + node.col_offset, at + (node.end_col_offset or node.col_offset + 1))
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
        a, b = _build(node.left, text, at, tables), _build(node.right, text, at, tables)
        return _combine([a, b], "|" if isinstance(node.op, ast.BitOr) else "&", text, span)
    if isinstance(node, ast.Name):
        node = ast.Call(func=node, args=[], keywords=[], col_offset=node.col_offset, end_col_offset=node.end_col_offset)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise PlanSpecError("expected a pattern such as neighbour(2), combined with | and &", text, *span)
    name = node.func.id
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PlanSpecError(f"unknown pattern {name!r}{hint} (known: {', '.join(sorted(REGISTRY))})", text,
                            at + node.func.col_offset, at + node.func.end_col_offset)
    args = [_literal(a, text, at) for a in node.args]
    kwargs = {k.arg: _literal(k.value, text, at) for k in node.keywords}
    if name == "static_mask":
        if len(args) != 1 or kwargs or not isinstance(args[0], str):
            raise PlanSpecError("static_mask takes one quoted key of a stored table, e.g. static_mask('ap_l3')", text, *span)
        key = args[0]
        if not tables or key not in tables:
            raise PlanSpecError(f"static_mask({key!r}) names a table that is not loaded (a spec with stored masks "
                                "must be loaded from its plan file)", text, *span)
        return REGISTRY[name].factory(tables[key], key=key)
    try:
        return REGISTRY[name].factory(*args, **kwargs)
    except (TypeError, ValueError, OverflowError) as e:
        raise PlanSpecError(f"{name}: {e} (signature {REGISTRY[name].signature})", text, *span) from None


def _in_parentheses(src: str) -> bool:
    """Whether ``src`` is one parenthesized expression: its first '(' closes at its last character."""
    if not (src.startswith("(") and src.endswith(")")):
        return False
    for i, c, depth in _outside_quotes(src):
        if c == ")" and depth == 0:
            return i == len(src) - 1
    return False


def _parse_operand(text: str, tables: dict | None, full: str, at: int) -> Pattern:
    """One operand of the top-level | and & of a pattern: a call, or a parenthesized expression."""
    src = text.strip()
    at += len(text) - len(text.lstrip())
    if not src:
        raise PlanSpecError("missing pattern", full, at)
    if _in_parentheses(src):  # "(a | b | ...)", as spec() writes a combination: split it here too
        try:
            return parse_pattern(src[1:-1], tables, _full=full, _at=at + 1)
        except RecursionError:
            raise PlanSpecError("cannot parse pattern: it is nested too deeply", full, at, at + len(src)) from None
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        col = min(max((e.offset or 1) - 1, 0), len(src) - 1) if e.lineno in (None, 1) else 0
        raise PlanSpecError(f"cannot parse pattern {src!r}: {e.msg}", full, at + col) from None
    except (ValueError, RecursionError, MemoryError) as e:
        what = "it is nested too deeply" if isinstance(e, (RecursionError, MemoryError)) else str(e)
        raise PlanSpecError(f"cannot parse pattern: {what}", full, at, at + len(src)) from None
    try:
        return _build(tree.body, full, at, tables)
    except RecursionError:
        raise PlanSpecError("cannot parse pattern: it is nested too deeply", full, at, at + len(src)) from None


def parse_pattern(text: str, tables: dict[str, torch.Tensor] | None = None, *, _full: str | None = None,
                  _at: int = 0) -> Pattern:
    """Parse a pattern expression such as ``"neighbour(2) | global_tokens(1)"``.

    The top-level | and & are split here (& binds tighter, as in Python), so a chain of any length parses;
    what is inside parentheses goes to Python's expression parser."""
    if not isinstance(text, str):
        raise ConfigTypeError(f"a pattern spec must be a string, got {type(text).__name__}")
    full = text if _full is None else _full
    span = (_at + len(text) - len(text.lstrip()), _at + len(text.rstrip()))
    terms = []
    for off, term in _split(text, "|"):
        factors = [_parse_operand(f, tables, full, _at + off + off2) for off2, f in _split(term, "&")]
        terms.append(_combine(factors, "&", full, span))
    return _combine(terms, "|", full, span)


def parse_rules(text: str, tables: dict[str, torch.Tensor] | None = None) -> list[RuleParts]:
    """The rules of a plan spec (see the module docstring), in order; "dense" has none."""
    if not isinstance(text, str):
        raise ConfigTypeError(f"a plan spec must be a string, got {type(text).__name__}")
    # comments become blanks, so offsets into the text stay right for error carets
    clean = re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), text)
    rules, said_dense = [], False
    for off, chunk in _split(clean, ";\n"):
        at, chunk = _strip(off, chunk)
        if not chunk:
            continue
        if chunk in ("dense", "none"):
            said_dense = True
            continue
        parts = _split(chunk, ":")
        if len(parts) > 2:
            p_at = at + parts[2][0] - 1
            raise PlanSpecError("a rule has one ':' between its selector and its pattern", text, p_at)
        if len(parts) == 2:
            s_at, sel = _strip(at + parts[0][0], parts[0][1])
            layers, heads = _parse_selector(sel, text, s_at)
            pat_off, pat = at + parts[1][0], parts[1][1]
        else:
            layers, heads = "all", None
            pat_off, pat = at, chunk
        pattern = parse_pattern(pat, tables, _full=text, _at=pat_off)
        rules.append(RuleParts(pattern, layers, heads, chunk))
    if not rules and not said_dense:  # an empty spec is more likely a mistake than a wish for no sparsity
        raise PlanSpecError("empty plan spec: expected rules such as 'later-half: neighbour(2)', or 'dense' for "
                            "none", text, len(text) - len(text.lstrip()) if text.strip() else 0)
    return rules
