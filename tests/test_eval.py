"""Forgetting evaluation: continual metrics, suites, local lm-eval tasks and the report (real stories260K)."""

from __future__ import annotations

import pytest

from llmreg.core.options import ConfigError
from llmreg.eval import continual_metrics


def test_continual_metrics_hand_worked_3x3():
    R = [[0.8, 0.1, 0.2],
         [0.6, 0.9, 0.3],
         [0.5, 0.7, 0.95]]
    baseline = [0.25, 0.05, 0.1]
    # op  = (0.5 + 0.7 + 0.95) / 3 = 2.15 / 3 = 0.716667
    # bwt = ((0.5 - 0.8) + (0.7 - 0.9)) / 2 = (-0.3 - 0.2) / 2 = -0.25
    # fwt = ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.1 - 0.05) + (0.3 - 0.1)) / 2 = 0.25 / 2 = 0.125
    m = continual_metrics(R, baseline)
    assert m["op"] == pytest.approx(0.716667, abs=1e-6)
    assert m["bwt"] == pytest.approx(-0.25)
    assert m["fwt"] == pytest.approx(0.125)
    assert continual_metrics(R)["fwt"] is None


def test_continual_metrics_accepts_arrays_and_rejects_bad_shapes():
    import numpy as np

    assert continual_metrics(np.eye(2))["bwt"] == pytest.approx(-1.0)
    with pytest.raises(ConfigError, match="square"):
        continual_metrics([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ConfigError, match="empty"):
        continual_metrics([])
    with pytest.raises(ConfigError, match="baseline has 1"):
        continual_metrics([[1, 2], [3, 4]], baseline=[0.0])


# --- suites --------------------------------------------------------------------------------------------------

import os  # noqa: E402
import textwrap  # noqa: E402

from llmreg.eval.suite import load_suite  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = os.path.join(REPO, "eval", "suites")


def _suite(tmp_path, text: str, tasks: dict[str, str] | None = None) -> str:
    """A suite in a scratch checkout layout (tmp/eval/suites/s.yaml, tmp/eval/tasks/*.yaml)."""
    (tmp_path / "eval" / "suites").mkdir(parents=True, exist_ok=True)
    (tmp_path / "eval" / "tasks").mkdir(parents=True, exist_ok=True)
    for name, body in (tasks or {}).items():
        (tmp_path / "eval" / "tasks" / f"{name}.yaml").write_text(textwrap.dedent(body))
    path = tmp_path / "eval" / "suites" / "s.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_shipped_suites_load(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = load_suite(os.path.join(SUITES, "stories260k.yaml"))
    assert [e.task for e in s.target] == ["gsm8k_ppl"] and [e.task for e in s.retain] == ["tinystories_ppl"]
    text, _ = s.local_tasks["tinystories_ppl"]
    shared = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "tinystories"))
    assert f"test: {shared}/tinystories_validation_first1000.txt" in text  # resolved from the repo root
    off = load_suite(os.path.join(SUITES, "general_offline.yaml"))
    assert {e.task for e in off.entries} == {"gsm8k_local", "tinystories_ppl"}
    assert off.target[0].num_fewshot == 5 and off.target[0].metric == "exact_match"


def test_general_suite_parses():
    """Its tasks are hub tasks: validated only online, so only its structure is checked here."""
    import yaml

    raw = yaml.safe_load(open(os.path.join(SUITES, "general.yaml")))
    names = [t if isinstance(t, str) else t["task"] for t in raw["target"] + raw["retain"]]
    assert names[0] == "gsm8k" and {"mmlu", "hellaswag", "arc_easy", "piqa", "lambada_openai"} <= set(names)


@pytest.mark.parametrize("text, message", [
    ("target: [a]\nretian: [b]\n", "unknown key 'retian'; did you mean 'retain'"),
    ("target: [a]\n", "missing 'retain' section"),
    ("retain: [a]\n", "missing 'target' section"),
    ("target: [{task: a, wieght: 2}]\nretain: [a]\n", r"target\[0\]: unknown key 'wieght'; did you mean 'weight'"),
    ("target: [{task: a, limit: lots}]\nretain: [a]\n", r"target\[0\]\.limit: expected"),
    ("target: []\nretain: [a]\n", "non-empty list"),
    ("target: [tinystories_pll]\nretain: [a]\n", "unknown task 'tinystories_pll'.*did you mean 'tinystories_ppl'"),
])
def test_suite_errors(tmp_path, monkeypatch, text, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ok_task = "task: X\ndataset_path: text\ndataset_kwargs:\n  data_files:\n    test: data.txt\n"
    (tmp_path / "data.txt").write_text("hi\n")
    path = _suite(tmp_path, text, {"a": ok_task.replace("X", "a"), "tinystories_ppl": ok_task.replace("X", "t")})
    with pytest.raises(ConfigError, match=message):
        load_suite(path)


def test_local_task_with_missing_data_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = "task: a\ndataset_path: json\nprocess_docs: !function hooks.f\ndataset_kwargs:\n  data_files:\n" \
           "    test: ../shared/nope.jsonl\n"
    path = _suite(tmp_path, "target: [a]\nretain: [a]\n", {"a": task})
    missing = os.path.normpath(tmp_path / ".." / "shared" / "nope.jsonl")
    with pytest.raises(ConfigError, match=f"data file not found: {missing}"):
        load_suite(path)
