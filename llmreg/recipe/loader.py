"""Reading a recipe file (with command-line overrides) and writing the resolved one."""

from __future__ import annotations

import os
from collections.abc import Iterable

import yaml

from llmreg.core.options import ConfigError
from llmreg.recipe.errors import one_line
from llmreg.recipe.overrides import apply_overrides
from llmreg.recipe.schema import Recipe
from llmreg.recipe.validate import validate_recipe


def read_recipe_file(path: str) -> dict:
    """The raw recipe dict of a YAML file (an empty file is an empty recipe)."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe not found: {path} (looked for {os.path.abspath(path)})")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {one_line(err)}") from None
    return {} if raw is None else raw


def load_recipe(path: str, overrides: Iterable[str] = ()) -> Recipe:
    """Read `path`, apply `key=value` overrides, validate; nothing is loaded but the YAML."""
    raw = read_recipe_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return validate_recipe(apply_overrides(raw, overrides), recipe_path=path)


def dump_recipe(recipe: Recipe, path: str) -> None:
    """Write the resolved recipe; `llmreg train <path>` reruns it."""
    header = f"# resolved recipe{f' from {recipe.path}' if recipe.path else ''}; rerun: llmreg train {path}\n"
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump(recipe.to_dict(), f, sort_keys=False, default_flow_style=False)
