"""The lines `llmreg validate`, `train` and `importance` print: a validated recipe, and where a run's outputs went."""

from __future__ import annotations

import os
from typing import Any

from llmreg.recipe.run import RECIPE_FILE
from llmreg.recipe.schema import StagedRecipe
from llmreg.recipe.stages_report import STAGE_EVAL_DIR


def summary(recipe: Any) -> list[str]:
    """A few lines describing a validated recipe."""
    model = recipe.model.describe()
    tok = recipe.tokenizer
    tokenizer = tok.name_or_path or f"builtin {tok.builtin}"
    if tok.gguf_file:
        tokenizer = os.path.join(tokenizer, tok.gguf_file)
    data = source_text(recipe.data.train, recipe.data.mix)
    data += f"; eval {source_text(recipe.data.eval)}" if recipe.data.eval else ""
    trainer = ", ".join(f"{k}={value_text(v)}" for k, v in recipe.trainer.args.items())
    regs = (
        ", ".join(
            f"{r['name']}({', '.join(f'{k}={value_text(v)}' for k, v in r.items() if k != 'name')})"
            for r in recipe.regularizers
        )
        or "none"
    )
    return [
        f"  model         {model} (dtype {recipe.model.dtype})",
        f"  tokenizer     {tokenizer}",
        f"  data          train {data}",
        f"  trainer       {recipe.trainer.kind}: {trainer}",
        f"  peft          {recipe.peft or 'none'}",
        f"  regularizers  {regs}",
        f"  output_dir    {recipe.output_dir}",
        *(
            [f"  importance    {recipe.importance.method} -> {recipe.importance.output or 'output_dir/importance'}"]
            if recipe.importance is not None
            else []
        ),
    ]


def value_text(value: Any) -> str:
    """A recipe value as the user would write it: `warmup_steps=20`, not the 20.0 of a float-typed field (several
    TrainingArguments step counts also take fractions); repr for strings like eos_token "\\n" that would otherwise
    break the line."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, str) and not value.isprintable():
        return repr(value)
    return str(value)


def staged_summary(staged: Any) -> list[str]:
    """The shared settings of a staged recipe, then each stage's own lines."""
    lines = summary(staged.stages[0].recipe)
    shared = [line for line in lines if line.split()[0] in ("model", "tokenizer")]
    shared.append(f"  output_dir    {staged.output_dir}")
    if staged.stage_eval is not None:
        spec = staged.stage_eval
        shared.append(
            f"  stage_eval    {spec.suite} (limit {spec.limit}, batch_size {spec.batch_size}) -> "
            f"{os.path.join(staged.output_dir, STAGE_EVAL_DIR)}"
        )
    n = len(staged.stages)
    for stage in staged.stages:
        start = "the model above" if stage.index == 0 else f"stage {stage.index}'s final model"
        shared.append(
            f"  stage {stage.index + 1}/{n}: {stage.name} ({stage.recipe.trainer.kind}), from {start}, "
            f"into {stage.recipe.output_dir}"
        )
        shared += [
            "    " + line
            for line in summary(stage.recipe)
            if line.split()[0] not in ("model", "tokenizer", "output_dir")
        ]
        if stage.eval_task:
            shared.append(f"      eval_task     {stage.eval_task}")
    return shared


def describe(recipe: Any) -> list[str]:
    """`staged_summary` for a recipe with stages, else `summary`."""
    return staged_summary(recipe) if isinstance(recipe, StagedRecipe) else summary(recipe)


def source_text(src: Any, mix: Any = None) -> str:
    """One source, or a mixture: `mixture interleave (first_exhausted, seed 0) of a (weight 0.8) + b (weight 0.2)`."""
    if isinstance(src, list):
        how = mix.strategy + (f" ({mix.stopping}, seed {mix.seed})" if mix.strategy == "interleave" else "")
        return f"mixture {how} of " + " + ".join(source_text(s) for s in src)
    rows = [f"{src.num_examples} examples, seed {src.seed}"] if src.kind == "builtin" else []
    rows += [f"{k} {value_text(v)}" for k, v in (("weight", src.weight), ("skip", src.skip)) if v is not None]
    return src.path + (f" ({', '.join(rows)})" if rows else "")


def run_lines(result: Any) -> list[str]:
    """Where a finished run (llmreg.recipe.run.RunResult) wrote its outputs."""
    return [
        f"done: {result.global_step} steps; outputs in {result.output_dir}",
        f"  recipe       {os.path.join(result.output_dir, RECIPE_FILE)}",
        f"  metrics      {os.path.join(result.output_dir, 'metrics.jsonl')}",
        f"  checkpoints  {', '.join(result.checkpoints) or '(none)'}",
        f"  final model  {result.final_dir}",
    ]


def stages_lines(result: Any) -> list[str]:
    """What finished stages (llmreg.recipe.stages.StagesResult) trained, skipped and wrote."""
    return [
        f"done: {len(result.trained)} stages trained"
        + (f", {len(result.skipped)} skipped ({', '.join(result.skipped)})" if result.skipped else "")
        + f"; outputs in {result.output_dir}",
        *(f"  stage {i + 1} final  {path}" for i, path in enumerate(result.final_dirs)),
        *([f"  stage_eval     {os.path.join(result.output_dir, STAGE_EVAL_DIR)}"] if result.stage_eval else []),
    ]
