"""The forgetting penalty (arXiv 2501.13669) with EWC and L2-SP as other importances, in one place.

- `formulas.py`: the pure math (SI path integral and fold, layer coefficients, quadratic penalty and its
  gradient, LoRA dense-product gradients, diagonal Fisher);
- `targets.py`: which weights (or LoRA products) are regularised and their decoder layer;
- `artifact.py`: the importance artifact linking the two phases;
- `si.py`: phase 1, the `si_importance` recorder; `ewc.py`: the Fisher pass;
- `penalty.py`: phase 2, the `forgetting_penalty` regularizer (`l2_sp` is its uniform-importance preset);
  `options.py`: its options and PenaltyConfig, the settings it runs on;
- `record.py`: `write_si_artifact` / `write_ewc_artifact`, the artifact of phase 1 (`llmreg importance RECIPE`
  runs them from a recipe: llmreg.recipe.importance).
"""

from llmreg.regularizers.forgetting.formulas import (
    fisher_diagonal,
    layer_coefficients,
    lora_product_penalty_grads,
    quadratic_penalty,
    quadratic_penalty_grad,
    si_accumulate,
    si_fold,
)
from llmreg.regularizers.forgetting.penalty import ForgettingPenalty, PenaltyConfig
from llmreg.regularizers.forgetting.record import write_ewc_artifact, write_si_artifact
from llmreg.regularizers.forgetting.si import SIImportance

__all__ = [
    "ForgettingPenalty",
    "PenaltyConfig",
    "SIImportance",
    "fisher_diagonal",
    "layer_coefficients",
    "lora_product_penalty_grads",
    "quadratic_penalty",
    "quadratic_penalty_grad",
    "si_accumulate",
    "si_fold",
    "write_ewc_artifact",
    "write_si_artifact",
]
