"""Per-document scores from lm-eval's logged samples, in the compact form the eval cache keeps (issue 17, point 4).

`simple_evaluate(..., log_samples=True)` returns `out["samples"][task]`: one dict per (document, filter) with
`doc_id`, `filter`, `target`, `filtered_resps` and each metric's per-document value under the metric's name
(lm-eval's `Task.process_results`). Kept per task (`task_per_doc`), keyed by str(doc_id):

    {"metric": "acc,none",                       # the task's primary metric key, as in Scores.metrics
     "values": {"0": 1.0, "1": 0.0, ...},        # its per-document value; for ratio metrics (word_perplexity,
                                                 #   bits_per_byte, ...) the pair [loglik, weight]
     "gold_loglik": {"0": -3.21, ...}}           # multiple_choice tasks only: log-likelihood of the gold choice

`gold_loglik` (issue 18) is the summed log-probability of the gold continuation given the context, i.e. the
gold choice's entry of lm-eval's per-choice loglikelihoods; with several gold choices (a list target), the
log of their total probability (logsumexp). A continuous score whose paired difference has far less variance
than accuracy's 0/1. truthfulqa_mc2-style tasks (target 0 = the first true answer) get that answer's loglik.

`gold_prob` (issue 18) is a score of its own, chosen in a suite entry with `metric: gold_prob`: the probability the
model gives the gold answer, a continuous accuracy in [0, 1] (accuracy is 1 when that answer is the argmax).
multiple_choice: the gold choice's share of the choices' probabilities, softmax over the raw (unnormalised)
per-choice loglikelihoods, summed over several golds: exactly the rule `acc` takes the argmax of, so the two agree
on what is being chosen (an acc_mutual_info task's unconditional requests are left out; a multiple_input task,
whose gold is not a continuation, gets no record); loglikelihood tasks (LAMBADA): exp(loglik) of the target
continuation (lm-eval's acc there is a greedy match of every target token). Unlike `gold_loglik` it does not rise
when every choice gets likelier (a change of style, not of knowledge); its paired difference has less variance
than accuracy's 0/1 (on SmolLM2's suite ~1.7x smaller SE, benchmarks/RESULTS.md). Its record (`gold_prob_record`):

    {"metric": "gold_prob", "values": {"0": 0.41, ...}, "gold_loglik": {...},
     "also": {"acc,none": {"0": 1.0, ...}}}      # lm-eval's own primary metric, reported beside it

`values` is kept only when it reproduces lm-eval's aggregate (the mean, or the ratio of sums) to 1e-6 relative;
a metric lm-eval aggregates otherwise (f1, mcc, ...) has no per-document values, and the report shows no SE.
"""

from __future__ import annotations

import math
from typing import Any

from llmreg.eval.paired import is_ratio_metric, ratio_score

GOLD_PROB = "gold_prob"  # a suite metric computed here, not by lm-eval (module docstring)


def _number(value: Any) -> float | None:
    try:
        return float(value) if not isinstance(value, (list, tuple, dict, str)) else None
    except (TypeError, ValueError):
        return None


def metric_values(samples: list[dict], metric_key: str) -> dict[str, Any] | None:
    """{doc_id: value} of one metric ('acc,none' -> field 'acc' of the samples of filter 'none'); None when a
    value is not a number (or, for ratio metrics, not a (loglik, weight) pair)."""
    name, _, filter_name = metric_key.partition(",")
    values: dict[str, Any] = {}
    for sample in samples:
        if filter_name and sample.get("filter") != filter_name:
            continue
        value = sample.get(name)
        if is_ratio_metric(metric_key):
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                return None
            values[str(sample["doc_id"])] = [float(value[0]), float(value[1])]
        else:
            number = _number(value)
            if number is None:
                return None
            values[str(sample["doc_id"])] = number
    return values or None


def aggregate(metric_key: str, values: dict[str, Any]) -> float:
    """The task score from per-document values: lm-eval's mean, or its ratio of sums for ratio metrics."""
    if is_ratio_metric(metric_key):
        pairs = list(values.values())
        return float(ratio_score(metric_key, sum(p[0] for p in pairs), sum(p[1] for p in pairs)))
    return sum(values.values()) / len(values)


def _gold_indices(sample: dict, delimiter: str, n_choices: int) -> list[int] | None:
    """The gold choice index(es) of one multiple_choice sample (each once), or None when the gold is unknown."""
    gold = sample.get("target")
    if isinstance(gold, str):  # a choice's text (lm-eval: choices.index(gold)); continuations are delimiter + choice
        conts = [args[1] if isinstance(args, (list, tuple)) and len(args) > 1 else None for args in sample["arguments"]]
        gold = conts.index(delimiter + gold) if delimiter + gold in conts else None
    golds = gold if isinstance(gold, list) else [gold]
    if not n_choices or not all(isinstance(g, int) and 0 <= g < n_choices for g in golds):
        return None
    return sorted(set(golds))


def _gold_index_lls(sample: dict, delimiter: str) -> list[float] | None:
    """The gold choice(s)' loglikelihoods of one multiple_choice sample, or None when the gold is unknown."""
    lls = [float(r[0]) for r in sample.get("filtered_resps") or []]
    golds = _gold_indices(sample, delimiter, len(lls))
    return None if golds is None else [lls[g] for g in golds]


def _first_filter(samples: list[dict]):
    """The samples of the first filter: the raw loglikelihoods are the same under every filter."""
    first = samples[0].get("filter") if samples else None
    return (sample for sample in samples if sample.get("filter") == first)


def gold_logliks(samples: list[dict], delimiter: str = " ") -> dict[str, float] | None:
    """{doc_id: log-likelihood of the gold choice} for a multiple_choice task (first filter only: the raw
    loglikelihoods are the same under every filter); None when a document's gold cannot be located."""
    out: dict[str, float] = {}
    for sample in _first_filter(samples):
        lls = _gold_index_lls(sample, delimiter)
        if lls is None:
            return None
        top = max(lls)
        out[str(sample["doc_id"])] = top + math.log(sum(math.exp(x - top) for x in lls))
    return out or None


def gold_probs(samples: list[dict], output_type: str, delimiter: str = " ") -> dict[str, float] | None:
    """{doc_id: probability of the gold answer} (module docstring), first filter only; None for other output
    types or when a document's gold cannot be located."""
    out: dict[str, float] = {}
    for sample in _first_filter(samples):
        if output_type == "loglikelihood":
            resps = sample.get("filtered_resps") or []
            if len(resps) != 1:
                return None
            out[str(sample["doc_id"])] = math.exp(float(resps[0][0]))
            continue
        if output_type != "multiple_choice":
            return None
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        if "acc_mutual_info" in sample:  # lm-eval appended one unconditional request per choice: drop them
            lls = lls[: len(lls) // 2]
        contexts = {str(a[0]) for a in sample.get("arguments", []) if isinstance(a, (list, tuple)) and a}
        if len(contexts) > 1:  # multiple_input (winogrande-style): one context per choice, the gold is not a choice
            return None
        golds = _gold_indices(sample, delimiter, len(lls))
        if golds is None:
            return None
        top = max(lls)
        total = sum(math.exp(x - top) for x in lls)
        out[str(sample["doc_id"])] = sum(math.exp(lls[g] - top) for g in golds) / total
    return out or None


def gold_prob_record(samples: list[dict], lm_metric_key: str, lm_score: float, config: dict | None) -> dict | None:
    """The per-document record of a task scored by `gold_prob` (module docstring), with lm-eval's primary metric
    `lm_metric_key` kept under `also`; None when the task is not multiple_choice / loglikelihood."""
    config = config or {}
    probs = gold_probs(samples, config.get("output_type", ""), config.get("target_delimiter", " "))
    if probs is None:
        return None
    lm_record = task_per_doc(samples, lm_metric_key, lm_score, config)
    record: dict[str, Any] = {"metric": GOLD_PROB, "values": probs}
    if "gold_loglik" in lm_record:
        record["gold_loglik"] = lm_record["gold_loglik"]
    if "values" in lm_record and not is_ratio_metric(lm_metric_key):
        record["also"] = {lm_metric_key: lm_record["values"]}
    return record


def task_per_doc(samples: list[dict], metric_key: str, score: float, config: dict | None = None) -> dict:
    """The cache's per-document record of one task (module docstring); `values` is left out when it does not
    reproduce `score`."""
    record: dict[str, Any] = {"metric": metric_key}
    values = metric_values(samples, metric_key)
    if values is not None and math.isclose(aggregate(metric_key, values), score, rel_tol=1e-6, abs_tol=1e-9):
        record["values"] = values
    config = config or {}
    if config.get("output_type") == "multiple_choice":
        gold = gold_logliks(samples, config.get("target_delimiter", " "))
        if gold is not None:
            record["gold_loglik"] = gold
    return record
