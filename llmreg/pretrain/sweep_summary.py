"""The summary of `llmreg sweep` (llmreg.pretrain.sweep): the loss table, the best point and the neighbour
certificate of arXiv 2509.14786 (see llmreg.pretrain.sweep's docstring), written to `<out>/sweep.json` and
`<out>/sweep.md`."""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Any

SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
METRIC = "eval_loss"


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


def write_summary(plan) -> dict:
    """The summary dict of a SweepPlan; the files are written by the main process only (a sweep under torchrun
    runs on all)."""
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
