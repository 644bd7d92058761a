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
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from llmreg.core.options import ConfigError
from llmreg.recipe.overrides import parse_override

SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
METRIC = "eval_loss"
FORBIDDEN_AXES = ("output_dir", "resume")  # the sweep owns them


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
    result: dict | None = None  # final_eval.json when finished


@dataclass
class SweepPlan:
    recipe_path: str
    base_overrides: list[str]
    axes: list[tuple[str, list[Any]]]
    out: str
    points: list[Point] = field(default_factory=list)


def plan_sweep(
    recipe_path: str, base_overrides: list[str], grid: list[str], out: str | None = None, overwrite: bool = False
) -> SweepPlan:
    """Validate every point (nothing is loaded); finished points carry their result."""
    from llmreg.recipe import load_recipe
    from llmreg.recipe.schema import StagedRecipe

    axes = parse_grid(grid)
    base = load_recipe(recipe_path, base_overrides)
    if isinstance(base, StagedRecipe):
        raise ConfigError(f"sweep: {recipe_path} has stages; sweep a recipe without stages")
    out = os.path.abspath(os.path.expanduser(out or os.path.join(base.output_dir, "sweep")))
    plan = SweepPlan(recipe_path, list(base_overrides), axes, out)
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
        if recipe.data.pretrain is None:
            raise ConfigError(
                f"sweep: {recipe_path} has no data.pretrain section; the sweep ranks runs by their "
                "final validation loss, which pretrain recipes write (final_eval.json)"
            )
        if recipe.data.pretrain.validation_fraction <= 0 and recipe.data.eval is None:
            raise ConfigError(
                "sweep: the recipe has no validation data (data.eval or data.pretrain.validation_fraction > 0)"
            )
        point = Point(index=index, values=values, name=name, run_dir=run_dir, recipe=recipe)
        if not overwrite:
            _check_same_recipe(point)
            point.result = read_final_eval(run_dir)
        plan.points.append(point)
    return plan


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


def run_sweep(plan: SweepPlan, overwrite: bool = False, say=print, train_fn=None) -> dict:
    """Train every unfinished point in order; returns (and writes) the summary. `train_fn(recipe, overwrite)`
    replaces `llmreg.recipe.run.train` (tests)."""
    from llmreg.recipe.run import checkpoints_in

    if train_fn is None:
        from llmreg.recipe.run import train as train_fn
    os.makedirs(plan.out, exist_ok=True)
    todo = [p for p in plan.points if overwrite or p.result is None]
    say(
        f"sweep {plan.recipe_path}: {len(plan.points)} points, {len(plan.points) - len(todo)} finished, "
        f"{len(todo)} to run; outputs in {plan.out}"
    )
    write_summary(plan)
    for n, point in enumerate(todo):
        recipe = point.recipe
        fresh = overwrite or not checkpoints_in(point.run_dir)
        recipe.resume = not fresh
        say(f"[{n + 1}/{len(todo)}] {point.name}" + ("" if fresh else " (resuming)"))
        train_fn(recipe, overwrite=fresh)
        point.result = read_final_eval(point.run_dir)
        if point.result is None:
            raise RuntimeError(f"{point.run_dir}: training finished without final_eval.json")
        say(f"    {METRIC} {point.result[METRIC]:.4f}")
        write_summary(plan)
        gc.collect()
    summary = write_summary(plan)
    say(summary["table"])
    return summary


# -- summary and certificate -------------------------------------------------------------------------


def axis_order(values: list[Any]) -> list[int]:
    """Indices of `values` in grid order: numeric values sorted, others as given."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sorted(range(len(values)), key=lambda i: values[i])
    return list(range(len(values)))


def certificate(
    axes: list[tuple[str, list[Any]]], losses: dict[tuple[int, ...], float | None], point: tuple[int, ...]
) -> dict:
    """The paper's check of one point: every +-1 neighbour along each axis (in sorted value order) that
    exists on the grid must have a loss >= the point's. Missing (unrun) neighbours make it unproven."""
    own = losses.get(point)
    checks, edges = [], []
    for a, (key, values) in enumerate(axes):
        order = axis_order(values)
        pos = order.index(point[a])
        for step in (-1, 1):
            if not 0 <= pos + step < len(order):
                edges.append({"axis": key, "side": "low" if step < 0 else "high"})
                continue
            nb = list(point)
            nb[a] = order[pos + step]
            loss = losses.get(tuple(nb))
            status = "missing" if loss is None else ("ok" if own is not None and loss >= own else "better")
            checks.append({"axis": key, "value": values[nb[a]], "loss": loss, "status": status})
    return {
        "certified": own is not None and all(c["status"] == "ok" for c in checks),
        "neighbours": checks,
        "edges": edges,
    }


def summarize(axes: list[tuple[str, list[Any]]], losses: dict[tuple[int, ...], float | None]) -> dict:
    """Best point, its certificate, and every point that passes the check (local minima)."""
    done = {p: v for p, v in losses.items() if v is not None and math.isfinite(v)}
    if not done:
        return {"best": None, "certificate": None, "local_minima": []}
    best = min(done, key=done.get)
    minima = [p for p in done if certificate(axes, losses, p)["certified"]]
    return {"best": best, "certificate": certificate(axes, losses, best), "local_minima": minima}


def _cell(loss: float | None, is_best: bool) -> str:
    if loss is None:
        return "–"
    return f"**{loss:.4f}**" if is_best else f"{loss:.4f}"


def format_table(
    axes: list[tuple[str, list[Any]]], losses: dict[tuple[int, ...], float | None], best: tuple[int, ...] | None
) -> str:
    """Markdown: a matrix for two axes (rows: the first axis), else one row per point; best in bold."""
    if len(axes) == 2:
        (k0, v0), (k1, v1) = axes
        o0, o1 = axis_order(v0), axis_order(v1)
        lines = [f"| {k0} \\ {k1} | " + " | ".join(str(v1[j]) for j in o1) + " |", "|---|" + "---|" * len(o1)]
        for i in o0:
            lines.append(f"| {v0[i]} | " + " | ".join(_cell(losses.get((i, j)), best == (i, j)) for j in o1) + " |")
        return "\n".join(lines)
    lines = ["| " + " | ".join(k for k, _ in axes) + f" | {METRIC} |", "|" + "---|" * (len(axes) + 1)]
    for index in itertools.product(*(axis_order(vals) for _, vals in axes)):
        lines.append(
            "| "
            + " | ".join(str(axes[a][1][i]) for a, i in enumerate(index))
            + " | "
            + _cell(losses.get(index), best == index)
            + " |"
        )
    return "\n".join(lines)


def write_summary(plan: SweepPlan) -> dict:
    """The summary dict; the files are written by the main process only (a sweep under torchrun runs on all)."""
    from llmreg.recipe.run import is_main_process

    losses = {p.index: (p.result or {}).get(METRIC) for p in plan.points}
    info = summarize(plan.axes, losses)
    best = info["best"]
    table = format_table(plan.axes, losses, best)
    by_index = {p.index: p for p in plan.points}
    summary = {
        "recipe": os.path.abspath(plan.recipe_path),
        "overrides": plan.base_overrides,
        "axes": [{"key": k, "values": v} for k, v in plan.axes],
        "metric": METRIC,
        "points": [
            {"name": p.name, "values": p.values, "run_dir": p.run_dir, METRIC: (p.result or {}).get(METRIC)}
            for p in plan.points
        ],
        "best": None
        if best is None
        else {"name": by_index[best].name, "values": by_index[best].values, METRIC: losses[best]},
        "certificate": info["certificate"],
        "local_minima": [by_index[p].name for p in info["local_minima"]],
        "table": table,
    }
    if is_main_process():
        with open(os.path.join(plan.out, SWEEP_JSON), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(plan.out, SWEEP_MD), "w") as f:
            f.write(markdown_report(summary))
    return summary


def markdown_report(summary: dict) -> str:
    lines = [
        f"# Sweep of {os.path.basename(summary['recipe'])}",
        "",
        f"Final validation loss ({summary['metric']}); best in bold.",
        "",
        summary["table"],
        "",
    ]
    best, cert = summary["best"], summary["certificate"]
    if best is None:
        lines.append("No finished point yet.")
    else:
        lines.append(
            f"Best: {best['name']} ({best[summary['metric']]:.4f}); neighbour check: "
            + ("passed" if cert["certified"] else "NOT passed")
            + "".join(f"; {c['axis']}={c['value']} {c['status']}" for c in cert["neighbours"] if c["status"] != "ok")
        )
        if cert["edges"]:
            lines.append(
                "At the grid's edge on: "
                + ", ".join(f"{e['axis']} ({e['side']})" for e in cert["edges"])
                + " (extend the grid there to be sure it is a minimum)."
            )
        lines.append("Points passing the neighbour check: " + ", ".join(summary["local_minima"]))
    return "\n".join(lines) + "\n"
