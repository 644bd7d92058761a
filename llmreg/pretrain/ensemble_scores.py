"""`llmreg ensemble`: K checkpoints as one model, scored on a pretrain recipe's held-out blocks or on a suite.

Members are run folders (their final/ is used) or model folders, checked before anything loads
(llmreg.pretrain.ensemble.check_member_paths). With a recipe: the validation loss (nats per token) of each
member and of the first k members together, k = 1..K; with a suite: the ensemble's lm-eval scores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import llmreg.pretrain.data as pretrain_data  # looked up at call time (tests replace pretrain_blocks)
from llmreg.core.options import ConfigError
from llmreg.pretrain.ensemble import (
    EnsembleCausalLM,
    check_member_paths,
    evaluate_ensemble_suite,
    load_members,
    validation_loss,
)
from llmreg.recipe import load_recipe
from llmreg.recipe.schema import StagedRecipe


def member_folders(paths: Sequence[str]) -> list[str]:
    """The model folder of each member (a run's final/ when it has one), checked before anything loads."""
    members = [
        os.path.join(m, "final") if os.path.isfile(os.path.join(m, "final", "config.json")) else m for m in paths
    ]
    check_member_paths(members)
    return members


def validation_recipe(recipe_path: str, overrides: Sequence[str]):
    """The recipe whose held-out blocks are the validation set: one with data.pretrain."""
    recipe = load_recipe(recipe_path, overrides)
    if isinstance(recipe, StagedRecipe) or recipe.data.pretrain is None:
        raise ConfigError(
            f"ensemble --recipe: {recipe_path} has no data.pretrain (its held-out blocks are the "
            "validation set); use --suite for other evaluations"
        )
    return recipe


def ensemble_validation(recipe, members: list[str], combine: str) -> dict:
    """Validation loss (nats per token) of each member and of the first k members together, k = 1..K."""
    from transformers import AutoTokenizer

    _, val = pretrain_data.pretrain_blocks(recipe, AutoTokenizer.from_pretrained(members[0]))
    if not len(val):
        raise ConfigError(
            "ensemble --recipe: the recipe holds out no validation blocks (data.eval or "
            "data.pretrain.validation_fraction)"
        )
    models = load_members(members)
    return {
        "members": members,
        "combine": combine,
        "blocks": len(val),
        "K": list(range(1, len(models) + 1)),
        "member_losses": [validation_loss(m, val) for m in models],
        "ensemble_loss": [
            validation_loss(EnsembleCausalLM(models[:k], combine), val) for k in range(1, len(models) + 1)
        ],
    }


def validation_lines(result: dict) -> list[str]:
    return [
        f"  K={k}  ensemble {loss:.4f}   member {k}: {single:.4f}"
        for k, loss, single in zip(result["K"], result["ensemble_loss"], result["member_losses"])
    ]


def ensemble_suite_scores(suite: str, members: list[str], combine: str, limit: int | None) -> dict:
    """The ensemble's scores on an eval suite (lm-eval)."""
    scores = evaluate_ensemble_suite(suite, members, combine=combine, limit=limit)
    return {"members": members, "combine": combine, "suite": suite, "scores": dict(scores)}
