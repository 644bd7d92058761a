"""Paired error bars (issue 17 point 4): the statistics against hand computations, the per-document records from
lm-eval samples, and the report / plots that show them (llmreg.eval.paired, per_doc, run.forgetting_report)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from llmreg.eval import paired
from llmreg.eval.per_doc import aggregate, gold_logliks, gold_prob_record, gold_probs, metric_values, task_per_doc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paired_se_by_hand():
    # d = tuned - base = [0, 1, 0, -1, 1]; mean 0.2; squared deviations .04 .64 .04 1.44 .64 = 2.8
    # sample variance (n - 1 = 4) = 0.7; SE = sqrt(0.7 / 5) = sqrt(0.14) = 0.3741657
    base, tuned = [1, 0, 1, 1, 0], [1, 1, 1, 0, 1]
    assert paired.paired_se(base, tuned) == pytest.approx(0.3741657, abs=1e-7)
    assert paired.paired_se([1.0], [0.0]) is None  # one document: no spread to estimate
    assert paired.paired_se([0.2, 0.5, 0.9], [0.3, 0.6, 1.0]) == pytest.approx(0.0, abs=1e-12)  # constant shift


def test_combined_se_by_hand():
    # sqrt(1^2 * 0.3^2 + 3^2 * 0.4^2) / (1 + 3) = sqrt(0.09 + 1.44) / 4 = 1.2369317 / 4 = 0.3092329
    assert paired.combined_se([(0.3, 1.0), (0.4, 3.0)]) == pytest.approx(0.3092329, abs=1e-7)
    assert paired.combined_se([(0.3, 1.0), (None, 1.0)]) is None
    assert paired.combined_se([]) is None


def test_ratio_score_is_lm_evals_aggregation():
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    pairs = [(-12.5, 7.0), (-30.25, 11.0), (-4.0, 3.0)]
    lls, ws = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    assert paired.ratio_score("word_perplexity,none", lls, ws) == pytest.approx(weighted_perplexity(pairs), rel=1e-12)
    assert paired.ratio_score("bits_per_byte,none", lls, ws) == pytest.approx(bits_per_byte(pairs), rel=1e-12)


def test_bootstrap_equals_a_direct_loop_with_the_same_seed():
    rng = np.random.default_rng(5)
    base = np.stack([-rng.uniform(10, 50, 30), rng.integers(5, 20, 30)], 1)
    tuned = base + np.stack([rng.normal(0, 2, 30), np.zeros(30)], 1)
    deltas = paired.bootstrap_deltas("word_perplexity,none", base, tuned, resamples=200, seed=3)
    idx = np.random.default_rng(3).integers(0, 30, size=(200, 30))  # the documented draw

    def score(x, row):
        return math.exp(-sum(x[i, 0] for i in row) / sum(x[i, 1] for i in row))

    direct = [score(tuned, row) - score(base, row) for row in idx]
    np.testing.assert_allclose(deltas, direct, rtol=1e-10)
    assert paired.bootstrap_se("word_perplexity,none", base, tuned, 200, 3) == pytest.approx(
        np.std(direct, ddof=1), rel=1e-10
    )


def test_bootstrap_se_matches_the_known_variance_of_a_mean():
    """With every weight 1, bits_per_byte = -mean(loglik) / ln 2, so the bootstrap SE of the paired difference
    must approach the plug-in SE of a mean: sd_pop(d) / sqrt(n) / ln 2 (1000 resamples: ~2 % noise)."""
    rng = np.random.default_rng(0)
    n = 400
    base_ll = rng.normal(-5, 1, n)
    d = rng.normal(0.1, 0.5, n)
    base = np.stack([base_ll, np.ones(n)], 1)
    tuned = np.stack([base_ll + d, np.ones(n)], 1)
    expected = d.std(ddof=0) / math.sqrt(n) / math.log(2)
    assert paired.bootstrap_se("bits_per_byte,none", base, tuned) == pytest.approx(expected, rel=0.08)
    # the seed fixes the answer
    assert paired.bootstrap_se("bits_per_byte,none", base, tuned) == paired.bootstrap_se(
        "bits_per_byte,none", base, tuned
    )


def test_delta_se_pairs_documents_by_id():
    base = {"0": 1.0, "1": 0.0, "2": 1.0, "3": 1.0, "4": 0.0, "9": 1.0}
    tuned = {"4": 1.0, "3": 0.0, "2": 1.0, "1": 1.0, "0": 1.0}  # another order; doc 9 unpaired
    se, n = paired.delta_se("acc,none", base, tuned)
    assert n == 5 and se == pytest.approx(0.3741657, abs=1e-7)  # the hand example above
    assert paired.delta_se("acc,none", None, tuned) == (None, 0)


# --- per-document records from lm-eval samples --------------------------------------------------------------


def _mc_sample(doc_id, lls, target, filt="none", acc=None):
    args = [("Q:", f" choice{i}") for i in range(len(lls))]
    resps = [(ll, False) for ll in lls]
    return {"doc_id": doc_id, "filter": filt, "target": target, "arguments": args, "filtered_resps": resps,
            "acc": float(np.argmax(lls) == target) if acc is None else acc}  # fmt: skip


def test_metric_values_and_gold_logliks_from_samples():
    samples = [_mc_sample(0, [-1.0, -2.0], 0), _mc_sample(1, [-3.0, -0.5], 0), _mc_sample(2, [-2.0, -4.0], 1)]
    assert metric_values(samples, "acc,none") == {"0": 1.0, "1": 0.0, "2": 0.0}
    assert gold_logliks(samples) == {"0": -1.0, "1": -3.0, "2": -4.0}
    # a text target is located among the continuations (delimiter + choice), a list target is logsumexp
    by_text = [_mc_sample(0, [-1.0, -2.0], "choice1")]
    assert gold_logliks(by_text) == {"0": -2.0}
    both = [_mc_sample(0, [math.log(0.2), math.log(0.3)], [0, 1], acc=1.0)]
    assert gold_logliks(both)["0"] == pytest.approx(math.log(0.5))
    assert gold_logliks([_mc_sample(0, [-1.0], 5)]) is None  # gold out of range: no record


def test_task_per_doc_keeps_values_only_when_they_reproduce_the_score():
    samples = [_mc_sample(0, [-1.0, -2.0], 0), _mc_sample(1, [-3.0, -0.5], 0)]
    mc = {"output_type": "multiple_choice"}
    record = task_per_doc(samples, "acc,none", 0.5, mc)
    assert record == {"metric": "acc,none", "values": {"0": 1.0, "1": 0.0}, "gold_loglik": {"0": -1.0, "1": -3.0}}
    assert "values" not in task_per_doc(samples, "acc,none", 0.75, mc)  # not lm-eval's mean: no SE later
    rolling = [
        {"doc_id": 0, "filter": "none", "word_perplexity": (-10.0, 4)},
        {"doc_id": 1, "filter": "none", "word_perplexity": (-20.0, 6)},
        {"doc_id": 0, "filter": "other", "word_perplexity": (0.0, 1)},  # another filter's copy: ignored
    ]
    values = metric_values(rolling, "word_perplexity,none")
    assert values == {"0": [-10.0, 4.0], "1": [-20.0, 6.0]}
    assert aggregate("word_perplexity,none", values) == pytest.approx(math.exp(30 / 10))
    assert "gold_loglik" not in task_per_doc(rolling, "word_perplexity,none", math.exp(3.0))


def test_gold_prob_is_the_gold_share_of_the_choice_probabilities():
    # doc 0: softmax([-1, -2])[0] = 1 / (1 + e^-1); doc 1: gold 1 of [-3, -0.5, -0.5] = e^-.5 / (e^-3 + 2 e^-.5)
    samples = [_mc_sample(0, [-1.0, -2.0], 0), _mc_sample(1, [-3.0, -0.5, -0.5], 1)]
    probs = gold_probs(samples, "multiple_choice")
    assert probs["0"] == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-12)
    assert probs["1"] == pytest.approx(math.exp(-0.5) / (math.exp(-3) + 2 * math.exp(-0.5)), rel=1e-12)
    # several golds add up; every choice 10 nats likelier (a change of style) leaves it unchanged, unlike gold_loglik
    assert gold_probs([_mc_sample(0, [-1.0, -1.0, -1.0, -1.0], [0, 2], acc=1.0)], "multiple_choice")["0"] == 0.5
    shifted = [_mc_sample(0, [9.0, 8.0], 0), _mc_sample(1, [7.0, 9.5, 9.5], 1)]
    assert gold_probs(shifted, "multiple_choice") == pytest.approx(probs, rel=1e-12)
    assert gold_logliks(shifted) != gold_logliks(samples)
    # loglikelihood tasks (LAMBADA): the target continuation's probability
    lambada = [{"doc_id": 3, "filter": "none", "filtered_resps": [(-2.5, False)], "acc": 0.0}]
    assert gold_probs(lambada, "loglikelihood") == {"3": pytest.approx(math.exp(-2.5), rel=1e-12)}
    assert gold_probs(samples, "loglikelihood_rolling") is None
    # a repeated gold index counts once; acc_mutual_info's unconditional requests (second half) are left out;
    # multiple_input (a context per choice, winogrande-style) has no gold among the continuations: no record
    assert gold_probs([_mc_sample(0, [-1.0, -1.0], [0, 0], acc=1.0)], "multiple_choice")["0"] == 0.5
    mutual = {**_mc_sample(0, [-1.0, -2.0, -9.0, -9.0], 0), "acc_mutual_info": 1.0}
    assert gold_probs([mutual], "multiple_choice")["0"] == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-12)
    winogrande = {**_mc_sample(0, [-1.0, -2.0], 0), "arguments": [("A went", " home"), ("B went", " home")]}
    assert gold_probs([winogrande], "multiple_choice") is None


def test_gold_prob_record_keeps_lm_evals_accuracy_beside_it():
    samples = [_mc_sample(0, [-1.0, -2.0], 0), _mc_sample(1, [-3.0, -0.5], 0)]
    record = gold_prob_record(samples, "acc,none", 0.5, {"output_type": "multiple_choice"})
    assert record["metric"] == "gold_prob" and record["also"] == {"acc,none": {"0": 1.0, "1": 0.0}}
    assert record["values"]["1"] == pytest.approx(1 / (1 + math.exp(2.5)))
    assert record["gold_loglik"] == {"0": -1.0, "1": -3.0}
    assert gold_prob_record(samples, "acc,none", 0.5, {"output_type": "generate_until"}) is None


def test_evaluate_suite_scores_a_gold_prob_entry_from_the_samples():
    from llmreg.eval.run import Scores, _score_task
    from llmreg.eval.suite import TaskEntry

    samples = [{**_mc_sample(0, [-1.0, -2.0], 0), "acc_norm": 1.0}, {**_mc_sample(1, [-3.0, -0.5], 0), "acc_norm": 0.0}]
    out = {
        "results": {"arc": {"acc,none": 0.5, "acc_norm,none": 0.5}},
        "samples": {"arc": samples},
        "configs": {"arc": {"output_type": "multiple_choice"}},
    }
    scores = Scores()
    _score_task(scores, TaskEntry("arc", metric="gold_prob"), out)
    want = (1 / (1 + math.exp(-1)) + 1 / (1 + math.exp(2.5))) / 2
    assert scores["arc"] == pytest.approx(want) and scores.metrics["arc"] == "gold_prob"
    assert scores.per_doc["arc"]["also"] == {"acc,none": {"0": 1.0, "1": 0.0}}  # acc beside it, not acc_norm
    del out["results"]["arc"]["acc,none"]  # no acc: lm-eval's primary metric
    scores = Scores()
    _score_task(scores, TaskEntry("arc", metric="gold_prob"), out)
    assert scores.per_doc["arc"]["also"] == {"acc_norm,none": {"0": 1.0, "1": 0.0}}
    out["configs"]["arc"]["output_type"] = "generate_until"
    with pytest.raises(ValueError, match="gold_prob needs a multiple_choice or loglikelihood task"):
        _score_task(Scores(), TaskEntry("arc", metric="gold_prob"), out)


def test_report_of_gold_prob_tasks_pairs_the_accuracy_beside_it():
    from llmreg.eval.run import Scores, forgetting_report
    from llmreg.eval.suite import Suite, TaskEntry

    def scores(probs, acc):
        per_doc = {"metric": "gold_prob", "values": dict(enumerate(probs)), "also": {"acc,none": dict(enumerate(acc))}}
        target = {"metric": "acc,none", "values": {0: 1.0, 1: 0.0}}
        return Scores({"arc": float(np.mean(probs)), "t": 0.5}, {"arc": "gold_prob", "t": "acc,none"},
                      {"arc": per_doc, "t": target})  # fmt: skip

    suite = Suite(path="/x/s.yaml", target=[TaskEntry("t")], retain=[TaskEntry("arc", metric="gold_prob")])
    base, tuned = scores([0.6, 0.5, 0.9], [1.0, 0.0, 1.0]), scores([0.4, 0.5, 0.6], [0.0, 1.0, 1.0])
    run = forgetting_report(base, {"r": tuned}, suite)["runs"]["r"]
    arc = run["tasks"]["arc"]
    # gold_prob: d = [-0.2, 0, -0.3], mean -1/6; forgetting is its drop, with its paired SE
    d = np.array([-0.2, 0.0, -0.3])
    assert run["forgetting"] == pytest.approx(1 / 6) and arc["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    acc = arc["also"]["acc,none"]
    assert acc["delta"] == pytest.approx(0.0) and acc["gain"] == pytest.approx(0.0) and acc["n_paired"] == 3
    assert acc["se"] == pytest.approx(np.array([-1.0, 1.0, 0.0]).std(ddof=1) / math.sqrt(3))


# --- the report ---------------------------------------------------------------------------------------------


def _scores(acc, ppl_pairs, gold):
    from llmreg.eval.run import Scores

    ppl = float(paired.ratio_score("word_perplexity", sum(p[0] for p in ppl_pairs), sum(p[1] for p in ppl_pairs)))
    per_doc = {
        "arc_easy_local": {
            "metric": "acc,none",
            "values": {str(i): v for i, v in enumerate(acc)},
            "gold_loglik": {str(i): v for i, v in enumerate(gold)},
        },
        "tinystories_ppl": {"metric": "word_perplexity,none", "values": {str(i): p for i, p in enumerate(ppl_pairs)}},
    }
    metrics = {"arc_easy_local": "acc,none", "tinystories_ppl": "word_perplexity,none", "gsm8k_ppl": "acc,none"}
    target = {"metric": "acc,none", "values": {str(i): v for i, v in enumerate(acc[::-1])}}
    scores = {"arc_easy_local": sum(acc) / len(acc), "tinystories_ppl": ppl, "gsm8k_ppl": sum(acc) / len(acc)}
    return Scores(scores, metrics, {**per_doc, "gsm8k_ppl": target})


@pytest.fixture
def report_case():
    from llmreg.eval.suite import Suite, TaskEntry

    retain = [TaskEntry("arc_easy_local"), TaskEntry("tinystories_ppl", weight=3.0)]
    suite = Suite(path="/x/s.yaml", target=[TaskEntry("gsm8k_ppl")], retain=retain)
    base = _scores([1, 0, 1, 1, 0], [(-10.0, 4), (-20.0, 6), (-8.0, 5), (-12.0, 4), (-9.0, 3)], [-1, -2, -3, -4, -5])
    tuned = _scores([1, 1, 1, 0, 1], [(-11.0, 4), (-19.0, 6), (-9.5, 5), (-12.5, 4), (-9.0, 3)], [-1, -1, -2, -5, -5])
    return suite, base, tuned


def test_report_shows_paired_se_equal_to_a_hand_computation(report_case, tmp_path):
    from llmreg.eval.run import forgetting_report, write_report

    suite, base, tuned = report_case
    run = forgetting_report(base, {"t": tuned}, suite)["runs"]["t"]
    arc = run["tasks"]["arc_easy_local"]
    assert arc["delta"] == pytest.approx(0.2) and arc["se"] == pytest.approx(0.3741657, abs=1e-7)
    assert arc["n_paired"] == 5
    # gold loglik: d = [0, 1, 1, -1, 0], mean 0.2, squared deviations .04 .64 .64 1.44 .04 = 2.8 -> same SE
    assert arc["gold_loglik"]["delta"] == pytest.approx(0.2) and arc["gold_loglik"]["base"] == pytest.approx(-3.0)
    assert arc["gold_loglik"]["se"] == pytest.approx(0.3741657, abs=1e-7)
    ppl = run["tasks"]["tinystories_ppl"]
    base_pairs = list(base.per_doc["tinystories_ppl"]["values"].values())
    tuned_pairs = list(tuned.per_doc["tinystories_ppl"]["values"].values())
    assert ppl["se"] == pytest.approx(paired.bootstrap_se("word_perplexity", base_pairs, tuned_pairs), rel=1e-12)
    assert ppl["se"] > 0
    # target: acc reversed, d = [1, 0, 0, 1, -1] reversed pairing -> computed the same way by hand
    d = np.array([1, 0, 1, 1, 0])[::-1] - np.array([1, 1, 1, 0, 1])[::-1]
    target_se = d.std(ddof=1) / math.sqrt(5)
    assert run["tasks"]["gsm8k_ppl"]["se"] == pytest.approx(target_se)
    assert run["target_gain_se"] == pytest.approx(target_se)
    # mean retained drop: weights 1 (arc) and 3 (perplexity), independent tasks
    assert run["forgetting_se"] == pytest.approx(math.sqrt(0.3741657**2 + (3 * ppl["se"]) ** 2) / 4, rel=1e-6)
    files = write_report(forgetting_report(base, {"t": tuned}, suite), str(tmp_path / "out"))
    md = open(tmp_path / "out" / "forgetting_report.md").read()
    assert f"| +0.2 ± {0.3741657:.2g} |" in md and "gold_loglik" in md and "Error bars:" in md
    assert f"{run['forgetting']:+.4g} ± {run['forgetting_se']:.2g}" in md
    saved = json.load(open(tmp_path / "out" / "forgetting_report.json"))["runs"]["t"]
    assert saved["forgetting_se"] == pytest.approx(run["forgetting_se"])
    assert all(os.path.getsize(f) > 0 for f in files)


def test_report_without_per_doc_scores_says_so(report_case):
    from llmreg.eval.run import Scores, forgetting_report

    suite, base, tuned = report_case
    bare = Scores(dict(tuned), tuned.metrics)  # e.g. an old cache entry or an in-memory evaluation
    run = forgetting_report(base, {"t": bare}, suite)["runs"]["t"]
    assert run["tasks"]["arc_easy_local"]["se"] is None and run["target_gain_se"] is None
    assert run["forgetting_se"] is None and "gold_loglik" not in run["tasks"]["arc_easy_local"]
