"""The errors of plans: one that does not fit the model, a spec that cannot be parsed, and a saved plan's files
that cannot be read."""

from __future__ import annotations

from ..errors import ConfigError


class PlanError(ConfigError):
    """A plan that does not fit the model (layers or heads out of range, overlapping rules)."""


class PlanSpecError(PlanError):
    """A spec that cannot be parsed; the message shows where."""

    def __init__(self, message: str, text: str, start: int, end: int | None = None):
        end = max(end if end is not None else start + 1, start + 1)
        line_start = text.rfind("\n", 0, start) + 1
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        line = text[line_start:line_end]
        caret = " " * (start - line_start) + "^" * max(1, min(end, line_end) - start)
        super().__init__(f"{message}\n  {line}\n  {caret}")
        self.reason, self.text, self.start, self.end = message, text, start, end


class PlanFileError(PlanError):
    """A saved plan (plan.json, masks.safetensors) that cannot be read or does not agree with itself; the
    message names the file."""
