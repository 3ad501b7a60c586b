"""Update rules: how an optimizer steps, forwards for replay and linearised for the embeddings."""

from .adam import Adam
from .registry import legacy_rule, make_optimizer, rule_from_dict, rule_of
from .rule import Gamma, StepCoefficients, UpdateRule
from .sgd import SGD

__all__ = ["Adam", "Gamma", "SGD", "StepCoefficients", "UpdateRule", "legacy_rule", "make_optimizer", "rule_from_dict", "rule_of"]
