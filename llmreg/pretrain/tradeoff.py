"""Trade-off sweeps (issue 17, point 5): every grid point of `llmreg sweep`, and optionally its WiSE-FT
interpolations with the base, scored on an eval suite against the base in one gain-vs-forgetting report.

    llmreg sweep recipes/testbed/vanilla.yaml --grid trainer.learning_rate=3e-5,1e-4 \
        --suite eval/suites/testbed.yaml [--base MODEL] [--merge-alphas 0.25,0.5,0.75] [--limit N]

Reuses the sweep (llmreg.pretrain.sweep: points validated before anything loads, trained one after another,
finished points skipped), the merge (llmreg.eval.merge: `<point>/wise_ft/alpha-<a>/`), the evaluation and its
score cache (llmreg.eval.run.cached_evaluate: keyed by each model's files, so a point evaluated before is not
evaluated again, and a retrained point is) and the report (llmreg.eval.run.forgetting_report with the paired
error bars of llmreg.eval.paired). Output: `<out>/tradeoff/` with forgetting_report.{json,md} (one row per point
and per point@alpha, target gain +- SE and mean retained drop +- SE), pareto.png and deltas.png; the json's
`sweep` entry lists each point's grid values.

The base is `--base`, else the recipe's own model (its name_or_path, GGUF file or testbed build); a recipe
whose model is built from a config has no base to compare with and needs `--base`. A merge is redone when the
point's final model is newer than it (a point retrained with --overwrite) or was made from another base.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from llmreg.core.options import ConfigError

TRADEOFF_DIR = "tradeoff"
MERGED_DIR = "wise_ft"
FINAL_DIR = "final"


@dataclass
class TradeoffSpec:
    suite: Any  # llmreg.eval.suite.Suite
    suite_path: str
    base: str | None  # None: the recipe's model
    alphas: list[float] = field(default_factory=list)
    limit: int | None = None
    cache_dir: str | None = None


def parse_merge_alphas(text: str | None) -> list[float]:
    """`0.25,0.5` -> [0.25, 0.5]; each alpha must lie in [0, 1] (between the base and the fine-tune)."""
    if text is None:
        return []
    try:
        alphas = [float(a) for a in str(text).split(",") if a.strip()]
    except ValueError:
        raise ConfigError(f"sweep: --merge-alphas takes numbers in [0, 1] separated by commas; got {text!r}") from None
    bad = [a for a in alphas if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
    if not alphas or bad:
        raise ConfigError(
            f"sweep: --merge-alphas must lie in [0, 1] (the weight of the fine-tune in (1 - alpha) * base + "
            f"alpha * tuned); got {text!r}"
        )
    return sorted(set(alphas))


def check_tradeoff(
    suite_path: str | None,
    base: str | None,
    merge_alphas: str | None,
    limit: int | None,
    cache_dir: str | None = None,
) -> TradeoffSpec | None:
    """The checked `--suite` options (None without --suite); a one-line ConfigError before anything loads."""
    from llmreg.eval.compare import check_limit
    from llmreg.eval.suite import load_suite
    from llmreg.recipe.models import check_model_path

    if suite_path is None:
        given = [flag for flag, v in (("--base", base), ("--merge-alphas", merge_alphas), ("--limit", limit)) if v]
        if given:
            raise ConfigError(f"sweep: {given[0]} needs --suite (the points are scored on an eval suite)")
        return None
    check_limit(limit)
    alphas = parse_merge_alphas(merge_alphas)
    suite = load_suite(suite_path)
    if base is not None:
        check_model_path(base, "sweep --base")
    return TradeoffSpec(suite, suite_path, base, alphas, limit, cache_dir)


def check_base(plan, spec: TradeoffSpec) -> None:
    """A sweep whose points build their model from a config, or whose grid changes the model, has nothing to
    compare with but `--base`."""
    model = plan.points[0].recipe.model
    moved = [key for key, _ in plan.axes if key.split(".")[0] in ("model", "tokenizer")]
    if spec.base is None and moved:
        raise ConfigError(f"sweep --suite: the grid changes '{moved[0]}', so the points have no one base; give --base")
    if spec.base is None and not model.name_or_path and model.testbed is None:
        raise ConfigError(
            "sweep --suite: the recipe builds its model from a config, so there is no base model to compare "
            "with; give --base MODEL"
        )


def base_model(plan, spec: TradeoffSpec) -> str:
    """--base, else the recipe's model as `llmreg eval` takes it (a folder, hub name, DIR/NAME.gguf or the
    testbed build's folder, built or loaded from its cache)."""
    if spec.base is not None:
        return spec.base
    model = plan.points[0].recipe.model
    if model.name_or_path:
        return f"{model.name_or_path}/{model.gguf_file}" if model.gguf_file else model.name_or_path
    from llmreg.testbed import build

    return str(build(**model.testbed) if isinstance(model.testbed, dict) else build())


def _newest_mtime(folder: str) -> float:
    return max((e.stat().st_mtime for e in os.scandir(folder) if e.is_file()), default=0.0)


def merged_models(base: str, final: str, run_dir: str, alphas: list[float]) -> dict[float, str]:
    """{alpha: folder} of the point's WiSE-FT models; the missing or outdated ones are written first."""
    from llmreg.eval.merge import MERGE_FILE, merge, model_folder, plan_merge

    if not alphas:
        return {}
    out = os.path.join(run_dir, MERGED_DIR)
    folder = {a: os.path.join(out, f"alpha-{a:g}") for a in alphas}  # llmreg.eval.merge.MergePlan.folder
    base_folder = model_folder(base, "--base")  # as plan_merge records it in the marker

    def current(a: float) -> bool:
        marker = os.path.join(folder[a], MERGE_FILE)  # written last
        if not os.path.isfile(marker) or os.path.getmtime(marker) < _newest_mtime(final):
            return False
        with open(marker) as f:  # a merge with another base (a rerun with a different --base) is redone
            return json.load(f).get("base") == base_folder

    todo = [a for a in alphas if not current(a)]
    if todo:
        merge(plan_merge(base, final, ",".join(repr(a) for a in todo), out, overwrite=True))
    return folder


def run_tradeoff(plan, spec: TradeoffSpec, say=print) -> list[str]:
    """Score the base, every finished point and its merges on the suite; write `<out>/tradeoff/`."""
    import llmreg.eval.run as eval_run
    from llmreg.eval.report import provenance

    def evaluate(name: str, path: str):
        cached = eval_run.read_cache_entry(eval_run.cache_path(spec.cache_dir, path, spec.suite, spec.limit))
        say(f"{name}: scores from the cache" if cached is not None else f"evaluating {name}: {path}")
        return cached or eval_run.cached_evaluate(spec.suite, path, limit=spec.limit, cache_dir=spec.cache_dir)

    base = base_model(plan, spec)
    base_scores = evaluate("base", base)
    runs, paths, points = {}, {}, []
    for point in plan.points:
        final = os.path.join(point.run_dir, FINAL_DIR)
        if point.result is None or not os.path.isdir(final):
            continue  # not trained (a sweep stopped early): left out of the report
        models = {point.name: final}
        for alpha, folder in merged_models(base, final, point.run_dir, spec.alphas).items():
            models[f"{point.name}@alpha={alpha:g}"] = folder
        for name, path in models.items():
            runs[name], paths[name] = evaluate(name, path), path
        points.append({"name": point.name, "values": point.values, "run_dir": point.run_dir})
    report = eval_run.forgetting_report(
        base_scores, runs, spec.suite, provenance(spec.suite_path, base, paths, spec.limit)
    )
    report["sweep"] = {
        "recipe": os.path.abspath(plan.recipe_path),
        "overrides": plan.base_overrides,
        "axes": [{"key": k, "values": v} for k, v in plan.axes],
        "merge_alphas": spec.alphas,
        "points": points,
    }
    return eval_run.write_report(report, os.path.join(plan.out, TRADEOFF_DIR))
