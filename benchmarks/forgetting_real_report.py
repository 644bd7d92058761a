"""Outputs of benchmarks/forgetting_real.py: the json, the Pareto figure with error bars, the RESULTS.md section.

Per run (llmreg.eval.run.forgetting_report's sign convention): `target_gain` > 0 is better on the target (for
smollm2: base - tuned bits per byte of the GSM8K reference answers), `forgetting` > 0 is the weighted mean
retained drop (smollm2: the gold_prob drop, probability points, of ARC-Easy, PIQA, HellaSwag and LAMBADA;
TinyStories perplexity has weight 0 and is shown per task; each benchmark's accuracy is shown beside it).
Error bars: the paired SE of each difference from the per-document scores that `llmreg eval` keeps
(llmreg.eval.paired; none when the evaluation has no per-document scores). Wall times are those of the run,
on whatever load the machine had (the load average is recorded with each run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- forgetting_real:begin -->", "<!-- forgetting_real:end -->"


def has_per_doc(record: dict | None) -> bool:
    return bool(record and record.get("per_doc"))


def _suite_and_scores(state: dict[str, Any]):
    """The suite and the runs that can be paired: evaluated, with per-document scores (so is the base)."""
    from forgetting_real_matrix import REPO

    from llmreg.eval.run import Scores
    from llmreg.eval.suite import load_suite

    def scores(ev: dict) -> Scores:
        return Scores(ev["scores"], ev["metrics"], ev.get("per_doc"))

    paired = has_per_doc(state["base_eval"])
    evaluated = {n: scores(r["eval"]) for n, r in state["runs"].items() if paired and has_per_doc(r.get("eval"))}
    return load_suite(str(REPO / state["suite"])), evaluated


def paired_summary(state: dict[str, Any]) -> dict[str, Any]:
    """llmreg.eval.run.forgetting_report over the evaluated runs, with their per-document scores: paired SEs of
    every task's difference, of the target gain and of the mean retained drop, and of the accuracy beside each
    gold_prob task (and, for multiple-choice tasks, of the gold-choice log-likelihood, kept in the json). A run
    whose per-document scores are gone (`report_entry`, forgetting_real.restore) keeps its committed entry."""
    from llmreg.eval.run import Scores, forgetting_report, pareto_front

    base = state["base_eval"]
    suite, evaluated = _suite_and_scores(state)
    kept = {n: r["eval"]["report_entry"] for n, r in state["runs"].items() if (r.get("eval") or {}).get("report_entry")}
    if base is None or not (evaluated or kept):
        return {}
    report = forgetting_report(Scores(base["scores"], base["metrics"], base.get("per_doc")), evaluated, suite)
    report["runs"] = {n: report["runs"].get(n) or kept[n] for n in state["runs"] if n in report["runs"] or n in kept}
    points = {n: (r["forgetting"] or 0.0, r["target_gain"] or 0.0) for n, r in report["runs"].items()}
    report["pareto_front"] = pareto_front(points)
    return report


NOISE_SE = 2.0  # a difference between two runs counts as beyond noise above 2 paired SE


def head_to_head(suite, evaluated: dict, a: str, b: str) -> dict[str, Any]:
    """Run `a` against run `b` as its base: target_gain > 0 when a learned the target better than b,
    forgetting > 0 when a kept less than b; paired over the same documents (the two runs' per-document scores),
    so the shared document difficulty cancels and the SEs are those of the difference between the runs."""
    from llmreg.eval.run import forgetting_report

    return forgetting_report(evaluated[b], {a: evaluated[a]}, suite)["runs"][a]


def _beyond(value: float | None, se: float | None) -> bool:
    return value is not None and se is not None and value > NOISE_SE * se


def axes(h: dict[str, Any], suite) -> list[tuple[float, float | None]]:
    """(gain, SE) of a run against another on each axis: the target gain, the retention (minus the mean retained
    drop) and each weight-0 retained task (smollm2: held-out text perplexity, kept out of the mean: other units)."""
    retention = None if h["forgetting"] is None else -h["forgetting"]
    out = [(h["target_gain"], h["target_gain_se"]), (retention, h["forgetting_se"])]
    out += [(h["tasks"][t]["gain"], h["tasks"][t].get("se")) for t in side_tasks(suite) if t in h["tasks"]]
    return out


def side_tasks(suite) -> list[str]:
    """The weight-0 retained tasks: reported and judged as axes of their own, outside the mean retained drop."""
    return [e.task for e in suite.retain if e.weight == 0]


def dominates(h: dict[str, Any], suite, seed_var: list[float] | None = None) -> bool:
    """From head_to_head(a, b): a is better than b beyond noise on one axis (`axes`) and not worse beyond noise
    on any (an axis without an SE counts as no difference). With `seed_var` (per axis, `seed_variance`) the noise
    is the paired SE and the training noise of two single-seed runs together."""
    gains = axes(h, suite)
    if any(g is None for g, _ in gains):  # an axis without a score (no weighted retained task): undecided
        return False
    if seed_var is not None:
        gains = [(g, None if se is None else (se * se + v) ** 0.5) for (g, se), v in zip(gains, seed_var)]
    # "no worse" within noise: a difference under 2 SE is no difference (and two runs cannot dominate each other)
    return any(_beyond(g, se) for g, se in gains) and not any(_beyond(-g, se) for g, se in gains)


def seed_variance(suite, evaluated: dict, groups: dict[tuple, list[str]]) -> list[float] | None:
    """Per axis, the variance training noise adds to the difference between two single-seed runs, from the seed
    pairs (`seed_groups`): the second seed minus the first has E[d^2] = 2 sigma_train^2 + paired SE^2, so
    d^2 - SE^2 (pooled over the pairs, floored at 0) estimates it; None without a seed pair. One pair is one
    degree of freedom: a rough figure, and it assumes every method has vanilla's training noise."""
    pairs = [axes(head_to_head(suite, evaluated, names[1], names[0]), suite) for names in groups.values()]
    if not pairs:
        return None
    out = []
    for axis in zip(*pairs):
        known = [(g, se or 0.0) for g, se in axis if g is not None]
        out.append(max(0.0, sum(g * g - se * se for g, se in known) / len(known)) if known else 0.0)
    return out


def verdicts(
    suite, evaluated: dict, seed_var: list[float] | None = None, reference: str = "vanilla"
) -> dict[str, dict[str, Any]]:
    """Per evaluated run: its difference from the `reference` run (paired SEs) and the runs that dominate it beyond
    noise (`dominates`), by the paired SE alone and, with `seed_var`, by the paired SE and the seed spread; a run
    no other dominates is on the front beyond noise."""
    out = {}
    for a in evaluated:
        vs_vanilla = head_to_head(suite, evaluated, a, reference) if a != reference and reference in evaluated else None
        against = {b: head_to_head(suite, evaluated, b, a) for b in evaluated if b != a}
        out[a] = {
            "vs_vanilla": vs_vanilla,
            "dominated_by": [b for b, h in against.items() if dominates(h, suite)],
            "dominated_by_with_seeds": None
            if seed_var is None
            else [b for b, h in against.items() if dominates(h, suite, seed_var)],
        }
    return out


def verdict_table(suite, found: dict[str, dict[str, Any]], reference: str = "vanilla") -> list[str]:
    extra = side_tasks(suite)
    vs = f"vs {reference}"
    lines = [
        f"| run | target gain {vs} | retained drop {vs} | "
        + "".join(f"{_short(t)} gain {vs} | " for t in extra)
        + "beyond noise (2 paired SE) | beyond noise (2 x paired SE with seed spread) |",
        "|---|---|---|" + "---|" * len(extra) + "---|---|",
    ]
    for name, v in found.items():
        h = v["vs_vanilla"]
        if h is None:
            cells = ["(reference)"] * (2 + len(extra))
        else:
            cells = [_pm(h["target_gain"], h["target_gain_se"]), _pm(h["forgetting"], h["forgetting_se"])]
            cells += [_pm(h["tasks"][t]["gain"], h["tasks"][t].get("se")) for t in extra]
        fronts = [_front(v["dominated_by"]), _front(v["dominated_by_with_seeds"])]
        lines.append(f"| {name} | {' | '.join(cells + fronts)} |")
    return lines


def _front(by: list[str] | None) -> str:
    if by is None:
        return "n/a (no seed pair)"
    return "on the front" if not by else "dominated by " + ", ".join(by)


def run_seed(state: dict[str, Any], name: str) -> int:
    """A run's seed; a merge's is the seed of the run it merges."""
    cfg = state["runs"][name]["train"]["config"]
    return run_seed(state, cfg["merge"]["of"]) if "merge" in cfg else cfg["seed"]


def seed_groups(
    state: dict[str, Any], evaluated: dict, merges: bool = False, regimes: bool = False
) -> dict[tuple, list[str]]:
    """(method, strength) -> its evaluated runs, seed order (`run_seed`), where there are two seeds or more.
    Merges are left out unless `merges`: a merge pair repeats the noise of the pair it merges, so it is shown
    (`seed_table`) but not pooled (`seed_variance`). So are runs in another `regime` than the recipe's (a run's
    optional "regime" label, e.g. a far higher rate) unless `regimes`: their seed noise is another level."""
    runs = state["runs"]
    groups: dict[tuple, list[str]] = {}
    for name in evaluated:
        cfg = runs[name]["train"]["config"]
        if (merges or "merge" not in cfg) and (regimes or "regime" not in cfg):
            groups.setdefault((cfg["method"], cfg["strength"]), []).append(name)
    return {k: sorted(v, key=lambda n: run_seed(state, n)) for k, v in groups.items() if len(v) > 1}


def seed_table(state: dict[str, Any], suite, evaluated: dict, report: dict[str, Any]) -> list[str]:
    """Seed spread beside the paired SE: each seed's gains against the base, and the second seed against the
    first paired over the same documents (a difference beyond its SE is run-to-run variation the paired SE of a
    single run does not show)."""
    groups = seed_groups(state, evaluated, merges=True, regimes=True)
    if not groups:
        return []
    extra = side_tasks(suite)
    lines = [
        "| method (strength) | runs | target gain per seed | mean retained drop per seed | "
        + "".join(f"{_short(t)} gain per seed | " for t in extra)
        + "second seed - first (target / retention / "
        + " / ".join(_short(t) for t in extra)
        + ") |",
        "|---|---|---|---|" + "---|" * len(extra) + "---|",
    ]
    for (method, strength), names in groups.items():
        per = [report["runs"][n] for n in names]
        cells = [
            ", ".join(_pm(r["target_gain"], r.get("target_gain_se")) for r in per),
            ", ".join(_pm(r["forgetting"], r.get("forgetting_se")) for r in per),
        ]
        cells += [", ".join(_pm(r["tasks"][t]["gain"], r["tasks"][t].get("se")) for r in per) for t in extra]
        h = head_to_head(suite, evaluated, names[1], names[0])
        cells.append(" / ".join(_pm(g, se) for g, se in axes(h, suite)))
        label = method if strength is None else f"{method} ({strength:g})"
        lines.append(f"| {label} | {', '.join(names)} | {' | '.join(cells)} |")
    return lines


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _pm(value: Any, se: Any) -> str:
    return _num(value) if se is None else f"{_num(value)} ± {_num(se, 2)}"


def _short(task: str) -> str:
    return task.removesuffix("_local")


def table(state: dict[str, Any], report: dict[str, Any], names: list[str]) -> list[str]:
    """One row per run: target gain and mean retained drop with paired SEs, each task's delta (its suite metric),
    and, beside a gold_prob task, the accuracy delta lm-eval reports (`also`: outside the means)."""
    lines = [
        "| run | method | seed | target gain | mean retained drop | per-task delta (tuned - base) | "
        "accuracy delta (not in the means) | train s | eval s | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rec = state["runs"][name]
        run = report.get("runs", {}).get(name, {})
        tasks = dict(sorted(run.get("tasks", {}).items()))  # one order for fresh and committed (sorted) entries
        deltas = ", ".join(f"{_short(t)}: {_pm(v.get('delta'), v.get('se'))}" for t, v in tasks.items())
        accuracy = ", ".join(
            f"{_short(t)}: {_pm(a['delta'], a['se'])}" for t, v in tasks.items() for a in v.get("also", {}).values()
        )
        cfg = rec["train"]["config"]
        lines.append(
            f"| {name} | {cfg['method']} | {cfg['seed']} | {_pm(run.get('target_gain'), run.get('target_gain_se'))} "
            f"| {_pm(run.get('forgetting'), run.get('forgetting_se'))} | {deltas or 'not evaluated'} "
            f"| {accuracy or 'n/a'} "
            f"| {rec['train']['train_seconds'] + rec['train'].get('prepare_seconds', 0):.0f} "
            f"| {_num((rec.get('eval') or {}).get('eval_seconds'))} | {rec['train'].get('load_1min', 0):.1f} |"
        )
    return lines


def of_regime(state: dict[str, Any], runs: dict, regime: str | None) -> dict:
    """The runs whose config's "regime" label is `regime` (None: the recipe's own regime, no label)."""
    return {n: r for n, r in runs.items() if state["runs"][n]["train"]["config"].get("regime") == regime}


def regimes(state: dict[str, Any]) -> list[str]:
    """The labelled regimes among the runs done, sorted."""
    return sorted({r["train"]["config"]["regime"] for r in state["runs"].values() if "regime" in r["train"]["config"]})


def figure(state: dict[str, Any], report: dict[str, Any], path: Path, names: list[str], title: str) -> Path | None:
    """Target gain against mean retained drop, one colour per method, paired-SE error bars; one more panel per
    weight-0 retained task (smollm2: held-out text perplexity) with its drop on the x axis. One section's runs
    (`blocks`): a far higher rate's losses would squeeze the recipe's points into a corner."""
    runs = {n: r for n, r in report.get("runs", {}).items() if n in names}
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite, _ = _suite_and_scores(state)
    extra = side_tasks(suite)
    fig, panels = plt.subplots(1, 1 + len(extra), figsize=(7 * (1 + len(extra)), 5), squeeze=False)
    methods = sorted({state["runs"][n]["train"]["config"]["method"] for n in runs})
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    xs = [("mean retained drop", lambda r: (r["forgetting"], r.get("forgetting_se")))]
    for t in extra:
        xs.append(
            (
                f"{_short(t)}: loss against the base (+ = worse)",
                lambda r, t=t: (-r["tasks"][t]["gain"], r["tasks"][t].get("se")),
            )
        )
    for ax, (label, x_of) in zip(panels[0], xs):
        for name, run in runs.items():
            method = state["runs"][name]["train"]["config"]["method"]
            x, xerr = x_of(run)
            ax.errorbar(
                x, run["target_gain"], xerr=xerr, yerr=run.get("target_gain_se"),
                fmt="o", color=colours[method], capsize=3, label=method,
            )  # fmt: skip
            ax.annotate(name, (x, run["target_gain"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for method, points in curves(state, runs, x_of).items():  # each method's strength sweep as a line
            ax.plot([x for x, _ in points], [y for _, y in points], "-", color=colours[method], lw=0.8, alpha=0.6)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        if ax is panels[0][-1]:  # one legend, outside the last panel: inside, it hid points
            ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_xlabel(f"{label}; lower is better")
        ax.set_ylabel("target gain (higher is better)")
        ax.axvline(0, color="grey", lw=0.5)
    fig.suptitle(f"forgetting_real: {state['setting']}" + (f" ({title})" if title else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def curves(state: dict[str, Any], runs: dict, x_of) -> dict[str, list[tuple[float, float]]]:
    """method -> its seed-0 points (x, target gain) in the order of their strength, for methods with two or more."""
    found: dict[str, list[tuple[float, float, float]]] = {}
    for name, run in runs.items():
        cfg = state["runs"][name]["train"]["config"]
        if run_seed(state, name) == 0 and cfg["strength"] is not None:
            found.setdefault(cfg["method"], []).append((cfg["strength"], x_of(run)[0], run["target_gain"]))
    return {m: [(x, y) for _, x, y in sorted(p)] for m, p in found.items() if len(p) > 1}


def blocks(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The sections of the report: the recipe's regime (runs without a "regime" label, against "vanilla"), then
    one per labelled regime: its runs, against the regime's reference run, with the setting's reference points of
    the recipe's regime beside them (forgetting_real_matrix.REGIME_REFERENCES; those that can be paired)."""
    runs = state["runs"]
    out = [{"regime": None, "names": list(of_regime(state, runs, None)), "reference": "vanilla"}]
    for regime in regimes(state):
        reference, also = state.get("regime_references", {}).get(regime, ("vanilla", []))
        pairable = [n for n in also if n in runs and has_per_doc(runs[n].get("eval"))]
        out.append({"regime": regime, "names": [*of_regime(state, runs, regime), *pairable], "reference": reference})
    return out


def markers(regime: str | None) -> tuple[str, str]:
    if regime is None:
        return BEGIN, END
    return f"<!-- forgetting_real:{regime}:begin -->", f"<!-- forgetting_real:{regime}:end -->"


# the line a section carries when some of its runs cannot be paired: such a section never replaces a complete one
INCOMPLETE = "Verdicts and seeds are over the runs with per-document scores only (a missing run may dominate one"
INCOMPLETE += " shown on the front); missing for: "


def section(state: dict[str, Any], report: dict[str, Any], block: dict[str, Any], figure_rel: str | None) -> str:
    base = state["base_eval"] or {}
    regime, names, reference = block["regime"], block["names"], block["reference"]
    begin, end = markers(regime)
    lines = [
        begin,
        f"### forgetting_real: {state['setting']} ({state['recipe']}, suite {state['suite']})"
        if regime is None
        else f"### forgetting_real: {state['setting']}, regime {regime} (against {reference})",
        "",
        "Written by `python benchmarks/forgetting_real.py --report`; one run is reproduced (from nothing, or from its",
        'cache) by `python benchmarks/forgetting_real.py --only "<run>"`. Base scores: '
        + ", ".join(f"{t} {_num(v)}" for t, v in (base.get("scores") or {}).items()),
        "",
        *table(state, report, names),
        "",
    ]
    suite, paired = _suite_and_scores(state)
    evaluated = {n: paired[n] for n in names if n in paired}
    missing = [n for n in names if state["runs"][n].get("eval") and n not in evaluated]
    if missing:
        lines += [INCOMPLETE + ", ".join(missing) + " (rerun them with --only).", ""]
    seed_var = seed_variance(suite, evaluated, seed_groups(state, evaluated, regimes=regime is not None))
    found = verdicts(suite, evaluated, seed_var, reference) if report and reference in evaluated else {}
    if found:
        spread = "n/a" if seed_var is None else " / ".join(_num(v**0.5, 2) for v in seed_var)
        lines += [
            f"Each run against {reference}, paired over the same documents (the two runs' per-document scores; "
            f"gains: positive = better than {reference}), and the runs that dominate it: better beyond 2 paired SE "
            "on one axis (target, mean retained drop, each weight-0 retained task), not worse beyond 2 SE on any. "
            "The last column adds the training noise the seed pairs show to each SE (`seed_variance`: the standard "
            f"deviation of a two-run difference from seeds alone, per axis: {spread}; from the seed pairs of this "
            "section, so rough).",
            "",
            *verdict_table(suite, found, reference),
            "",
        ]
    seeds = seed_table(state, suite, evaluated, report) if report else []
    if seeds:
        lines += [
            "Seeds: each seed's paired SE against the base, and the second seed against the first, paired over "
            "the same documents (gains: positive = the second seed better).",
            "",
            *seeds,
            "",
        ]
    if figure_rel:
        lines += [f"![forgetting_real {state['setting']}]({figure_rel})", ""]
    lines.append(end)
    return "\n".join(lines)


def replace_section(path: Path, text: str, regime: str | None = None) -> bool:
    """Put `text` between the regime's markers (appended when they are absent). A section written from runs that
    could not all be paired (INCOMPLETE) does not replace one that was complete (its verdicts would be lost);
    returns False when it was refused so."""
    begin, end = markers(regime)
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        current = rest.split(end, 1)[0]
        if INCOMPLETE in text and INCOMPLETE not in current:
            return False
        new = head + text + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text + "\n"
    path.write_text(new)
    return True


def _committed(record: dict | None) -> dict | None:
    """A record as committed: the per-document scores go to the companion file, a kept report entry to the report."""
    return None if record is None else {k: v for k, v in record.items() if k not in ("per_doc", "report_entry")}


def write_outputs(state: dict[str, Any], out: Path) -> None:
    """The json (records and the report), its per-document companion (so that a new machine restores every
    evaluation: forgetting_real.restore), one figure and one RESULTS.md section per block (`blocks`)."""
    from forgetting_real_matrix import slug

    report = paired_summary(state)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "figures" / f"forgetting_real_{state['setting']}"
    sections = []
    for block in blocks(state):
        regime = block["regime"]
        path = stem.with_suffix(".png") if regime is None else stem.with_name(f"{stem.name}_{slug(regime)}.png")
        fig = figure(state, report, path, block["names"], regime or "")
        sections.append((block, os.path.relpath(fig, out) if fig else None))
    kept = {**state, "report": report}
    kept["base_eval"] = _committed(state["base_eval"])
    kept["runs"] = {n: {**r, "eval": _committed(r.get("eval"))} for n, r in state["runs"].items()}
    (out / f"forgetting_real_{state['setting']}.json").write_text(
        json.dumps(kept, indent=1, sort_keys=True, default=str)
    )
    rows = [("(base)", state.get("suite_key"), state["base_eval"])]
    rows += [(n, r.get("hash"), r.get("eval")) for n, r in state["runs"].items()]
    lines = [
        json.dumps({"run": n, "hash": h, "per_doc": ev["per_doc"]}, sort_keys=True)
        for n, h, ev in rows
        if has_per_doc(ev)
    ]
    (out / f"forgetting_real_{state['setting']}_per_doc.jsonl").write_text("".join(ln + "\n" for ln in lines))
    for block, fig_rel in sections:
        if not replace_section(out / "RESULTS.md", section(state, report, block, fig_rel), block["regime"]):
            print(
                f"kept the RESULTS.md section of {block['regime'] or 'the recipe regime'}: some of its runs have no"
                " per-document scores here (see its table); rerun them with --only to rewrite it"
            )
