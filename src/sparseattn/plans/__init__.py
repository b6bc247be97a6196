"""Plans: which pattern applies where; their text form; saving and loading."""

from .io import load_plan, save_plan
from .plan import LayerPlan, Plan, PlanError, Rule
from .spec import PlanSpecError, parse_pattern, parse_plan

__all__ = ["Plan", "Rule", "LayerPlan", "PlanError", "PlanSpecError", "parse_plan", "parse_pattern",
           "save_plan", "load_plan"]
