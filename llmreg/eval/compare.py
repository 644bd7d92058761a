"""`llmreg eval`: fine-tuned models against their base on a suite (gain vs forgetting).

The base is scored through the base-score cache (llmreg.eval.run.cached_evaluate), each fine-tuned model
afresh; the report (forgetting_report.{json,md}, deltas.png, pareto.png) goes to the output folder.
"""

from __future__ import annotations

import os

import llmreg.eval.run as eval_run  # looked up at call time (tests replace its functions)
from llmreg.core.options import ConfigError


def check_limit(limit: int | None) -> None:
    """lm-eval takes --limit 0 for "no documents" and a negative one for an islice error, after the model loaded."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: must be >= 1 documents per task, got {limit} (leave it out for all)")


def pick_base(models: list[str], base: str | None) -> tuple[str, list[str]]:
    """(base, fine-tuned models): `base`, else the first of at least two models."""
    models = list(models)
    base = base or (models.pop(0) if len(models) > 1 else None)
    if base is None:
        raise ConfigError("eval: give --base, or at least two --model (the first is then the base)")
    return base, models


def run_name(path: str, taken: dict) -> str:
    """A model's name in the report: its folder name, numbered when another model has it already."""
    name = os.path.basename(os.path.normpath(path)) or path
    return name if name not in taken else f"{name}-{len(taken)}"


def compare_to_base(
    suite,
    suite_path: str,
    base: str,
    models: list[str],
    out: str,
    limit: int | None = None,
    cache_dir: str | None = None,
) -> list[str]:
    """Score the base and each model on `suite`; write the report into `out`; the files written."""
    print(f"evaluating base {base} on {suite_path}", flush=True)
    base_scores = eval_run.cached_evaluate(suite, base, limit=limit, cache_dir=cache_dir)
    runs = {}
    for path in models:
        print(f"evaluating {path}", flush=True)
        runs[run_name(path, runs)] = eval_run.evaluate_suite(suite, path, limit=limit)
    return eval_run.write_report(eval_run.forgetting_report(base_scores, runs, suite), out)
