"""Paired standard errors of a tuned-minus-base score difference, from per-document scores (issue 17, point 4).

The base and the tuned model are scored on the same documents, so the error of their difference comes from the
per-document differences, not from two independent standard errors (which ignore the strong positive correlation
between the two models' per-document scores and overstate the error several-fold).

- Mean-type metrics (acc, acc_norm, exact_match, gold_loglik: the task score is the mean of per-document values):
  d_i = tuned_i - base_i over the n documents both models scored, and

      SE = sd(d) / sqrt(n),   sd with the n - 1 denominator (the unbiased sample variance; `paired_se`).

- Ratio-type metrics (lm-eval's loglikelihood_rolling: word_perplexity, byte_perplexity, bits_per_byte): each
  document gives a pair (loglik_i, weight_i) (weight = words or bytes) and the score is a ratio of sums,
  exp(-sum ll / sum w) or -sum ll / sum w / ln 2, which is not a mean of per-document values. The SE of the
  difference is a paired bootstrap over documents (`bootstrap_se`): B = 1000 resamples of the document indices
  with replacement from numpy's `default_rng(seed)` (seed 0), the SAME indices for both models, and

      SE = sd of the B resampled differences (n - 1 denominator, i.e. B - 1).

- Combining tasks (a run's target gain and mean retained drop are weighted means of per-task gains):
  SE = sqrt(sum_t w_t^2 SE_t^2) / sum_t w_t, which assumes the tasks' errors are independent (different
  documents; the same model, so this is an approximation). Any task without an SE leaves the combination None.

Departure: lm-eval's own `bootstrap_iters` gives each model's unpaired stderr; it is not used here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
# lm-eval aggregations of (loglik, weight) pairs: the score of a set of documents from the two sums
RATIO_METRICS = {"word_perplexity", "byte_perplexity", "token_perplexity", "bits_per_byte"}


def is_ratio_metric(metric_key: str) -> bool:
    return metric_key.split(",")[0] in RATIO_METRICS


def ratio_score(metric_key: str, loglik_sum, weight_sum):
    """lm-eval's aggregation of (loglik, weight) pairs from the two sums (arrays work elementwise):
    weighted_perplexity = exp(-sum ll / sum w), bits_per_byte = -sum ll / sum w / ln 2."""
    mean = -np.asarray(loglik_sum, dtype=float) / np.asarray(weight_sum, dtype=float)
    return mean / math.log(2) if metric_key.split(",")[0] == "bits_per_byte" else np.exp(mean)


def paired_docs(base: Mapping[str, object], tuned: Mapping[str, object]) -> list[str]:
    """The document ids both models scored, in a fixed order (numeric ids numerically)."""
    shared = set(base) & set(tuned)
    return sorted(shared, key=lambda d: (0, int(d), "") if str(d).isdigit() else (1, 0, str(d)))


def paired_se(base: Sequence[float], tuned: Sequence[float]) -> float | None:
    """SE of the mean paired difference: sd(tuned_i - base_i) / sqrt(n), sd with the n - 1 denominator;
    None for fewer than 2 documents."""
    d = np.asarray(tuned, dtype=float) - np.asarray(base, dtype=float)
    if d.size < 2:
        return None
    return float(d.std(ddof=1) / math.sqrt(d.size))


def bootstrap_deltas(
    metric_key: str,
    base: Sequence[Sequence[float]],
    tuned: Sequence[Sequence[float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> np.ndarray:
    """The `resamples` bootstrap values of score(tuned) - score(base) for a ratio metric: each resample draws n
    document indices with replacement (rng = numpy default_rng(seed), one (resamples, n) draw) and uses the same
    indices for both models; `base`/`tuned` are per-document (loglik, weight) pairs in the same document order."""
    b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(b), size=(resamples, len(b)))
    scores = [ratio_score(metric_key, x[idx, 0].sum(1), x[idx, 1].sum(1)) for x in (b, t)]
    return scores[1] - scores[0]


def bootstrap_se(
    metric_key: str,
    base: Sequence[Sequence[float]],
    tuned: Sequence[Sequence[float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> float | None:
    """SE of a ratio metric's paired difference: sd (B - 1 denominator) of `bootstrap_deltas`; None for fewer
    than 2 documents."""
    if len(base) < 2:
        return None
    deltas = bootstrap_deltas(metric_key, base, tuned, resamples, seed)
    return float(np.std(deltas, ddof=1))


def delta_se(metric_key: str, base: Mapping[str, object] | None, tuned: Mapping[str, object] | None):
    """(SE of tuned - base, documents paired) from two {doc_id: value} maps of one task's metric: the
    bootstrap for ratio metrics, `paired_se` otherwise; (None, 0) when either map is missing."""
    if not base or not tuned:
        return None, 0
    docs = paired_docs(base, tuned)
    b, t = [base[d] for d in docs], [tuned[d] for d in docs]
    se = bootstrap_se(metric_key, b, t) if is_ratio_metric(metric_key) else paired_se(b, t)
    return se, len(docs)


def combined_se(pairs: Sequence[tuple[float | None, float]]) -> float | None:
    """SE of a weighted mean of independent per-task differences: sqrt(sum w^2 se^2) / sum w, from
    (se, weight) pairs; None when a task has no SE or the weights sum to 0."""
    total = sum(w for _, w in pairs)
    if not pairs or not total or any(se is None for se, _ in pairs):
        return None
    return math.sqrt(sum((w * se) ** 2 for se, w in pairs)) / total


def task_errors(metric_key: str, base: dict | None, tuned: dict | None) -> dict:
    """Paired errors of one task from the two models' per-document records (llmreg.eval.per_doc):
    {"se": SE of tuned - base of `metric_key` (None without per-document values of that metric), "n_paired": n,
    "gold_loglik": {base, tuned, delta, se, n_paired} for multiple-choice tasks (means over the paired documents),
    "also": {metric key: the same} for the mean-type metrics kept beside a `gold_prob` score (its accuracy)}."""
    base, tuned = base or {}, tuned or {}
    same = base.get("metric") == tuned.get("metric") == metric_key
    se, n = delta_se(metric_key, base.get("values"), tuned.get("values")) if same else (None, 0)
    out: dict = {"se": se, "n_paired": n}
    gold = _mean_delta(base.get("gold_loglik"), tuned.get("gold_loglik"))
    if gold:
        out["gold_loglik"] = gold
    also = {k: _mean_delta(v, (tuned.get("also") or {}).get(k)) for k, v in (base.get("also") or {}).items()}
    if any(also.values()):
        out["also"] = {k: v for k, v in also.items() if v}
    return out


def _mean_delta(base: Mapping[str, float] | None, tuned: Mapping[str, float] | None) -> dict | None:
    """{base, tuned, delta, se, n_paired} of a mean-type per-document score over the documents both scored."""
    docs = paired_docs(base, tuned) if base and tuned else []
    if not docs:
        return None
    b, t = [base[d] for d in docs], [tuned[d] for d in docs]
    return {
        "base": float(np.mean(b)),
        "tuned": float(np.mean(t)),
        "delta": float(np.mean(t) - np.mean(b)),
        "se": paired_se(b, t),
        "n_paired": len(docs),
    }
