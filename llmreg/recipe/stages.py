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
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from llmreg.core.options import ConfigError, check_mapping, closest
from llmreg.recipe.errors import located
from llmreg.recipe.paths import resolve_path
from llmreg.recipe.run import FINAL_DIR, RECIPE_FILE, checkpoints_in, clear_previous_run, is_main_process
from llmreg.recipe.schema import (
    STAGE_SECTIONS, TOP_LEVEL_ONLY, ModelSpec, Recipe, Stage, StagedRecipe, StageEvalSpec, TokenizerSpec,
)

STAGE_EVAL_DIR = "stage_eval"
START = "start"  # the key of the starting model in stage_eval/scores.json
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


# -- validation ------------------------------------------------------------------------------------

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
            if options_cls is not None and dataclasses.is_dataclass(options_cls) and \
                    any(f.name == "stage" for f in dataclasses.fields(options_cls)):
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


def validate_staged_recipe(raw: dict, recipe_path: str | None = None) -> StagedRecipe:
    """Check a raw recipe with `stages:` (top-level keys already checked by validate_recipe)."""
    from llmreg.recipe.validate import DEFAULT_SEED, default_output_dir, validate_recipe

    top = {k: v for k, v in raw.items() if k not in ("stages", "stage_eval")}
    if top.get("importance") is not None:
        raise ConfigError("importance: not allowed together with stages; record importance with its own recipe "
                          "(`llmreg importance`), then use the artifact in a stage's forgetting_penalty")
    items = raw["stages"]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"stages: expected a non-empty list of stages (mappings with name, data, trainer, ...), "
                          f"got {items!r}")
    recipe_dir = os.path.dirname(os.path.abspath(recipe_path)) if recipe_path else None
    output_dir = os.path.abspath(os.path.expanduser(top.get("output_dir") or default_output_dir(recipe_path)))
    stage_eval, suite_tasks = validate_stage_eval(raw.get("stage_eval"), recipe_dir)
    stages: list[Stage] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"stages[{i}]: expected a mapping (name, data, trainer, ...), got {item!r}")
        name = item.get("name", f"stage{i}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"stages[{i}].name: {name!r} is not a usable folder name (letters, digits, '_', "
                              "'-', '.'; starting with a letter or digit)")
        where = f"stages[{i}] ({name})"
        for key in TOP_LEVEL_ONLY:
            if key in item:
                raise ConfigError(f"{where}: {key} is set at the top level only (each stage after the first "
                                  "starts from the previous stage's final model)")
        values = check_mapping(_StageKeys, item, where)
        taken = next((s for s in stages if s.name == name), None)
        if taken is not None:
            raise ConfigError(f"{where}: duplicate stage name '{name}' (stages[{taken.index}] has it too); "
                              "stage names must be unique")
        with located(where):
            recipe = validate_recipe(expand_stage(top, values, i, output_dir), recipe_path)
        if recipe.peft is not None and i < len(items) - 1:
            raise ConfigError(f"{where}: peft: only the last stage may use PEFT (the next stage would start "
                              "from an adapter rather than a whole model)")
        eval_task = values.get("eval_task")
        if eval_task is not None:
            if stage_eval is None:
                raise ConfigError(f"{where}: eval_task: needs a top-level stage_eval (the suite it names a task of)")
            if eval_task not in suite_tasks:
                hint = closest(eval_task, suite_tasks)
                raise ConfigError(f"{where}: eval_task: '{eval_task}' is not a task of {stage_eval.suite}"
                                  + (f"; did you mean '{hint}'?" if hint else "")
                                  + f" (its tasks: {', '.join(suite_tasks)})")
        stages.append(Stage(index=i, name=name, recipe=recipe, eval_task=eval_task))
    return StagedRecipe(stages=stages, output_dir=output_dir, seed=top.get("seed", DEFAULT_SEED),
                        resume=top.get("resume", False), stage_eval=stage_eval,
                        path=os.path.abspath(recipe_path) if recipe_path else None)


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
        raise ConfigError(f"{where}.suite: suite file not found: {spec.suite}")
    from llmreg.eval.suite import load_suite

    with located(f"{where}.suite"):
        suite = load_suite(path)
    spec.suite = path
    return spec, [e.task for e in suite.entries]


# -- running ---------------------------------------------------------------------------------------

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


def final_dir(stage: Stage) -> str:
    return os.path.join(stage.recipe.output_dir, FINAL_DIR)


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
                raise ConfigError(f"{where}: {stage.recipe.output_dir} holds outputs of an earlier run, but an "
                                  "earlier stage trains again now: add --overwrite to start all stages afresh")
            plans.append(StagePlan(stage, "train"))
            continue
        last = checkpoints_in(stage.recipe.output_dir)
        if last and not staged.resume:
            raise ConfigError(f"{where}: {stage.recipe.output_dir} already holds {last[-1]} from an earlier run: "
                              "add --resume to continue it, --overwrite to replace all stages, or set "
                              "output_dir=<another dir>")
        if staged.resume and not last and not plans:
            raise ConfigError(f"resume: no finished stage and no checkpoint in {stage.recipe.output_dir} to resume "
                              "from; train without --resume first")
        resume_from = os.path.join(stage.recipe.output_dir, last[-1]) if last and staged.resume else None
        plans.append(StagePlan(stage, "train", resume_from))
    return plans


def stage_recipe(stage: Stage, previous_final: str | None) -> Recipe:
    """The recipe a stage trains with: stage 0's as validated; a later stage's model and tokenizer are the
    previous stage's final/ (the model keeps the recipe's dtype)."""
    recipe = copy.deepcopy(stage.recipe)
    if previous_final is not None:
        recipe.model = ModelSpec(name_or_path=previous_final, dtype=recipe.model.dtype)
        recipe.tokenizer = TokenizerSpec(name_or_path=previous_final,
                                         model_max_length=recipe.tokenizer.model_max_length)
    return recipe


def _say(*lines: str) -> None:
    if is_main_process():
        print("\n".join(lines), flush=True)


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
    from llmreg.recipe.run import train

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
            _say(f"{header}: skipped, {final_dir(stage)} exists (use --overwrite to train it again)")
            result.skipped.append(stage.name)
        else:
            _say(f"{header}, from {recipe.model.describe()}"
                 + (f", resuming from {plan.resume_from}" if plan.resume_from else "")
                 + f", into {recipe.output_dir}")
            recipe.resume = plan.resume_from is not None
            # overwrite again per stage: the main process cleared everything above, but another rank may look
            # at the stage directory before that finished (train() then skips the checkpoint check)
            run = train(recipe, overwrite=overwrite)
            run.trainer.accelerator.wait_for_everyone()  # final/ is complete before any rank loads it
            _say(f"{header}: done, {run.global_step} steps; final model in {run.final_dir}")
            del run
            gc.collect()
            result.trained.append(stage.name)
        previous = final_dir(stage)
    if staged.stage_eval is not None and is_main_process():
        result.stage_eval = evaluate_stages(staged)
    return result


# -- stage evaluation ------------------------------------------------------------------------------

def starting_model(staged: StagedRecipe) -> tuple[Any, Any]:
    """(model or path, tokenizer or None): what stage 0 starts from, for evaluation."""
    recipe = staged.stages[0].recipe
    spec = recipe.model
    if spec.name_or_path is not None:
        return spec.name_or_path, None
    if spec.testbed is not None:
        from llmreg.testbed import build

        return str(build(**spec.testbed)), None
    import torch
    from transformers import AutoModelForCausalLM

    from llmreg.recipe.models import _DTYPES, INIT_DIR, build_tokenizer, model_config

    tokenizer = build_tokenizer(recipe.tokenizer)
    init_dir = os.path.join(recipe.output_dir, INIT_DIR)
    if os.path.isfile(os.path.join(init_dir, "config.json")):  # saved by a DPO / GRPO stage 0: the exact start
        return AutoModelForCausalLM.from_pretrained(init_dir), tokenizer
    config = model_config(spec, tokenizer)
    torch.manual_seed(spec.seed)  # as build_model does: the same initial weights stage 0 trained from
    return AutoModelForCausalLM.from_config(config, dtype=_DTYPES.get(spec.dtype) or torch.float32), tokenizer


def evaluate_stages(staged: StagedRecipe) -> dict:
    """Evaluate the starting model and each stage's final model; write stage_eval/ (see the module docstring)."""
    from llmreg.eval.run import evaluate_suite
    from llmreg.eval.suite import load_suite

    spec = staged.stage_eval
    suite = load_suite(spec.suite)
    out_dir = os.path.join(staged.output_dir, STAGE_EVAL_DIR)
    os.makedirs(out_dir, exist_ok=True)
    models: dict[str, dict] = {}
    metrics: dict[str, str] = {}
    model, tokenizer = starting_model(staged)
    targets = [(START, model, tokenizer, staged.model.describe())]
    targets += [(s.dir_name, final_dir(s), None, final_dir(s)) for s in staged.stages]
    for key, model, tokenizer, described in targets:
        _say(f"stage_eval: {key} ({described}) on {spec.suite}")
        scores = evaluate_suite(suite, model, tokenizer, limit=spec.limit, batch_size=spec.batch_size)
        models[key] = {"model": described, "scores": dict(scores)}
        metrics.update(scores.metrics)
        del model
        gc.collect()
    report = {"suite": spec.suite, "limit": spec.limit, "metrics": metrics, "models": models}
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(report, f, indent=2)
    continual = continual_report(staged.stages, {k: v["scores"] for k, v in models.items()}, metrics)
    if continual is not None:
        continual["suite"] = spec.suite
        with open(os.path.join(out_dir, "continual_report.json"), "w") as f:
            json.dump(continual, f, indent=2)
        write_continual_markdown(continual, os.path.join(out_dir, "continual_report.md"))
        report["continual"] = continual
        _say(f"stage_eval: op {_fmt(continual['op'])}, bwt {_fmt(continual['bwt'])}, fwt {_fmt(continual['fwt'])}; "
             f"report in {out_dir}")
    else:
        _say(f"stage_eval: scores in {out_dir} (no continual report: not every stage names its eval_task)")
    return report


def continual_report(stages: list[Stage], scores: dict[str, dict[str, float]], metrics: dict[str, str]) -> dict | None:
    """R[i][j] = score after stage i on stage j's eval_task, baseline[j] = the starting model's, and op / bwt /
    fwt; None unless every stage names its eval_task. Lower-is-better scores are negated."""
    from llmreg.eval.continual import continual_metrics
    from llmreg.eval.run import lower_is_better

    if any(s.eval_task is None for s in stages):
        return None
    tasks = [s.eval_task for s in stages]
    sign = {t: -1.0 if lower_is_better(metrics.get(t, "")) else 1.0 for t in tasks}
    R = [[sign[t] * scores[s.dir_name][t] for t in tasks] for s in stages]
    baseline = [sign[t] * scores[START][t] for t in tasks]
    return {"stages": [s.name for s in stages], "tasks": tasks, "R": R, "baseline": baseline,
            "negated": sorted(t for t in set(tasks) if sign[t] < 0), **continual_metrics(R, baseline)}


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def write_continual_markdown(report: dict, path: str) -> None:
    cols = [f"{j}_{name}: {task}" for j, (name, task) in enumerate(zip(report["stages"], report["tasks"]))]
    lines = [f"# Continual-learning report: {os.path.basename(report.get('suite', ''))}", "",
             "R[i][j]: the score on stage j's eval_task after training stage i (higher is better"
             + (f"; negated: {', '.join(report['negated'])}" if report["negated"] else "") + ").", "",
             "| after \\ on | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| start (baseline) | " + " | ".join(_fmt(x) for x in report["baseline"]) + " |"]
    for i, (name, row) in enumerate(zip(report["stages"], report["R"])):
        lines.append(f"| {i}_{name} | " + " | ".join(_fmt(x) for x in row) + " |")
    lines += ["", f"op {_fmt(report['op'])}, bwt {_fmt(report['bwt'])} (negative = forgetting), "
                  f"fwt {_fmt(report['fwt'])} (Lopez-Paz & Ranzato, 2017; llmreg.eval.continual)"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


__all__ = ["StagesResult", "evaluate_stages", "plan_stages", "run_stages", "validate_staged_recipe"]
