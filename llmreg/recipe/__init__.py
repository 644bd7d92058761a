"""Recipes: a YAML file that describes a training run, as typed, validated dataclasses.

    recipe = load_recipe("recipes/quickstart.yaml", ["trainer.learning_rate=1e-5"])  # validated, nothing loaded
    run = build_run(recipe)          # tokenizer, data, model, TrainingArguments / TRL config, Reg*Trainer
    run.trainer.train()

`llmreg validate` and `llmreg train` (llmreg/cli.py) are thin wrappers around
these. Sections: model, tokenizer, data, trainer, peft, regularizers,
output_dir, resume, seed (see schema.py, and recipes/quickstart.yaml for an example).
"""

from llmreg.recipe.build import Run, build_run
from llmreg.recipe.loader import dump_recipe, load_recipe, read_recipe_file
from llmreg.recipe.overrides import apply_overrides
from llmreg.recipe.schema import DataSpec, ModelSpec, Recipe, SourceSpec, TokenizerSpec, TrainerSpec
from llmreg.recipe.validate import validate_recipe

__all__ = [
    "DataSpec",
    "ModelSpec",
    "Recipe",
    "Run",
    "SourceSpec",
    "TokenizerSpec",
    "TrainerSpec",
    "apply_overrides",
    "build_run",
    "dump_recipe",
    "load_recipe",
    "read_recipe_file",
    "validate_recipe",
]
