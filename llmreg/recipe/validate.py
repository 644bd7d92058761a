"""Raw recipe dict -> `Recipe` or `StagedRecipe`, checked without loading a model, a tokenizer or data.

Every key of every section is checked against a dataclass with
`llmreg.core.options.check_mapping`, so an unknown key names the closest valid
one and a value of the wrong type says what was expected. The trainer section
is checked against the config class of its kind (TrainingArguments, SFTConfig,
DPOConfig, GRPOConfig), `peft` against `peft.LoraConfig`, each regularizer
against its options class. What needs a file (data, a DeepSpeed config, a
local model) is checked for existence; a DeepSpeed config with an `optimizer`
block is refused here, before any run starts.

The sections of one run are checked in llmreg.recipe.sections; a recipe with `stages:` in
llmreg.recipe.stages_validate, which checks each stage as a one-run recipe.
"""

from __future__ import annotations

from typing import Any

from llmreg.recipe.schema import Recipe, StagedRecipe
from llmreg.recipe.sections import REWARDS, check_top_level, validate_run_recipe
from llmreg.recipe.stages_validate import validate_staged_recipe


def validate_recipe(raw: Any, recipe_path: str | None = None) -> Recipe | StagedRecipe:
    """Check a raw recipe (parsed YAML, overrides applied) and return its typed form.

    A recipe with `stages:` gives a `StagedRecipe` (each stage validated as a whole recipe, see
    llmreg.recipe.stages_validate); any other recipe gives a `Recipe`."""
    if check_top_level(raw).get("stages") is not None:
        return validate_staged_recipe(raw, recipe_path)
    return validate_run_recipe(raw, recipe_path)


__all__ = ["REWARDS", "validate_recipe"]
