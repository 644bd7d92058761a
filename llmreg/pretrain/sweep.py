"""`llmreg sweep`: a grid of runs of one recipe, one after another, and the paper's neighbour check.

    llmreg sweep recipes/pretrain/tiny.yaml --grid trainer.weight_decay=0.1,0.4,1.6 trainer.num_train_epochs=4,8,16

Every grid point is a recipe with the base overrides and the point's `key=value`s applied; ALL points are
validated before the first run starts (unknown key -> closest valid key, empty value lists, values of the
wrong type, duplicate axes), so a typo costs no model load. Point i trains into `<out>/<name>/` (name made
of the axes' values, e.g. `weight_decay=0.4__num_train_epochs=8`) and writes `final_eval.json` (the final
validation loss, after the cosine reached its end). A point with `final_eval.json` is finished and skipped
when the sweep runs again (a killed sweep continues where it stopped); an unfinished point with a
checkpoint resumes from it; one without starts again. A folder holding a different recipe is refused.

`<out>/sweep.json` and `<out>/sweep.md` are rewritten after every run: one row per point with its final
validation loss, the best point, and the certificate of arXiv 2509.14786 (convex_certificate_scaling.py):
a point is accepted when every +-1 grid neighbour along every axis (where one exists) has a loss >= its
own. On a full grid the minimum always passes; the check says something when points are missing (a
partial or running sweep) and when the best value sits at the end of an axis (`edges`: extend the grid).
The paper moves one axis at a time from a start point (coordinate descent); this runs the whole grid.

With `--suite` (llmreg.pretrain.tradeoff) any recipe can be swept: a point without data.pretrain (or without its
validation data, so without final_eval.json) is finished once `<point>/sweep_point.json` is written (after its
final/ model was saved), and the points are scored on the eval suite against the base instead of by a validation
loss (no sweep.json / sweep.md for such recipes).
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from llmreg.core.options import ConfigError
from llmreg.pretrain.sweep_summary import (  # noqa: F401 (re-exported: the sweep's public names)
    METRIC,
    SWEEP_JSON,
    SWEEP_MD,
    axis_order,
    certificate,
    format_table,
    markdown_report,
    summarize,
    write_summary,
)
from llmreg.recipe.overrides import parse_override

FORBIDDEN_AXES = ("output_dir", "resume")  # the sweep owns them
POINT_DONE = "sweep_point.json"  # a finished point of a recipe without data.pretrain (no final_eval.json)


# -- grid --------------------------------------------------------------------------------------------


def parse_grid(items: Iterable[str]) -> list[tuple[str, list[Any]]]:
    """`["a.b=1,2", "c=x,y"]` -> [("a.b", [1, 2]), ("c", ["x", "y"])]; values parsed as YAML."""
    axes: list[tuple[str, list[Any]]] = []
    for text in items:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"grid {text!r}: expected key=v1,v2,..., e.g. trainer.weight_decay=0.1,0.4,1.6")
        if key in (k for k, _ in axes):
            raise ConfigError(f"grid: axis '{key}' is given twice; put all its values in one key=v1,v2,...")
        if key.split(".")[0] in FORBIDDEN_AXES:
            raise ConfigError(
                f"grid: '{key}' is set by the sweep itself (each point runs in <out>/<point>); "
                "choose the sweep folder with --out"
            )
        if not raw.strip():
            raise ConfigError(f"grid {text!r}: no values for '{key}'")
        values = []
        for part in raw.split(","):
            if not part.strip():
                raise ConfigError(f"grid {text!r}: empty value in the list for '{key}'")
            values.append(parse_override(f"{key}={part.strip()}")[1])
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"grid {text!r}: a value is repeated")
        axes.append((key, values))
    if not axes:
        raise ConfigError("grid: give at least one axis, e.g. --grid trainer.weight_decay=0.1,0.4,1.6")
    return axes


def _short_names(keys: list[str]) -> list[str]:
    """The last key component when that is unambiguous, else the whole dotted key."""
    last = [k.split(".")[-1] for k in keys]
    return [short if last.count(short) == 1 else key for key, short in zip(keys, last)]


def _fmt(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


@dataclass
class Point:
    index: tuple[int, ...]  # value index per axis
    values: dict[str, Any]  # axis key -> value
    name: str
    run_dir: str
    recipe: Any = None  # the validated Recipe
    result: dict | None = None  # final_eval.json (pretrain) or POINT_DONE (other recipes) when finished


@dataclass
class SweepPlan:
    recipe_path: str
    base_overrides: list[str]
    axes: list[tuple[str, list[Any]]]
    out: str
    points: list[Point] = field(default_factory=list)
    pretrain: bool = True  # ranked by the final validation loss (sweep.json / sweep.md); else only trained


def plan_sweep(
    recipe_path: str,
    base_overrides: list[str],
    grid: list[str],
    out: str | None = None,
    overwrite: bool = False,
    any_recipe: bool = False,
) -> SweepPlan:
    """Validate every point (nothing is loaded); finished points carry their result. `any_recipe` (a sweep
    scored on an eval suite, llmreg.pretrain.tradeoff) takes recipes without data.pretrain too."""
    from llmreg.recipe import load_recipe
    from llmreg.recipe.schema import StagedRecipe

    axes = parse_grid(grid)
    base = load_recipe(recipe_path, base_overrides)
    if isinstance(base, StagedRecipe):
        raise ConfigError(f"sweep: {recipe_path} has stages; sweep a recipe without stages")
    out = os.path.abspath(os.path.expanduser(out or os.path.join(base.output_dir, "sweep")))
    # ranked by a validation loss only when the pretrain recipe holds one out (else, under --suite, the points
    # are marked finished like any recipe's: no final_eval.json is ever written)
    plan = SweepPlan(recipe_path, list(base_overrides), axes, out, pretrain=_validated_pretrain(base))
    if not any_recipe:
        _check_pretrain(base, recipe_path)
    shorts = _short_names([k for k, _ in axes])
    for index in itertools.product(*(range(len(vals)) for _, vals in axes)):
        values = {key: vals[i] for (key, vals), i in zip(axes, index)}
        name = "__".join(f"{s}={_fmt(v)}" for s, v in zip(shorts, values.values()))
        run_dir = os.path.join(out, name)
        point_overrides = [
            f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in values.items()
        ]
        try:
            recipe = load_recipe(recipe_path, [*base_overrides, *point_overrides, f"output_dir={run_dir}"])
        except ConfigError as err:
            raise ConfigError(f"grid point {name}: {err}") from None
        if plan.pretrain and not any_recipe:
            _check_pretrain(recipe, recipe_path)
        point = Point(index=index, values=values, name=name, run_dir=run_dir, recipe=recipe)
        if not overwrite:
            _check_same_recipe(point)
            point.result = read_point_result(run_dir, plan.pretrain)
        plan.points.append(point)
    return plan


def _validated_pretrain(recipe) -> bool:
    """A pretrain recipe with validation data: its runs write final_eval.json (llmreg.pretrain.recipe_mode)."""
    spec = recipe.data.pretrain
    return spec is not None and (spec.validation_fraction > 0 or recipe.data.eval is not None)


def _check_pretrain(recipe, recipe_path: str) -> None:
    if recipe.data.pretrain is None:
        raise ConfigError(
            f"sweep: {recipe_path} has no data.pretrain section; the sweep ranks runs by their "
            "final validation loss, which pretrain recipes write (final_eval.json); or score the points on an "
            "eval suite with --suite"
        )
    if not _validated_pretrain(recipe):
        raise ConfigError(
            "sweep: the recipe has no validation data (data.eval or data.pretrain.validation_fraction > 0)"
        )


def _comparable(recipe_dict: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump({k: v for k, v in recipe_dict.items() if k != "resume"}))


def _check_same_recipe(point: Point) -> None:
    from llmreg.recipe.run import RECIPE_FILE

    path = os.path.join(point.run_dir, RECIPE_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    planned = _comparable(point.recipe.to_dict())
    saved = _comparable(saved)
    if saved != planned:
        diff = sorted(
            k
            for k in set(_flatten(saved)) | set(_flatten(planned))
            if _flatten(saved).get(k) != _flatten(planned).get(k)
        )
        raise ConfigError(
            f"sweep: {point.run_dir} holds a run of a different recipe (differs in "
            f"{', '.join(diff[:5])}); use another --out, or --overwrite to redo every point"
        )


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


# -- running -----------------------------------------------------------------------------------------


def write_final_eval(trainer, recipe) -> dict:
    """Evaluate the trained model on the validation blocks; `<output_dir>/final_eval.json` (main process)."""
    from llmreg.recipe.run import FINAL_EVAL_FILE

    metrics = trainer.evaluate()
    result = {
        METRIC: float(metrics["eval_loss"]),
        "global_step": trainer.state.global_step,
        "epochs": trainer.args.num_train_epochs,
        "learning_rate": trainer.args.learning_rate,
        "weight_decay": trainer.args.weight_decay,
        "seed": trainer.args.seed,
        "train_blocks": len(trainer.train_dataset),
        "eval_blocks": len(trainer.eval_dataset),
        "recipe": recipe.to_dict(),
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(recipe.output_dir, FINAL_EVAL_FILE), "w") as f:
            json.dump(result, f, indent=2)
    trainer.accelerator.wait_for_everyone()  # under torchrun every rank reads the file next (run_sweep)
    return result


def read_final_eval(run_dir: str) -> dict | None:
    from llmreg.recipe.run import FINAL_EVAL_FILE

    path = os.path.join(run_dir, FINAL_EVAL_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_point_result(run_dir: str, pretrain: bool) -> dict | None:
    """A finished point's result: final_eval.json for a pretrain recipe, else the POINT_DONE marker the sweep
    writes after the run saved final/."""
    if pretrain:
        return read_final_eval(run_dir)
    path = os.path.join(run_dir, POINT_DONE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _train_point(plan: SweepPlan, point: Point, fresh: bool, train_fn) -> None:
    """Train one point; a non-pretrain point is marked finished (POINT_DONE, written last) only after the run
    saved its final model, so a killed point is trained again."""
    from llmreg.recipe.run import is_main_process

    marker = os.path.join(point.run_dir, POINT_DONE)
    if os.path.isfile(marker) and is_main_process():
        os.remove(marker)
    result = train_fn(point.recipe, overwrite=fresh)
    if not plan.pretrain and is_main_process():
        done = {"final_dir": os.path.join(point.run_dir, "final"), "global_step": getattr(result, "global_step", None)}
        with open(marker, "w") as f:
            json.dump(done, f)
    point.result = read_point_result(point.run_dir, plan.pretrain)


def run_sweep(plan: SweepPlan, overwrite: bool = False, say=print, train_fn=None) -> dict | None:
    """Train every unfinished point in order; returns (and writes) the summary of a pretrain sweep (None for
    other recipes, which llmreg.pretrain.tradeoff scores). `train_fn(recipe, overwrite)` replaces
    `llmreg.recipe.run.train` (tests)."""
    from llmreg.recipe.run import checkpoints_in

    if train_fn is None:
        from llmreg.recipe.run import train as train_fn
    os.makedirs(plan.out, exist_ok=True)
    todo = [p for p in plan.points if overwrite or p.result is None]
    say(
        f"sweep {plan.recipe_path}: {len(plan.points)} points, {len(plan.points) - len(todo)} finished, "
        f"{len(todo)} to run; outputs in {plan.out}"
    )
    if plan.pretrain:
        write_summary(plan)
    for n, point in enumerate(todo):
        fresh = overwrite or not checkpoints_in(point.run_dir)
        point.recipe.resume = not fresh
        say(f"[{n + 1}/{len(todo)}] {point.name}" + ("" if fresh else " (resuming)"))
        _train_point(plan, point, fresh, train_fn)
        if point.result is None and plan.pretrain:
            raise RuntimeError(f"{point.run_dir}: training finished without final_eval.json")
        if plan.pretrain:
            say(f"    {METRIC} {point.result[METRIC]:.4f}")
            write_summary(plan)
        gc.collect()
    if not plan.pretrain:
        return None
    summary = write_summary(plan)
    say(summary["table"])
    return summary
