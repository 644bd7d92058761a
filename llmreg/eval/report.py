"""The files of a forgetting report: forgetting_report.json and .md, deltas.png and pareto.png.

`llmreg.eval.run.forgetting_report` computes the numbers; this module writes them. The report says where every
number came from (`provenance`: the suite, the base's and each run's model path, the document limit, the llmreg
and lm-eval versions), so a report found later can be traced to the models it compared.

deltas.png: one panel per task, a horizontal bar per model (the base in gray first, then each run) at its score
in the metric's own units, labelled with the value and its change from the base: the ratio for perplexity-type
metrics (lower is better, drawn on a log axis, where a 4e8 base and a 37 retained perplexity are both visible),
the difference for the others. pareto.png: target gain against forgetting, one marker per run (a legend, not
labels on the points, so close points neither overlap nor get clipped), the Pareto-optimal runs ringed and joined.
Both draw the paired standard errors of the report (llmreg.eval.run, "Error bars") as error bars: in deltas.png
around each run's score (the SE of its difference from the base; labelled `±SE`), in pareto.png on both
coordinates (target_gain_se, forgetting_se). A run without an SE has no bar.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MARKERS = "osD^v<>Pph*X"


def provenance(suite_path: str, base: str, paths: dict[str, str], limit: int | None) -> dict[str, Any]:
    """What the report records about its inputs: `paths` maps each run's name to its model path."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    def _where(path: str) -> str:
        return os.path.abspath(path) if os.path.exists(path) else path  # a hub name stays a name

    return {
        "suite_path": _where(suite_path),
        "base_path": _where(base),
        "run_paths": {name: _where(path) for name, path in paths.items()},
        "limit": limit,
        "versions": {"llmreg": _version("llmreg"), "lm_eval": _version("lm_eval")},
    }


def _fmt(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def _provenance_lines(report: dict) -> list[str]:
    if "base_path" not in report:
        return []
    versions = ", ".join(f"{k} {v or 'unknown'}" for k, v in report.get("versions", {}).items())
    lines = [
        f"Suite: `{report.get('suite_path', report['suite'])}`; documents per task: "
        f"{report.get('limit') or 'as the suite says'}; {versions}.",
        "",
        "| model | path |",
        "|---|---|",
        f"| base | `{report['base_path']}` |",
    ]
    lines += [f"| {name} | `{path}` |" for name, path in report.get("run_paths", {}).items()]
    return lines + [""]


def _pm(value: Any, se: Any) -> str:
    """`+0.0123 ± 0.0045`; `± n/a` when there is no paired SE (no per-document scores)."""
    if value is None:
        return "n/a"
    return f"{value:+.4g} ± {'n/a' if se is None else f'{se:.2g}'}"


def _task_lines(run: dict) -> list[str]:
    lines = [
        "| task | role | metric | base | tuned | delta ± SE | gain | documents paired |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, t in run["tasks"].items():
        lines.append(
            f"| {task} | {t['role']} | {t['metric']}{' (lower is better)' if t['lower_is_better'] else ''}"
            f" | {_fmt(t['base'])} | {_fmt(t['tuned'])} | {_pm(t['delta'], t.get('se'))} | {_fmt(t['gain'])}"
            f" | {t.get('n_paired') or 'n/a'} |"
        )
        gold = t.get("gold_loglik")
        if gold:  # issue 18: a continuous score, outside the run's means
            lines.append(
                f"| {task} | {t['role']} | gold_loglik (not in the means)"
                f" | {_fmt(gold['base'])} | {_fmt(gold['tuned'])} | {_pm(gold['delta'], gold['se'])}"
                f" | {_fmt(gold['gain'])} | {gold['n_paired']} |"
            )
        for key, also in t.get("also", {}).items():  # lm-eval's accuracy beside a gold_prob score
            lines.append(
                f"| {task} | {t['role']} | {key} (not in the means)"
                f" | {_fmt(also['base'])} | {_fmt(also['tuned'])} | {_pm(also['delta'], also['se'])}"
                f" | {_fmt(also['gain'])} | {also['n_paired']} |"
            )
    return lines


_GOLD_NOTE = [
    "gold_loglik rows: mean log-likelihood of the gold choice of a multiple-choice task (nats, higher is better), "
    "a continuous score whose paired difference is far less noisy than accuracy's.",
    "",
]
_GOLD_PROB_NOTE = [
    "gold_prob: the probability the model gives the gold answer (multiple choice: its share of the choices' "
    "probabilities; loglikelihood tasks: the target's probability), higher is better, a continuous accuracy; "
    "the task's accuracy follows it on a row of its own, outside the means.",
    "",
]


def write_markdown(report: dict, path: str) -> None:
    lines = [
        f"# Forgetting report: {os.path.basename(report['suite'])}",
        "",
        *_provenance_lines(report),
        f"Sign convention: {report['sign_convention']}",
        "",
        *([f"Error bars: {report['error_bars']}", ""] if report.get("error_bars") else []),
        *(_GOLD_NOTE if any("gold_loglik" in t for r in report["runs"].values() for t in r["tasks"].values()) else []),
        *(_GOLD_PROB_NOTE if "gold_prob" in report.get("metrics", {}).values() else []),
        "| run | target gain ± SE | forgetting ± SE | gain per point of forgetting | Pareto |",
        "|---|---|---|---|---|",
    ]
    for name, run in report["runs"].items():
        lines.append(
            f"| {name} | {_pm(run['target_gain'], run.get('target_gain_se'))} | "
            f"{_pm(run['forgetting'], run.get('forgetting_se'))} | "
            f"{_fmt(run['gain_per_forgetting'])} | {'yes' if name in report['pareto_front'] else ''} |"
        )
    for name, run in report["runs"].items():
        lines += ["", f"## {name}", "", *_task_lines(run)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def change_text(base: float, tuned: float, lower_is_better: bool) -> str:
    """A bar's label: `1836 (x4.5e-06)` for a perplexity-type metric, `0.85 (+0.84)` for the others."""
    if lower_is_better:
        ratio = f"x{tuned / base:.3g}" if base else "n/a"
        return f"{tuned:.4g} ({ratio})"
    return f"{tuned:.3g} ({tuned - base:+.3g})"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on clusters or CI
    import matplotlib.pyplot as plt

    return plt


def _task_panel(ax, task: str, report: dict, colors: list) -> None:
    runs = report["runs"]
    first = next(iter(runs.values()))["tasks"][task]
    lower, metric = first["lower_is_better"], first["metric"].split(",")[0] or "score"
    names = ["base", *runs]
    values = [first["base"], *(run["tasks"][task]["tuned"] for run in runs.values())]
    y = list(range(len(names)))[::-1]  # the base on top
    ax.barh(y, values, color=["0.6", *colors[: len(runs)]], height=0.7)
    # the paired SE of each run's difference from the base, drawn around the run's score (none on the base);
    # clipped at 0 on a log axis
    ses = [run["tasks"][task].get("se") for run in runs.values()]
    low = [min(se or 0.0, v * 0.999) if lower and v > 0 else se or 0.0 for se, v in zip(ses, values[1:])]
    if any(se for se in ses):
        ax.errorbar(values[1:], y[1:], xerr=[low, [se or 0.0 for se in ses]], fmt="none", ecolor="black", capsize=3)
    ax.set_yticks(y, names)
    if lower and min(values) > 0:
        ax.set_xscale("log")
    labels = [f"{values[0]:.4g} (base)"] + [
        change_text(values[0], v, lower) + ("" if se is None else f" ±{se:.2g}") for v, se in zip(values[1:], ses)
    ]
    for yy, value, label, se in zip(y, values, labels, [0.0, *ses]):
        ax.annotate(
            label, (value + (se or 0.0), yy), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8
        )
    reach = [v + (se or 0.0) for v, se in zip(values, [0.0, *ses])]  # bar ends with their error bars
    if lower:
        ax.set_xlim(min(values) / 4, max(reach) * 30)  # the smallest bar still shows; room for the labels
    else:
        lows = [v - (se or 0.0) for v, se in zip(values, [0.0, *ses])]
        ax.set_xlim(min(0, min(lows)), max(max(reach), 1e-9) * 1.6)
    ax.set_title(f"{task} ({first['role']})", fontsize=10)
    ax.set_xlabel(f"{metric}, {'lower is better; log scale' if lower else 'higher is better'}", fontsize=9)


def write_plots(report: dict, out_dir: str) -> list[str]:
    """deltas.png (per task: base and tuned scores, change labelled) and pareto.png (gain vs forgetting)."""
    plt = _pyplot()
    runs = report["runs"]
    tasks = list(next(iter(runs.values()))["tasks"]) if runs else []
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
    cols = 1 if len(tasks) < 2 else 2
    rows = max(1, -(-len(tasks) // cols))
    height = 0.32 * (len(runs) + 1) + 1.3
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, height * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        _task_panel(ax, task, report, colors)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    suite = os.path.basename(report["suite"])
    fig.suptitle(
        f"{suite}: base vs fine-tuned score per task (labels: score, then x ratio to the base for perplexities, "
        "+/- difference otherwise; bars: paired SE of the difference)",
        fontsize=10,
    )
    fig.tight_layout()
    deltas = os.path.join(out_dir, "deltas.png")
    fig.savefig(deltas, dpi=110), plt.close(fig)
    return [deltas, _pareto_plot(report, out_dir, colors)]


def _units(report: dict, role: str) -> str:
    tasks = next(iter(report["runs"].values()))["tasks"].values() if report["runs"] else []
    metrics = sorted({t["metric"].split(",")[0] for t in tasks if (t["role"] == "target") == (role == "target")})
    return ", ".join(metrics) or "metric units"


def _pareto_plot(report: dict, out_dir: str, colors: list) -> str:
    plt = _pyplot()
    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, run) in enumerate(runs.items()):
        point = (run["forgetting"] or 0.0, run["target_gain"] or 0.0)
        ax.errorbar(  # paired SEs of both coordinates (absent ones: no bar)
            *point,
            xerr=run.get("forgetting_se") or None,
            yerr=run.get("target_gain_se") or None,
            color=colors[i],
            marker=MARKERS[i % len(MARKERS)],
            ms=7,
            capsize=3,
            label=name,
            zorder=3,
        )
    front = sorted((runs[n]["forgetting"] or 0.0, runs[n]["target_gain"] or 0.0) for n in report["pareto_front"])
    if front:  # rings on the front's points: a visible legend entry even for a single point
        ax.plot(*zip(*front), "--o", color="gray", mfc="none", ms=13, zorder=2, label="Pareto front")
    ax.ticklabel_format(useOffset=False, style="plain")  # 404261200, not "1e8" and "+4.0426e8" beside the axis
    ax.margins(0.15)
    ax.set_xlabel(f"forgetting: mean drop on retained tasks ({_units(report, 'retain')}; > 0 = lost)")
    ax.set_ylabel(f"target gain ({_units(report, 'target')}; > 0 = better)")
    ax.set_title(
        f"{os.path.basename(report['suite'])}: gain on the target vs forgetting (up and left is better; "
        "bars: paired SE)",
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    pareto = os.path.join(out_dir, "pareto.png")
    fig.savefig(pareto, dpi=110, bbox_inches="tight"), plt.close(fig)
    return pareto


def write_report(report: dict, out_dir: str) -> list[str]:
    """forgetting_report.json, forgetting_report.md and the two plots in `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "forgetting_report.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    md_path = os.path.join(out_dir, "forgetting_report.md")
    write_markdown(report, md_path)
    return [json_path, md_path, *write_plots(report, out_dir)]


def replace_marked_section(path: str | os.PathLike, section: str, begin: str, end: str) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) in place of the text between those markers
    in the Markdown file `path`; appended when the markers are missing, the file created when it is."""
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
