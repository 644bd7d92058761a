"""`stage_eval` of a recipe with `stages:`: the starting model and each stage's final model on a suite.

Once every stage has trained, they are evaluated (llmreg.eval.run.evaluate_suite, on the main process) into
`<output_dir>/stage_eval/`: scores.json (every task's score per model), and, when every stage names its
`eval_task`, continual_report.json / .md: R[i][j] = score after stage i on stage j's eval_task, baseline =
the starting model's scores, and op / bwt / fwt (llmreg.eval.continual_metrics). Lower-is-better metrics
(perplexities) are negated in R and baseline so that higher is better throughout, as continual_metrics expects.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any

from llmreg.recipe.run import FINAL_DIR, is_main_process
from llmreg.recipe.schema import Stage, StagedRecipe

STAGE_EVAL_DIR = "stage_eval"
START = "start"  # the key of the starting model in stage_eval/scores.json


def final_dir(stage: Stage) -> str:
    return os.path.join(stage.recipe.output_dir, FINAL_DIR)


def say(*lines: str) -> None:
    """Print on the main process only."""
    if is_main_process():
        print("\n".join(lines), flush=True)


def starting_model(staged: StagedRecipe) -> tuple[Any, Any]:
    """(model or path, tokenizer or None): what stage 0 starts from, for evaluation."""
    recipe = staged.stages[0].recipe
    spec = recipe.model
    if spec.gguf_file is not None:
        from llmreg.recipe.gguf import converted_folder

        return converted_folder(spec.name_or_path, spec.gguf_file), None
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
        say(f"stage_eval: {key} ({described}) on {spec.suite}")
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
        say(
            f"stage_eval: op {_fmt(continual['op'])}, bwt {_fmt(continual['bwt'])}, fwt {_fmt(continual['fwt'])}; "
            f"report in {out_dir}"
        )
    else:
        say(f"stage_eval: scores in {out_dir} (no continual report: not every stage names its eval_task)")
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
    return {
        "stages": [s.name for s in stages],
        "tasks": tasks,
        "R": R,
        "baseline": baseline,
        "negated": sorted(t for t in set(tasks) if sign[t] < 0),
        **continual_metrics(R, baseline),
    }


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def write_continual_markdown(report: dict, path: str) -> None:
    cols = [f"{j}_{name}: {task}" for j, (name, task) in enumerate(zip(report["stages"], report["tasks"]))]
    lines = [
        f"# Continual-learning report: {os.path.basename(report.get('suite', ''))}",
        "",
        "R[i][j]: the score on stage j's eval_task after training stage i (higher is better"
        + (f"; negated: {', '.join(report['negated'])}" if report["negated"] else "")
        + ").",
        "",
        "| after \\ on | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
        "| start (baseline) | " + " | ".join(_fmt(x) for x in report["baseline"]) + " |",
    ]
    for i, (name, row) in enumerate(zip(report["stages"], report["R"])):
        lines.append(f"| {i}_{name} | " + " | ".join(_fmt(x) for x in row) + " |")
    lines += [
        "",
        f"op {_fmt(report['op'])}, bwt {_fmt(report['bwt'])} (negative = forgetting), "
        f"fwt {_fmt(report['fwt'])} (Lopez-Paz & Ranzato, 2017; llmreg.eval.continual)",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


__all__ = [
    "STAGE_EVAL_DIR",
    "START",
    "continual_report",
    "evaluate_stages",
    "final_dir",
    "starting_model",
    "write_continual_markdown",
]
