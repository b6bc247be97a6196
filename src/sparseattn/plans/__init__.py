"""Plans: which pattern applies where; their text form; saving and loading."""

from .errors import PlanError, PlanFileError, PlanSpecError
from .io import as_plan, load_plan, save_plan
from .plan import LayerPlan, Plan, Rule, parse_plan
from .spec import parse_pattern

__all__ = ["Plan", "Rule", "LayerPlan", "PlanError", "PlanSpecError", "PlanFileError", "parse_plan", "parse_pattern",
           "save_plan", "load_plan", "as_plan"]
