"""Data modes: a key of the `data:` section that another package implements, registered here.

A data mode brings its own validation of the section, a recipe-level check, the datasets and collator of
a run, and what runs once the run's final model is saved. `llmreg.pretrain` registers `pretrain` (packed
blocks of raw text; `final_eval.json` after training) when it is imported. The recipe layer only looks modes up
here, so it never imports the packages that provide them: the modes llmreg ships are named in
`BUILTIN_PROVIDERS` and imported by module name on first lookup (a plugin table, like entry points), which keeps
`import llmreg` free of the pre-training stack.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmreg.core.options import ConfigError


def _no_held_out(spec: Any) -> bool:
    return False


@dataclass(frozen=True)
class DataMode:
    name: str  # the key under `data:`, and the DataSpec field that holds the validated spec
    validate: Callable[[Any, str | None], Any]  # (section, recipe_dir) -> the spec
    check_recipe: Callable[[Any], None]  # the whole validated Recipe (e.g. the trainer kind the mode needs)
    build_datasets: Callable[[Any, Any, Any], tuple[Any, Any]]  # (recipe, tokenizer, args) -> (train, eval|None)
    collator: Callable[[list[dict]], dict] | None = None  # replaces the collator of trainer kind hf
    after_train: Callable[[Any, Any], Any] | None = None  # (trainer, recipe), once final/ is saved
    holds_out_eval: Callable[[Any], bool] = _no_held_out  # (spec) -> the mode splits off eval data itself


_MODES: dict[str, DataMode] = {}
BUILTIN_PROVIDERS = {"pretrain": "llmreg.pretrain"}  # mode -> the module that registers it when imported


def register_data_mode(mode: DataMode) -> DataMode:
    _MODES[mode.name] = mode
    return mode


def data_mode(name: str) -> DataMode:
    """The registered mode called `name`; a ConfigError naming `data.<name>` when none is."""
    if name not in _MODES and name in BUILTIN_PROVIDERS:
        importlib.import_module(BUILTIN_PROVIDERS[name])
    if name not in _MODES:
        raise ConfigError(
            f"data.{name}: no data mode '{name}' is registered (import the package that provides "
            "it, e.g. llmreg.pretrain)"
        )
    return _MODES[name]


def recipe_data_mode(recipe: Any) -> DataMode | None:
    """The data mode a validated recipe uses, None for plain datasets."""
    return None if recipe.data.pretrain is None else data_mode("pretrain")
