"""Multi-stage recipes: `stages:` trains one model through several runs in turn (sft then dpo, task_1 ... task_n).

    model: {config: {size: tiny}}          # top level only: model, tokenizer, output_dir, seed
    data: {num_examples: 500}              # shared sections: every stage merges its own over them
    trainer: {kind: sft, max_steps: 100, learning_rate: 1.0e-3}
    regularizers: [{name: half_ft, seed: 0}]
    stage_eval: {suite: eval/suites/testbed.yaml, limit: 50}   # optional, see below
    stages:
      - {name: add, data: {train: builtin:testbed_add}, eval_task: testbed_add}
      - {name: sub, data: {train: builtin:testbed_sub}, eval_task: testbed_sub, trainer: {learning_rate: 5.0e-4}}

A stage may set `name` (default `stage<i>`), `eval_task` and the sections data, trainer, peft, regularizers and
eval_during_training. A stage's mapping sections are deep-merged over the top-level ones (lists and
`regularizers` replace them; `peft: null` turns PEFT off); the result is validated as a whole recipe before
anything loads, so an error names its stage: `stages[1] (sub): trainer: unknown key ...`. Every regularizer
entry whose options have a `stage` field gets `stage: <index>` unless it sets one (half_ft draws a new
selection from seed + stage).

Layout: stage i trains into `<output_dir>/<i>_<name>/` (recipe.yaml, metrics.jsonl, checkpoint-N/, final/,
as a single run). Stage 0 starts from the recipe's model; stage i > 0 from stage i-1's `final/` (model and
tokenizer, in the recipe's model dtype). `<output_dir>/recipe.yaml` is the resolved staged recipe. A stage
whose `final/` exists is skipped (only while every stage before it is skipped too); `--resume` continues the
first unfinished stage from its last checkpoint; `--overwrite` clears every stage's outputs and stage_eval/.

`stage_eval`: once every stage has trained, the starting model and each stage's final model are evaluated
on the suite (llmreg.eval.run.evaluate_suite, on the main process), into `<output_dir>/stage_eval/`:
scores.json (every task's score per model), and, when every stage names its `eval_task`,
continual_report.json / .md: R[i][j] = score after stage i on stage j's eval_task, baseline = the starting
model's scores, and op / bwt / fwt (llmreg.eval.continual_metrics). Lower-is-better metrics (perplexities)
are negated in R and baseline so that higher is better throughout, as continual_metrics expects.

This module runs the stages (`plan_stages`, `run_stages`); validation is llmreg.recipe.stages_validate,
stage_eval llmreg.recipe.stages_report (their public names are importable from here too).
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
from dataclasses import dataclass, field

from llmreg.core.options import ConfigError
from llmreg.recipe.run import RECIPE_FILE, checkpoints_in, clear_previous_run, is_main_process, train
from llmreg.recipe.schema import ModelSpec, Recipe, Stage, StagedRecipe, TokenizerSpec
from llmreg.recipe.stages_report import (
    STAGE_EVAL_DIR,
    START,
    continual_report,
    evaluate_stages,
    final_dir,
    say,
    starting_model,
    write_continual_markdown,
)
from llmreg.recipe.stages_validate import expand_stage, inject_stage_index, merge_section, validate_staged_recipe


@dataclass
class StagePlan:
    stage: Stage
    action: str  # "skip" (its final/ exists) or "train"
    resume_from: str | None = None  # the checkpoint a resumed stage continues from


@dataclass
class StagesResult:
    output_dir: str
    final_dirs: list[str]  # each stage's final/, in order
    trained: list[str] = field(default_factory=list)  # stage names trained by this call
    skipped: list[str] = field(default_factory=list)  # stage names whose final/ already existed
    stage_eval: dict | None = None  # stage_eval/scores.json, plus "continual" (continual_report.json) if made


def _finished(stage: Stage) -> bool:
    return os.path.isfile(os.path.join(final_dir(stage), "config.json"))


def _has_outputs(stage: Stage) -> bool:
    return _finished(stage) or bool(checkpoints_in(stage.recipe.output_dir))


def plan_stages(staged: StagedRecipe, overwrite: bool = False) -> list[StagePlan]:
    """What each stage will do; a ConfigError, before anything loads, where the outputs on disk forbid it."""
    if overwrite:
        if staged.resume:
            raise ConfigError("resume and overwrite exclude each other: continue the earlier run or replace it")
        return [StagePlan(stage, "train") for stage in staged.stages]
    plans: list[StagePlan] = []
    for stage in staged.stages:
        where = f"stages[{stage.index}] ({stage.name})"
        training = any(p.action == "train" for p in plans)
        if not training and _finished(stage):
            plans.append(StagePlan(stage, "skip"))
            continue
        if training:  # a stage after one that trains now: it must start clean
            if _has_outputs(stage):
                raise ConfigError(
                    f"{where}: {stage.recipe.output_dir} holds outputs of an earlier run, but an "
                    "earlier stage trains again now: add --overwrite to start all stages afresh"
                )
            plans.append(StagePlan(stage, "train"))
            continue
        last = checkpoints_in(stage.recipe.output_dir)
        if last and not staged.resume:
            raise ConfigError(
                f"{where}: {stage.recipe.output_dir} already holds {last[-1]} from an earlier run: "
                "add --resume to continue it, --overwrite to replace all stages, or set "
                "output_dir=<another dir>"
            )
        if staged.resume and not last and not plans:
            raise ConfigError(
                f"resume: no finished stage and no checkpoint in {stage.recipe.output_dir} to resume "
                "from; train without --resume first"
            )
        resume_from = os.path.join(stage.recipe.output_dir, last[-1]) if last and staged.resume else None
        plans.append(StagePlan(stage, "train", resume_from))
    return plans


def stage_recipe(stage: Stage, previous_final: str | None) -> Recipe:
    """The recipe a stage trains with: stage 0's as validated; a later stage's model and tokenizer are the
    previous stage's final/ (the model keeps the recipe's dtype)."""
    recipe = copy.deepcopy(stage.recipe)
    if previous_final is not None:
        recipe.model = ModelSpec(name_or_path=previous_final, dtype=recipe.model.dtype)
        recipe.tokenizer = TokenizerSpec(
            name_or_path=previous_final, model_max_length=recipe.tokenizer.model_max_length
        )
    return recipe


def clear_stages(staged: StagedRecipe) -> None:
    """Delete what an earlier run of these stages wrote (each stage's known outputs, stage_eval/, recipe.yaml)."""
    for stage in staged.stages:
        clear_previous_run(stage.recipe.output_dir)
    shutil.rmtree(os.path.join(staged.output_dir, STAGE_EVAL_DIR), ignore_errors=True)
    top_recipe = os.path.join(staged.output_dir, RECIPE_FILE)
    if os.path.isfile(top_recipe):
        os.remove(top_recipe)


def dump_staged_recipe(staged: StagedRecipe, path: str) -> None:
    import yaml

    header = f"# resolved staged recipe{f' from {staged.path}' if staged.path else ''}; rerun: llmreg train {path}\n"
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump(staged.to_dict(), f, sort_keys=False, default_flow_style=False)


def run_stages(staged: StagedRecipe, overwrite: bool = False) -> StagesResult:
    """Train every stage in order (see the module docstring), then run stage_eval if the recipe has one."""
    plans = plan_stages(staged, overwrite)
    if is_main_process():
        if overwrite:
            clear_stages(staged)
        os.makedirs(staged.output_dir, exist_ok=True)
        dump_staged_recipe(staged, os.path.join(staged.output_dir, RECIPE_FILE))
    result = StagesResult(output_dir=staged.output_dir, final_dirs=[final_dir(s) for s in staged.stages])
    n = len(plans)
    previous = None
    for plan in plans:
        stage = plan.stage
        recipe = stage_recipe(stage, previous)
        header = f"stage {stage.index + 1}/{n}: {stage.name} ({recipe.trainer.kind})"
        if plan.action == "skip":
            say(f"{header}: skipped, {final_dir(stage)} exists (use --overwrite to train it again)")
            result.skipped.append(stage.name)
        else:
            say(
                f"{header}, from {recipe.model.describe()}"
                + (f", resuming from {plan.resume_from}" if plan.resume_from else "")
                + f", into {recipe.output_dir}"
            )
            recipe.resume = plan.resume_from is not None
            # overwrite again per stage: the main process cleared everything above, but another rank may look
            # at the stage directory before that finished (train() then skips the checkpoint check)
            run = train(recipe, overwrite=overwrite)
            run.trainer.accelerator.wait_for_everyone()  # final/ is complete before any rank loads it
            say(f"{header}: done, {run.global_step} steps; final model in {run.final_dir}")
            del run
            gc.collect()
            result.trained.append(stage.name)
        previous = final_dir(stage)
    if staged.stage_eval is not None and is_main_process():
        result.stage_eval = evaluate_stages(staged)
    return result


__all__ = [
    "START",
    "STAGE_EVAL_DIR",
    "StagePlan",
    "StagesResult",
    "continual_report",
    "evaluate_stages",
    "expand_stage",
    "final_dir",
    "inject_stage_index",
    "merge_section",
    "plan_stages",
    "run_stages",
    "starting_model",
    "validate_staged_recipe",
    "write_continual_markdown",
]
