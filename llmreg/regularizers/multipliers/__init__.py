"""Learnable multipliers (arXiv 2601.04890): `functional` (the math), `surgery` (placements, attaching,
merging), `regularizer` (the `multipliers` regularizer), `export` (plain weights for stock transformers)."""

from llmreg.regularizers.multipliers.functional import (
    effective_weight,
    explicit_linear,
    merge_linear,
    multiplied_embedding,
    multiplied_linear,
)
from llmreg.regularizers.multipliers.regularizer import LearnableMultipliers, MultipliersOptions, clip_factor
from llmreg.regularizers.multipliers.surgery import (
    LayerPlan,
    attach,
    is_multiplier,
    merge_state_dict,
    plan_for_model,
    plan_from_state_dict,
)

__all__ = [
    "LayerPlan",
    "LearnableMultipliers",
    "MultipliersOptions",
    "attach",
    "clip_factor",
    "effective_weight",
    "explicit_linear",
    "is_multiplier",
    "merge_linear",
    "merge_state_dict",
    "multiplied_embedding",
    "multiplied_linear",
    "plan_for_model",
    "plan_from_state_dict",
]
