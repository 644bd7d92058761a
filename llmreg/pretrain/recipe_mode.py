"""The `data.pretrain` recipe mode, registered with the recipe layer (llmreg.recipe.data_modes).

Imported by `llmreg.pretrain` (and so by `import llmreg`): validation of the section, the recipe-level
checks, the packed block datasets and their collator (llmreg.pretrain.data), and, once a run's final model
is saved, `final_eval.json` with the final validation loss (llmreg.pretrain.sweep.write_final_eval).
"""

from __future__ import annotations

from typing import Any

from llmreg.pretrain.data import (
    PretrainSpec,
    check_pretrain_recipe,
    collate_blocks,
    pretrain_datasets,
    validate_pretrain,
)
from llmreg.pretrain.sweep import write_final_eval
from llmreg.recipe.data_modes import DataMode, register_data_mode


def _holds_out_eval(spec: PretrainSpec) -> bool:
    return spec.validation_fraction > 0


def _after_train(trainer: Any, recipe: Any) -> None:
    if trainer.eval_dataset is not None:
        write_final_eval(trainer, recipe)  # final validation loss, after the schedule reached its end


PRETRAIN_MODE = register_data_mode(
    DataMode(
        name="pretrain",
        validate=validate_pretrain,
        check_recipe=check_pretrain_recipe,
        build_datasets=pretrain_datasets,
        collator=collate_blocks,
        after_train=_after_train,
        holds_out_eval=_holds_out_eval,
    )
)
