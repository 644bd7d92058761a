"""`llmreg importance RECIPE`: phase 1 of the forgetting penalty, from a recipe with an `importance:` section.

The section (llmreg.recipe.importance_spec) decides the method: si trains the recipe like `llmreg train`
with the `si_importance` recorder added to its regularizers, and writes the artifact after the run (its
final model is the anchor phase 2 starts from); ewc builds the run without training and writes the diagonal
Fisher. The artifact itself is written by llmreg.regularizers.forgetting.record, which needs a trainer,
not a recipe.
"""

from __future__ import annotations

import os
from typing import Any

from llmreg.core.options import ConfigError
from llmreg.recipe.build import build_run
from llmreg.recipe.run import FINAL_DIR, resume_checkpoint, train
from llmreg.recipe.schema import StagedRecipe
from llmreg.regularizers.forgetting.record import write_ewc_artifact, write_si_artifact
from llmreg.regularizers.forgetting.si import SIImportance

IMPORTANCE_DIR = "importance"  # <output_dir>/importance unless importance.output says otherwise


def refuse_importance_section(recipe: Any, recipe_path: str) -> None:
    """`llmreg train` of a recipe with an `importance:` section: a ConfigError pointing at `llmreg importance`."""
    if recipe.importance is not None:
        raise ConfigError(f"{recipe_path} has an `importance:` section: run it with `llmreg importance`")


def check_importance_recipe(recipe: Any, recipe_path: str, overwrite: bool = False) -> str | None:
    """A ConfigError, before anything loads, when `recipe` cannot record importance (or its output_dir forbids it);
    else the checkpoint an si run resumes from (None: a fresh run)."""
    if isinstance(recipe, StagedRecipe):
        raise ConfigError(f"{recipe_path} has `stages:`; importance is recorded by a recipe without stages")
    if recipe.importance is None:
        raise ConfigError(f"{recipe_path} has no `importance:` section (method: si or ewc)")
    if recipe.importance.method == "si":
        return resume_checkpoint(recipe, overwrite)
    if recipe.resume:
        raise ConfigError("resume: method ewc does not train, so there is nothing to resume; drop --resume")
    return None


def run_importance(recipe: Any, overwrite: bool = False) -> str:
    """`llmreg importance`: the recipe's `importance:` section decides the method; returns the artifact dir."""
    spec = recipe.importance
    if spec is None:
        raise ConfigError("llmreg importance needs an `importance:` section in the recipe (method: si or ewc)")
    directory = spec.output or os.path.join(recipe.output_dir, IMPORTANCE_DIR)
    meta = {"model": recipe.model.describe(), "data": ", ".join(s.path for s in recipe.data.train_sources)}
    if spec.method == "ewc":
        run = build_run(recipe)
        write_ewc_artifact(
            run.trainer,
            directory,
            num_samples=spec.num_samples,
            targets=spec.targets,
            exclude=spec.exclude,
            final_model=None,
            **meta,
        )
        return directory
    recorder = SIImportance(
        targets=spec.targets, exclude=spec.exclude, xi=spec.xi, fold=spec.fold, omega_clamp=spec.omega_clamp
    )
    result = train(recipe, overwrite=overwrite, extra_regularizers=[recorder])
    write_si_artifact(
        result.trainer,
        recorder,
        directory,
        final_model=os.path.abspath(os.path.join(recipe.output_dir, FINAL_DIR)),
        **meta,
    )
    return directory


def phase2_lines(recipe: Any, directory: str) -> list[str]:
    """What `llmreg importance` prints when done: where the artifact is and how phase 2 uses it."""
    method = recipe.importance.method
    start = os.path.join(recipe.output_dir, FINAL_DIR) if method == "si" else "the same model"
    return [
        f"done: importance artifact in {directory}",
        f"  phase 2: start from {start} with regularizers: [{{name: forgetting_penalty, importance: "
        f"{method}, artifact: {directory}}}]",
    ]
