"""Everything checked before anything loads, shared by `llmreg validate`, `llmreg train` and `llmreg importance`.

`load_and_check` reads and validates the recipe (keys, types, ranges, files, data content: llmreg.recipe.validate)
and then checks what the output directory allows (resume, overwrite, finished stages), so that nothing `train`
refuses before training passes `validate`. The one difference: `train` also refuses a recipe with an
`importance:` section (it is run by `llmreg importance`), which `validate` accepts for either command.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llmreg.recipe.importance import check_importance_recipe
from llmreg.recipe.loader import load_recipe
from llmreg.recipe.run import resume_checkpoint
from llmreg.recipe.schema import Recipe, StagedRecipe


def load_and_check(
    recipe_path: str, overrides: Iterable[str] = (), resume: bool = False, overwrite: bool = False
) -> tuple[Recipe | StagedRecipe, Any]:
    """(recipe, start): `start` is the checkpoint to resume from (None: a fresh run), the stage plan of a staged
    recipe, or None for an importance recipe. A one-line ConfigError where anything forbids the run."""
    recipe = load_recipe(recipe_path, overrides)
    if resume:
        recipe.resume = True
    if isinstance(recipe, StagedRecipe):
        from llmreg.recipe.stages import plan_stages

        return recipe, plan_stages(recipe, overwrite)
    if recipe.importance is not None:
        check_importance_recipe(recipe, recipe_path, overwrite)
        return recipe, None
    return recipe, resume_checkpoint(recipe, overwrite)
