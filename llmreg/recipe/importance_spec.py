"""The `importance:` section: phase 1 of the forgetting penalty, run by `llmreg importance RECIPE`
(llmreg.recipe.importance).

    importance:
      method: si            # si: train on the recipe's data and record the SI path integral
                            # ewc: no training; the diagonal Fisher over num_samples single examples
      output: null          # default <output_dir>/importance
      targets: []           # weight-name regexes; default the 2-D weights of the decoder layers
      exclude: []
      xi: 1.0e-9            # si only: damping of the fold
      fold: end             # si only: end | epoch
      omega_clamp: fold     # si only: fold | step | none
      num_samples: 5000     # ewc only

Everything else in the recipe (model, data = the general data, trainer, output_dir) means what it
means for `llmreg train`; for si the run is a normal training run whose final model is the anchor
phase 2 starts from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llmreg.core.options import ConfigError, check_mapping

SI_ONLY = ("xi", "fold", "omega_clamp")
EWC_ONLY = ("num_samples",)


@dataclass
class ImportanceSpec:
    method: Literal["si", "ewc"] = "si"
    output: str | None = None
    targets: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    xi: float = 1e-9
    fold: Literal["end", "epoch"] = "end"
    omega_clamp: Literal["fold", "step", "none"] = "fold"
    num_samples: int = 5000


def validate_importance(section: Any, recipe_dir: str | None, deepspeed: Any, peft: Any) -> ImportanceSpec | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"importance: expected a mapping (method: si or ewc, ...), got {section!r}")
    values = check_mapping(ImportanceSpec, section, "importance")
    spec = ImportanceSpec(**values)
    wrong = [k for k in (EWC_ONLY if spec.method == "si" else SI_ONLY) if k in section]
    if wrong:
        raise ConfigError(f"importance: {', '.join(wrong)} does not apply to method {spec.method}")
    if spec.method == "ewc" and deepspeed:
        raise ConfigError(
            "importance: method ewc needs per-example gradients and runs without DeepSpeed; "
            "drop trainer.deepspeed (the model must fit on one device)"
        )
    if spec.method == "si" and peft is not None:
        raise ConfigError("importance: method si records full weights; drop peft (LoRA phase 1 is not offered)")
    if spec.num_samples < 1:
        raise ConfigError(f"importance.num_samples: expected a positive count, got {spec.num_samples}")
    if spec.output is not None:
        from llmreg.recipe.paths import resolve_path

        spec.output = resolve_path(spec.output, recipe_dir)
    return spec
