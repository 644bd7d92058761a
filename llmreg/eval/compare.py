"""`llmreg eval`: fine-tuned models against their base on a suite (gain vs forgetting).

Every model is scored through the score cache (llmreg.eval.run.cached_evaluate, keyed by the model's files, so a
model retrained into the same folder is scored again); the report (forgetting_report.{json,md}, deltas.png,
pareto.png) and every model's per-document scores (per_doc_scores.json: {"base": entry, "runs": {name: entry}},
entries in the cache's format) go to the output folder.
"""

from __future__ import annotations

import os

import llmreg.eval.run as eval_run  # looked up at call time (tests replace its functions)
from llmreg.core.options import ConfigError

FINAL_DIR = "final"  # a run's final model: llmreg.recipe.run.FINAL_DIR, not imported (recipe imports eval)


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


def run_names(paths: list[str], names: list[str] | None = None) -> list[str]:
    """Each model's name in the report: `names` when given (one per model), else the shortest tail of its path
    that tells it from the others, after dropping the trailing folders all paths share (runs/a/final and
    runs/b/final are `a` and `b`; a lone runs/a/final is `a`); a path given twice gets `-2`, `-3`, ..."""
    if names:
        if len(names) != len(paths):
            raise ConfigError(f"eval: {len(names)} --name for {len(paths)} fine-tuned models; give one per model")
        if len(set(names)) != len(names):
            raise ConfigError(f"eval: --name values must differ, got {', '.join(names)}")
        return list(names)
    parts = [[p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".")] or [path] for path in paths]
    shared = 0
    if len({tuple(p) for p in parts}) > 1:
        while all(len(p) > shared + 1 for p in parts) and len({p[-1 - shared] for p in parts}) == 1:
            shared += 1
    elif len(parts[0]) > 1 and parts[0][-1] == FINAL_DIR:
        shared = 1  # one run's final model (or the same one twice): name it after the run
    heads = [p[: len(p) - shared] for p in parts]
    depth = 1
    while depth < max(len(h) for h in heads) and len({"/".join(h[-depth:]) for h in heads}) < len(
        {tuple(h) for h in heads}
    ):
        depth += 1
    chosen, result = {}, []
    for head in heads:
        name = "/".join(head[-depth:])
        chosen[name] = chosen.get(name, 0) + 1
        result.append(name if chosen[name] == 1 else f"{name}-{chosen[name]}")
    return result


def compare_to_base(
    suite,
    suite_path: str,
    base: str,
    models: list[str],
    out: str,
    limit: int | None = None,
    cache_dir: str | None = None,
    names: list[str] | None = None,
) -> list[str]:
    """Score the base and each model on `suite`; write the report into `out`; the files written."""
    from llmreg.eval.report import provenance

    paths = dict(zip(run_names(models, names), models))
    print(f"evaluating base {base} on {suite_path}", flush=True)
    base_scores = eval_run.cached_evaluate(suite, base, limit=limit, cache_dir=cache_dir)
    runs = {}
    for name, path in paths.items():
        print(f"evaluating {name}: {path}", flush=True)
        runs[name] = eval_run.cached_evaluate(suite, path, limit=limit, cache_dir=cache_dir)
    report = eval_run.forgetting_report(base_scores, runs, suite, provenance(suite_path, base, paths, limit))
    files = eval_run.write_report(report, out)
    return [*files, write_per_doc(out, suite, limit, (base, base_scores), {n: (paths[n], s) for n, s in runs.items()})]


def write_per_doc(out: str, suite, limit: int | None, base: tuple, runs: dict[str, tuple]) -> str:
    """<out>/per_doc_scores.json: each model's scores in the cache's format (per-document values included)."""
    import json

    data = {
        "base": eval_run.cache_entry(base[1], base[0], suite, limit),
        "runs": {name: eval_run.cache_entry(scores, path, suite, limit) for name, (path, scores) in runs.items()},
    }
    path = os.path.join(out, "per_doc_scores.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path
