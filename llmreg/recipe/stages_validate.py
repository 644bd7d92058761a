"""Validation of a recipe with `stages:` (see llmreg.recipe.stages for the format and the layout).

A stage's mapping sections are deep-merged over the top-level ones (`merge_section`; lists and
`regularizers` replace them; `peft: null` turns PEFT off); the result is validated as a whole one-run recipe
(llmreg.recipe.sections) before anything loads, so an error names its stage:
`stages[1] (sub): trainer: unknown key ...`. Every regularizer entry whose options have a `stage` field gets
`stage: <index>` unless it sets one (`inject_stage_index`). `stage_eval` must name a suite that loads, and
each stage's `eval_task` one of its tasks.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from llmreg.core.options import ConfigError, check_mapping, did_you_mean
from llmreg.recipe.errors import reraise_at_recipe_key
from llmreg.recipe.paths import looked_for, resolve_path
from llmreg.recipe.schema import STAGE_SECTIONS, TOP_LEVEL_ONLY, Stage, StagedRecipe, StageEvalSpec
from llmreg.recipe.sections import DEFAULT_SEED, default_output_dir, validate_run_recipe

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class _StageKeys:
    name: str | None = None
    data: dict | None = None
    trainer: dict | None = None
    peft: dict | None = None
    regularizers: list | None = None
    eval_during_training: dict | None = None
    eval_task: str | None = None


def merge_section(base: Any, over: Any) -> Any:
    """`over` deep-merged over `base`: mappings merge key by key, anything else (lists, scalars, None) replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = copy.deepcopy(base)
        for key, value in over.items():
            merged[key] = merge_section(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(over)


def inject_stage_index(items: Any, index: int) -> Any:
    """Regularizer entries with `stage: index` added where the options class has a `stage` field and the
    entry does not set it. Entries that are not valid are left as they are, for validation to report."""
    if not isinstance(items, list):
        return items
    from llmreg.core.registry import get_regularizer_class

    out = []
    for item in items:
        entry = {"name": item} if isinstance(item, str) else item
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and "stage" not in entry:
            try:
                options_cls = get_regularizer_class(entry["name"]).options_cls
            except ConfigError:
                options_cls = None
            if (
                options_cls is not None
                and dataclasses.is_dataclass(options_cls)
                and any(f.name == "stage" for f in dataclasses.fields(options_cls))
            ):
                entry = {**entry, "stage": index}
        out.append(entry)
    return out


def expand_stage(top: dict, stage: dict, index: int, output_dir: str) -> dict:
    """The whole raw recipe of one stage: the top-level sections with the stage's merged over them."""
    raw = {key: copy.deepcopy(top[key]) for key in (*TOP_LEVEL_ONLY, *STAGE_SECTIONS) if key in top}
    for key in STAGE_SECTIONS:
        if key in stage:
            raw[key] = copy.deepcopy(stage[key]) if key == "regularizers" else merge_section(raw.get(key), stage[key])
    raw["regularizers"] = inject_stage_index(raw.get("regularizers"), index)
    raw["output_dir"] = os.path.join(output_dir, f"{index}_{stage.get('name') or f'stage{index}'}")
    return raw


def _check_eval_task(where: str, eval_task: str | None, stage_eval: Any, suite_tasks: list[str]) -> None:
    if eval_task is None:
        return
    if stage_eval is None:
        raise ConfigError(f"{where}: eval_task: needs a top-level stage_eval (the suite it names a task of)")
    if eval_task not in suite_tasks:
        raise ConfigError(
            f"{where}: eval_task: '{eval_task}' is not a task of {stage_eval.suite}"
            + did_you_mean(eval_task, suite_tasks)
            + f" (its tasks: {', '.join(suite_tasks)})"
        )


def validate_staged_recipe(raw: dict, recipe_path: str | None = None) -> StagedRecipe:
    """Check a raw recipe with `stages:` (top-level keys already checked by validate_recipe)."""
    top = {k: v for k, v in raw.items() if k not in ("stages", "stage_eval")}
    if top.get("importance") is not None:
        raise ConfigError(
            "importance: not allowed together with stages; record importance with its own recipe "
            "(`llmreg importance`), then use the artifact in a stage's forgetting_penalty"
        )
    items = raw["stages"]
    if not isinstance(items, list) or not items:
        raise ConfigError(
            f"stages: expected a non-empty list of stages (mappings with name, data, trainer, ...), got {items!r}"
        )
    recipe_dir = os.path.dirname(os.path.abspath(recipe_path)) if recipe_path else None
    output_dir = os.path.abspath(os.path.expanduser(top.get("output_dir") or default_output_dir(recipe_path)))
    stage_eval, suite_tasks = validate_stage_eval(raw.get("stage_eval"), recipe_dir)
    stages: list[Stage] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"stages[{i}]: expected a mapping (name, data, trainer, ...), got {item!r}")
        name = item.get("name", f"stage{i}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"stages[{i}].name: {name!r} is not a usable folder name (letters, digits, '_', "
                "'-', '.'; starting with a letter or digit)"
            )
        where = f"stages[{i}] ({name})"
        for key in TOP_LEVEL_ONLY:
            if key in item:
                raise ConfigError(
                    f"{where}: {key} is set at the top level only (each stage after the first "
                    "starts from the previous stage's final model)"
                )
        values = check_mapping(_StageKeys, item, where)
        taken = next((s for s in stages if s.name == name), None)
        if taken is not None:
            raise ConfigError(
                f"{where}: duplicate stage name '{name}' (stages[{taken.index}] has it too); stage names must be unique"
            )
        with reraise_at_recipe_key(where):
            recipe = validate_run_recipe(expand_stage(top, values, i, output_dir), recipe_path)
        if recipe.peft is not None and i < len(items) - 1:
            raise ConfigError(
                f"{where}: peft: only the last stage may use PEFT (the next stage would start "
                "from an adapter rather than a whole model)"
            )
        eval_task = values.get("eval_task")
        _check_eval_task(where, eval_task, stage_eval, suite_tasks)
        stages.append(Stage(index=i, name=name, recipe=recipe, eval_task=eval_task))
    return StagedRecipe(
        stages=stages,
        output_dir=output_dir,
        seed=top.get("seed", DEFAULT_SEED),
        resume=top.get("resume", False),
        stage_eval=stage_eval,
        path=os.path.abspath(recipe_path) if recipe_path else None,
    )


def validate_stage_eval(section: dict | None, recipe_dir: str | None) -> tuple[StageEvalSpec | None, list[str]]:
    """The spec and its suite's task names; the suite file must exist and load."""
    if section is None:
        return None, []
    where = "stage_eval"
    values = check_mapping(StageEvalSpec, section, where)
    if "suite" not in values:
        raise ConfigError(f"{where}: missing key 'suite' (a suite file, e.g. eval/suites/testbed.yaml)")
    spec = StageEvalSpec(**values)
    for key in ("limit", "batch_size"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            raise ConfigError(f"{where}.{key}: must be >= 1, got {value}")
    path = resolve_path(spec.suite, recipe_dir)
    if not os.path.isfile(path):
        raise ConfigError(f"{where}.suite: suite file not found: {spec.suite} {looked_for(spec.suite, recipe_dir)}")
    from llmreg.eval.suite import load_suite

    with reraise_at_recipe_key(f"{where}.suite"):
        suite = load_suite(path)
    spec.suite = path
    return spec, [e.task for e in suite.entries]


__all__ = ["expand_stage", "inject_stage_index", "merge_section", "validate_stage_eval", "validate_staged_recipe"]
