"""Run a suite with lm-eval and report what fine-tuning gained on the target tasks and lost on the retained ones.

Scores: one primary metric per task (the suite entry's `metric`, else the first of PRIMARY_METRICS that
lm-eval reports). Perplexity tasks (loglikelihood_rolling) use `word_perplexity`, where LOWER is better.
`metric: gold_prob` (multiple_choice / loglikelihood tasks) scores the probability given to the gold answer,
computed by llmreg.eval.per_doc from lm-eval's per-document loglikelihoods; the task's accuracy (`acc`: for
multiple choice the argmax of the same loglikelihoods, for LAMBADA-style tasks a greedy match) is reported beside
it (`also`), outside the run's means.

Sign convention: `gain` is always "better is positive": tuned - base for higher-is-better metrics,
base - tuned for lower-is-better ones (perplexities). `delta` is the raw tuned - base. A run's
`target_gain` is the weighted mean gain over target tasks; its `forgetting` is the weighted mean drop
(= -gain) over retained tasks, so forgetting > 0 means ability was lost. Units are the metrics' own.

Error bars: each delta's `se` is the paired standard error of tuned - base over the documents both models
scored (llmreg.eval.paired: sd of the per-document differences / sqrt(n), n - 1 denominator, for mean metrics;
sd of 1000 seeded paired bootstrap deltas for perplexity-type metrics); the run's target_gain_se and
forgetting_se combine the per-task SEs of the weighted mean assuming independent tasks. An SE is null when a
model's scores lack per-document values (an in-memory evaluation without samples, a metric lm-eval does not
average). Multiple-choice tasks also carry `gold_loglik` (mean log-likelihood of the gold choice, higher is
better) with its paired SE, outside the run's means.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from llmreg.eval.paired import combined_se, task_errors
from llmreg.eval.per_doc import GOLD_PROB, aggregate, gold_prob_record, task_per_doc
from llmreg.eval.report import replace_marked_section, write_markdown, write_plots, write_report
from llmreg.eval.suite import Suite, load_suite, write_local_tasks

PRIMARY_METRICS = ("word_perplexity", "exact_match", "acc_norm", "acc")
LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "token_perplexity", "perplexity", "bits_per_byte"}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "llmreg", "eval")


class Scores(dict):
    """{task: score}, with `.metrics` {task: lm-eval metric key, e.g. 'exact_match,strict-match'} and `.per_doc`
    {task: per-document record} (llmreg.eval.per_doc: the values behind the paired standard errors)."""

    def __init__(
        self,
        scores: dict[str, float] | None = None,
        metrics: dict[str, str] | None = None,
        per_doc: dict[str, dict] | None = None,
    ):
        super().__init__(scores or {})
        self.metrics = dict(metrics or {})
        self.per_doc = dict(per_doc or {})


def primary_metric(task_result: dict[str, Any], wanted: str | None = None) -> str:
    """The key of the metric to report from one lm-eval task result (keys look like 'acc,none')."""
    keys = [k for k in task_result if "," in k and "_stderr" not in k]
    names = [wanted] if wanted else list(PRIMARY_METRICS)
    for name in names:
        for key in keys:  # exact metric first, then any filter ('exact_match,strict-match' before flexible)
            if key.split(",")[0] == name or key == name:
                return key
    raise KeyError(f"no metric {' / '.join(names)} in lm-eval result; it has {', '.join(keys)}")


def lower_is_better(metric_key: str) -> bool:
    return metric_key.split(",")[0] in LOWER_IS_BETTER


def _load_model(model: Any, tokenizer: Any):
    """lm-eval's HFLM over an in-memory model (docs/architecture.md, trap 12); a path is loaded here so both
    cases match. A `DIR/NAME.gguf` path loads its de-quantised copy from the GGUF cache (llmreg.recipe.gguf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmreg.recipe.gguf import gguf_model_folder

    if isinstance(model, (str, os.PathLike)):
        model = gguf_model_folder(str(model))
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
        model = AutoModelForCausalLM.from_pretrained(str(model))
    elif tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    return model, tokenizer


def _groups(suite: Suite, limit: int | None) -> dict[tuple, list]:
    """Tasks sharing (limit, num_fewshot) run in one simple_evaluate call (its options are per call).
    An explicit `limit` caps every task (quick runs); else the entry's, else the suite's."""
    groups: dict[tuple, list] = {}
    for entry in suite.entries:
        task_limit = limit if limit is not None else (entry.limit if entry.limit is not None else suite.limit)
        shots = entry.num_fewshot if entry.num_fewshot is not None else suite.num_fewshot
        groups.setdefault((task_limit, shots), []).append(entry)
    return groups


def evaluate_suite(
    suite: Suite | str, model: Any, tokenizer: Any = None, limit: int | None = None, batch_size: int = 4
) -> Scores:
    """{task: primary score} for `model` (a path or an in-memory PreTrainedModel) on every suite task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    suite = load_suite(suite) if isinstance(suite, (str, os.PathLike)) else suite
    model, tokenizer = _load_model(model, tokenizer)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    scores = Scores()
    with tempfile.TemporaryDirectory(prefix="llmreg-tasks-") as include:
        write_local_tasks(suite, include)
        # local-only suites skip indexing lm-eval's thousands of built-in task YAMLs (seconds per call)
        only_local = all(e.task in suite.local_tasks for e in suite.entries)
        manager = TaskManager(include_path=include, include_defaults=not only_local)
        for (task_limit, shots), entries in _groups(suite, limit).items():
            out = simple_evaluate(
                model=lm,
                tasks=[e.task for e in entries],
                task_manager=manager,
                limit=task_limit,
                num_fewshot=shots,
                log_samples=True,  # per-document scores: the paired standard errors (llmreg.eval.per_doc)
                apply_chat_template=suite.apply_chat_template,
                bootstrap_iters=0,
            )
            for entry in entries:
                _score_task(scores, entry, out)
    return scores


def _score_task(scores: Scores, entry, out: dict) -> None:
    """One task's primary score, metric key and per-document record from a simple_evaluate output."""
    result = out["results"][entry.task]
    samples = out.get("samples", {}).get(entry.task, [])
    config = out.get("configs", {}).get(entry.task)
    if entry.metric == GOLD_PROB:  # computed from the per-document loglikelihoods (llmreg.eval.per_doc)
        # accuracy beside it (for multiple choice gold_prob is its smooth version); else lm-eval's primary
        lm_key = primary_metric(result, "acc") if any(k.startswith("acc,") for k in result) else primary_metric(result)
        record = gold_prob_record(samples, lm_key, float(result[lm_key]), config)
        if record is None:
            raise ValueError(f"{entry.task}: metric gold_prob needs a multiple_choice or loglikelihood task")
        scores[entry.task] = aggregate(GOLD_PROB, record["values"])  # the mean of the per-document probabilities
        scores.metrics[entry.task] = GOLD_PROB
        scores.per_doc[entry.task] = record
        return
    key = primary_metric(result, entry.metric)
    scores[entry.task] = float(result[key])
    scores.metrics[entry.task] = key
    scores.per_doc[entry.task] = task_per_doc(samples, key, scores[entry.task], config)


# --- score cache ---------------------------------------------------------------------------------------------
#
# One JSON file per (model, suite file and local task YAML content, limit) in ~/.cache/llmreg/eval (or --cache-dir):
#   {"format": 2, "model": path, "fingerprint": ..., "suite": suite path, "limit": N or null,
#    "scores": {task: score}, "metrics": {task: "acc,none"},
#    "per_doc": {task: {"metric": "acc,none", "values": {doc_id: value}, "gold_loglik": {doc_id: loglik}}}}
#    (a `gold_prob` task: {"metric": "gold_prob", "values": ..., "gold_loglik": ..., "also": {"acc,none": ...}})
# (per_doc: llmreg.eval.per_doc). An entry of an older format (no per_doc) is evaluated again and replaced.

CACHE_FORMAT = 2


def model_fingerprint(model_name: str) -> list | None:
    """What tells two versions of a local model apart without reading it: (name, size, mtime) of the files of
    a model folder (not its subfolders), or of a single file (a GGUF); None for a hub name. A model retrained
    into the same folder gets a new cache entry."""
    if os.path.isfile(model_name):
        stat = os.stat(model_name)
        return [[os.path.basename(model_name), stat.st_size, stat.st_mtime_ns]]
    if os.path.isdir(model_name):
        files = sorted((e for e in os.scandir(model_name) if e.is_file()), key=lambda e: e.name)
        return [[e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in files] if files else None
    return None


def cache_path(cache_dir: str | None, model_name: str, suite: Suite, limit: int | None) -> str:
    """Scores depend on the model (its path and files), the suite file's content, the local task YAMLs it runs
    (an edited prompt or metric) and the limit: all key the file."""
    where = os.path.abspath(model_name) if os.path.exists(model_name) else model_name
    tasks = sorted((task, text) for task, (text, _) in suite.local_tasks.items())
    key = json.dumps([where, model_fingerprint(model_name), suite.file_hash, tasks, limit, CACHE_FORMAT], default=str)
    name = hashlib.sha256(key.encode()).hexdigest()[:20] + ".json"
    return os.path.join(cache_dir or DEFAULT_CACHE, name)


def cache_entry(scores: dict, model_path: str, suite: Suite, limit: int | None) -> dict:
    """The JSON record of one model's scores (the format above; a plain dict has no metrics or per_doc)."""
    return {
        "format": CACHE_FORMAT,
        "model": model_path,
        "fingerprint": model_fingerprint(model_path),
        "suite": suite.path,
        "limit": limit,
        "scores": dict(scores),
        "metrics": getattr(scores, "metrics", {}),
        "per_doc": getattr(scores, "per_doc", {}),
    }


def read_cache_entry(path: str) -> Scores | None:
    """The Scores of a cache file; None when it is missing, unreadable or of an older format (no per_doc)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if data.get("format") != CACHE_FORMAT or "per_doc" not in data:
        return None
    return Scores(data["scores"], data["metrics"], data["per_doc"])


def cached_evaluate(
    suite: Suite, model_path: str, limit: int | None = None, cache_dir: str | None = None, **kw
) -> Scores:
    """evaluate_suite on a model path, reusing an earlier result for the same model files, suite and limit."""
    path = cache_path(cache_dir, model_path, suite, limit)
    cached = read_cache_entry(path)
    if cached is not None:
        return cached
    scores = evaluate_suite(suite, model_path, limit=limit, **kw)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:  # written whole, then renamed: a killed run leaves no half file
        json.dump(cache_entry(scores, model_path, suite, limit), f)
    os.replace(tmp, path)
    return scores


# --- report --------------------------------------------------------------------------------------------------


def _gain(base: float, tuned: float, metric: str) -> float:
    return base - tuned if lower_is_better(metric) else tuned - base


def _weighted_mean(pairs: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Runs not dominated in (low forgetting, high gain): no other run forgets no more and gains no less,
    with one of the two strictly better."""
    front = []
    for name, (f, g) in points.items():
        dominated = any(
            f2 <= f and g2 >= g and (f2 < f or g2 > g) for other, (f2, g2) in points.items() if other != name
        )
        if not dominated:
            front.append(name)
    return front


def _task_row(entry, metric: str, base_scores, scores, role: str) -> dict:
    base, tuned = base_scores[entry.task], scores[entry.task]
    row = {
        "role": role,
        "metric": metric,
        "lower_is_better": lower_is_better(metric),
        "base": base,
        "tuned": tuned,
        "delta": tuned - base,
        "gain": _gain(base, tuned, metric),
    }
    base_doc = getattr(base_scores, "per_doc", {}).get(entry.task)
    row.update(task_errors(metric, base_doc, getattr(scores, "per_doc", {}).get(entry.task)))
    if "gold_loglik" in row:  # higher is better; a row of its own, outside the run's means (other units)
        row["gold_loglik"]["gain"] = row["gold_loglik"]["delta"]
    for key, also in row.get("also", {}).items():  # lm-eval's accuracy beside a gold_prob score, outside the means
        also["gain"] = _gain(also["base"], also["tuned"], key)
    return row


def _run_report(base_scores, scores, suite: Suite, metrics: dict[str, str]) -> dict:
    tasks, target, retain = {}, [], []
    for entry in suite.entries:
        role = suite.role(entry.task)
        row = tasks[entry.task] = _task_row(
            entry, metrics.get(entry.task, entry.metric or ""), base_scores, scores, role
        )
        (target if role == "target" else retain).append((row["gain"], entry.weight, row["se"]))
    target_gain = _weighted_mean([(g, w) for g, w, _ in target])
    forgetting = _weighted_mean([(-g, w) for g, w, _ in retain])
    per_point = target_gain / forgetting if target_gain is not None and forgetting and forgetting > 0 else None
    return {
        "tasks": tasks,
        "target_gain": target_gain,
        "target_gain_se": combined_se([(se, w) for _, w, se in target]),
        "forgetting": forgetting,
        "forgetting_se": combined_se([(se, w) for _, w, se in retain]),
        "gain_per_forgetting": per_point,
    }


def forgetting_report(
    base_scores: dict[str, float], runs: dict[str, dict[str, float]], suite: Suite, provenance: dict | None = None
) -> dict:
    """Per run and task: base, tuned, delta, gain, se (paired SE of delta and gain), n_paired, and for
    multiple-choice tasks `gold_loglik`; per run: target_gain (+ _se), forgetting (+ _se), gain_per_forgetting.
    `provenance` (llmreg.eval.report.provenance: model paths, limit, versions) is recorded as given."""
    metrics = {**getattr(base_scores, "metrics", {})}
    report: dict[str, Any] = {
        "suite": suite.path,
        **(provenance or {}),
        "sign_convention": __doc__.split("Sign convention: ")[1].split("\n\nError bars: ")[0].strip(),
        "error_bars": " ".join(__doc__.split("Error bars: ")[1].split()),
        "base": dict(base_scores),
        "metrics": metrics,
        "runs": {},
    }
    for name, scores in runs.items():
        metrics.update({t: m for t, m in getattr(scores, "metrics", {}).items() if t not in metrics})
        report["runs"][name] = _run_report(base_scores, scores, suite, metrics)
    points = {n: (r["forgetting"] or 0.0, r["target_gain"] or 0.0) for n, r in report["runs"].items()}
    report["pareto_front"] = pareto_front(points)
    return report


__all__ = [
    "Scores",
    "cached_evaluate",
    "evaluate_suite",
    "forgetting_report",
    "pareto_front",
    "replace_marked_section",
    "write_markdown",
    "write_plots",
    "write_report",
]
