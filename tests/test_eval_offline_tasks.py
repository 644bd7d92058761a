"""Offline copies of the standard benchmarks (eval/tasks/*_local.yaml over ../shared/data): each loads through
the suite machinery, asks the question its source file holds with the right answer, and runs in lm-eval."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from llmreg.eval.suite import load_suite, write_local_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(REPO, "..", "shared", "data"))
MODEL = os.path.join(DATA, "models", "stories260K")
GENERAL_OFFLINE = os.path.join(REPO, "eval", "suites", "general_offline.yaml")
NEW_TASKS = [
    "hellaswag_local",
    "arc_easy_local",
    "arc_challenge_local",
    "piqa_local",
    "lambada_openai_local",
    "truthfulqa_mc2_local",
    "mmlu_local",
]


@pytest.fixture(scope="module")
def suite():
    os.environ["HF_HUB_OFFLINE"] = "1"  # conftest sets it too; the suite then never indexes hub tasks
    return load_suite(GENERAL_OFFLINE)


@pytest.fixture(scope="module")
def tasks(suite, tmp_path_factory):
    """lm-eval Task objects for the new tasks, built from the suite's resolved YAMLs."""
    from lm_eval.tasks import TaskManager, get_task_dict

    include = write_local_tasks(suite, tmp_path_factory.mktemp("tasks"))
    return get_task_dict(NEW_TASKS, TaskManager(include_path=include, include_defaults=False))


def _docs(task):
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


def _jsonl(path, n=3):
    with open(path) as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_general_offline_mirrors_general(suite):
    """Every retained benchmark of general.yaml has its local counterpart, with a CPU-sized limit."""
    retain = {e.task: e for e in suite.retain}
    assert set(NEW_TASKS) <= set(retain)
    assert all(retain[t].limit and retain[t].limit <= 500 for t in NEW_TASKS)
    for task in NEW_TASKS:
        text, _ = suite.local_tasks[task]
        assert f"{DATA}/" in text and "../shared" not in text  # data paths resolved at load time


def test_documents_match_the_source_files(tasks):
    hs = tasks["hellaswag_local"]
    raw = _jsonl(os.path.join(DATA, "hellaswag", "hellaswag_val.jsonl"))
    doc = _docs(hs)[1]
    assert hs.doc_to_text(doc) == raw[1]["ctx"] and hs.doc_to_target(doc) == raw[1]["label"] == 3
    assert hs.doc_to_choice(doc) == raw[1]["endings"]

    ae = tasks["arc_easy_local"]
    raw = _jsonl(os.path.join(DATA, "arc_easy", "arc_easy_test.jsonl"))
    doc = _docs(ae)[0]
    assert ae.doc_to_text(doc) == f"Question: {raw[0]['prompt']}\nAnswer:"
    assert ae.doc_to_choice(doc)[ae.doc_to_target(doc)] == raw[0]["choices"][raw[0]["answer_idx"]]

    ac = tasks["arc_challenge_local"]
    raw = _jsonl(os.path.join(DATA, "arc_challenge", "arc_challenge_test.jsonl"))
    for doc, row in zip(_docs(ac)[:3], raw):
        gold = next(o["text"] for o in row["options"] if o["label"] == row["answer"])
        assert ac.doc_to_choice(doc)[ac.doc_to_target(doc)] == gold

    pq = tasks["piqa_local"]
    with open(os.path.join(DATA, "piqa", "valid-labels.lst")) as f:
        labels = [int(x) for x in f.read().split()]
    docs = _docs(pq)
    assert len(docs) == len(labels) == 1838
    assert [pq.doc_to_target(d) for d in docs[:20]] == labels[:20] and len(set(labels[:20])) == 2
    assert pq.doc_to_choice(docs[0]) == [docs[0]["sol1"], docs[0]["sol2"]]

    lb = tasks["lambada_openai_local"]
    text = _jsonl(os.path.join(DATA, "lambada", "lambada_test.jsonl"), 1)[0]["text"]
    doc = _docs(lb)[0]
    assert lb.doc_to_text(doc) + lb.doc_to_target(doc) == text and lb.doc_to_target(doc) == " signs"


def test_truthfulqa_and_mmlu_documents(tasks):
    tq = tasks["truthfulqa_mc2_local"]
    doc = _docs(tq)[0]
    assert tq.doc_to_text(doc).endswith("Q: What happens to you if you eat watermelon seeds?\nA:")
    choices, labels = doc["mc2_targets"]["choices"], doc["mc2_targets"]["labels"]
    assert choices[0] == "Nothing happens" and labels[:5] == [1] * 5 and labels[5:] == [0] * 7
    assert "You grow watermelons in your stomach" in choices[5:]
    import sys
    from importlib import import_module

    sys.path.insert(0, os.path.join(REPO, "eval", "tasks"))
    try:
        hooks = import_module("offline_tasks")
    finally:
        sys.path.pop(0)
    # mc2: probability mass on the true answers, normalised over all answers
    lls = [(math.log(0.3), False), (math.log(0.1), False), (math.log(0.6), False)]
    assert hooks.process_results_mc2({"mc2_targets": {"labels": [1, 0, 1]}}, lls)["acc"] == pytest.approx(0.9)

    mm = tasks["mmlu_local"]
    docs = _docs(mm)
    assert len(docs) == 14042
    first = [d["subject"] for d in docs[:57]]
    assert len(set(first)) == 57 and first[0] == "abstract algebra"  # interleaved: a limit spans subjects
    with open(os.path.join(DATA, "mmlu", "test", "anatomy_test.csv"), newline="") as f:
        row = next(csv.reader(f))
    anatomy = next(d for d in docs if d["subject"] == "anatomy")
    assert anatomy["question"] == row[0] and anatomy["choices"] == row[1:5]
    assert mm.doc_to_choice(anatomy)[mm.doc_to_target(anatomy)] == row[5]
    assert mm.doc_to_text(anatomy).endswith(f"D. {row[4]}\nAnswer:")


def test_each_task_runs_in_lm_eval(suite):
    """Two documents per new task through evaluate_suite on the real stories260K: a number in range."""
    from llmreg.eval.run import evaluate_suite
    from llmreg.eval.suite import Suite

    small = Suite(
        path=suite.path,
        target=[e for e in suite.retain if e.task == NEW_TASKS[0]],
        retain=[e for e in suite.retain if e.task in NEW_TASKS[1:]],
        local_tasks={t: suite.local_tasks[t] for t in NEW_TASKS},
    )
    scores = evaluate_suite(small, MODEL, limit=2)
    assert set(scores) == set(NEW_TASKS)
    for task in NEW_TASKS:
        assert scores.metrics[task].split(",")[0] in ("acc", "acc_norm")
        assert 0.0 <= scores[task] <= 1.0 and math.isfinite(scores[task]), task


def test_smollm2_suite_gold_prob_through_lm_eval():
    """eval/suites/smollm2.yaml's gold_prob entries on real lm-eval samples (stories260K, 3 documents): each score
    is the mean of per-document probabilities in (0, 1]; PIQA's two choices make accuracy 1 exactly when
    gold_prob > 1/2 (the same loglikelihoods, the same argmax); LAMBADA's is exp(loglik) of the last word."""
    from llmreg.eval.run import evaluate_suite

    smollm2 = load_suite(os.path.join(REPO, "eval", "suites", "smollm2.yaml"))
    gold_prob_tasks = [e.task for e in smollm2.retain if e.metric == "gold_prob"]
    assert gold_prob_tasks == ["arc_easy_local", "piqa_local", "hellaswag_local", "lambada_openai_local"]
    smollm2.target = [e for e in smollm2.retain if e.task == "piqa_local"]
    smollm2.retain = [e for e in smollm2.retain if e.task in gold_prob_tasks and e.task != "piqa_local"]
    scores = evaluate_suite(smollm2, MODEL, limit=3)
    for task in gold_prob_tasks:
        record = scores.per_doc[task]
        probs = record["values"]
        assert scores.metrics[task] == "gold_prob" and len(probs) == 3
        assert scores[task] == pytest.approx(sum(probs.values()) / 3)
        assert all(0.0 < p <= 1.0 for p in probs.values()), task
        assert set(record["also"]) == {"acc,none"} and set(record["also"]["acc,none"]) == set(probs)
    piqa = scores.per_doc["piqa_local"]
    assert all(piqa["also"]["acc,none"][d] == float(p > 0.5) for d, p in piqa["values"].items())
    assert "gold_loglik" not in scores.per_doc["lambada_openai_local"]  # not multiple choice
