"""Document hooks for the offline copies of the standard benchmarks (`!function offline_tasks.<name>`).

The data in ../shared/data comes in the formats its sources used (see each folder's SOURCE.md), not in
the hub layouts lm-eval's own tasks read; these hooks rebuild the fields those tasks' prompts use, so a
local task asks the same question as its hub counterpart (differences are noted in each task YAML).
`load_*` functions are lm-eval `custom_dataset` loaders: lm-eval calls them with the task's
`dataset_kwargs` (data paths already made absolute by llmreg.eval.suite) and its `metadata`.
"""

import re

import datasets
import numpy as np


def _hellaswag_clean(text):
    # as lm-eval's hellaswag utils.preprocess: " [title]" and other bracketed tags are WikiHow artefacts
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    """{query, choices, gold} like lm-eval's hellaswag. This copy's `ctx` is already
    "<activity_label>: <ctx_a> <ctx_b>" (ctx_b not capitalised, since the split is lost)."""
    return dataset.map(
        lambda doc: {
            "query": _hellaswag_clean(doc["ctx"]),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }
    )


def load_piqa(data_files, **metadata):
    """PIQA ships its answers in a separate file (one 0/1 per line): join them into a `label` column."""
    ds = datasets.load_dataset("json", data_files={"validation": data_files["validation"]})["validation"]
    with open(data_files["labels"]) as f:
        labels = [int(line) for line in f if line.strip()]
    if len(labels) != len(ds):
        raise ValueError(f"piqa: {len(ds)} questions but {len(labels)} labels in {data_files['labels']}")
    return datasets.DatasetDict({"validation": ds.add_column("label", labels)})


MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]


def load_mmlu(data_files, **metadata):
    """One task over all subjects (`data_files` maps subject -> its headerless CSV). Rows are interleaved
    round-robin across subjects, so the first N documents (lm-eval's `limit`) span up to N subjects; the
    full-set accuracy is the mean over all questions, as lm-eval's size-weighted mmlu group score."""
    import csv

    per_subject = []
    for subject, path in sorted(data_files.items()):
        with open(path, newline="") as f:
            rows = [dict(zip(MMLU_COLUMNS, row)) for row in csv.reader(f) if row]
        per_subject.append(
            [
                {
                    "question": r["question"],
                    "choices": [r[k] for k in "ABCD"],
                    "answer": "ABCD".index(r["answer"].strip()),
                    "subject": subject.replace("_", " "),
                }
                for r in rows
            ]
        )
    docs = [rows[i] for i in range(max(map(len, per_subject))) for rows in per_subject if i < len(rows)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def truthfulqa_mc2_docs(dataset):
    """The generation CSV's answer lists (';'-separated) -> lm-eval's mc2_targets: correct ones labelled 1,
    then incorrect ones labelled 0. (The hub's multiple_choice config was curated from the same lists.)"""

    def split(text):
        return [a.strip() for a in (text or "").split(";") if a.strip()]

    def to_doc(doc):
        good, bad = split(doc["Correct Answers"]), split(doc["Incorrect Answers"])
        return {
            "question": doc["Question"],
            "mc2_targets": {"choices": good + bad, "labels": [1] * len(good) + [0] * len(bad)},
        }

    return dataset.map(to_doc, remove_columns=dataset.column_names)


def process_results_mc2(doc, results):
    """lm-eval's truthfulqa mc2 score: the normalised probability mass on the true answers."""
    ll, _ = zip(*results)
    probs = np.exp(np.array(ll))
    probs = probs / probs.sum()
    return {"acc": float(probs[np.array(doc["mc2_targets"]["labels"]) == 1].sum())}
