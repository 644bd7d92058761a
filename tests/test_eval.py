"""Forgetting evaluation: continual metrics, suites, local lm-eval tasks and the report (real stories260K)."""

from __future__ import annotations

import json
import math

import pytest

from llmreg.core.options import ConfigError
from llmreg.eval import continual_metrics


def test_continual_metrics_hand_worked_3x3():
    R = [[0.8, 0.1, 0.2], [0.6, 0.9, 0.3], [0.5, 0.7, 0.95]]
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
    assert {"gsm8k_local", "tinystories_ppl", "mmlu_local", "hellaswag_local"} <= {e.task for e in off.entries}
    assert off.target[0].num_fewshot == 5 and off.target[0].metric == "exact_match"


def test_general_suite_parses():
    """Its tasks are hub tasks: validated only online, so only its structure is checked here."""
    import yaml

    raw = yaml.safe_load(open(os.path.join(SUITES, "general.yaml")))
    names = [t if isinstance(t, str) else t["task"] for t in raw["target"] + raw["retain"]]
    assert names[0] == "gsm8k" and {"mmlu", "hellaswag", "arc_easy", "piqa", "lambada_openai"} <= set(names)


@pytest.mark.parametrize(
    "text, message",
    [
        ("target: [a]\nretian: [b]\n", "unknown key 'retian'; did you mean 'retain'"),
        ("target: [a]\n", "missing 'retain' section"),
        ("retain: [a]\n", "missing 'target' section"),
        ("target: [{task: a, wieght: 2}]\nretain: [a]\n", r"target\[0\]: unknown key 'wieght'; did you mean 'weight'"),
        ("target: [{task: a, limit: lots}]\nretain: [a]\n", r"target\[0\]\.limit: expected"),
        ("target: []\nretain: [a]\n", "non-empty list"),
        ("target: [tinystories_pll]\nretain: [a]\n", "unknown task 'tinystories_pll'.*did you mean 'tinystories_ppl'"),
    ],
)
def test_suite_errors(tmp_path, monkeypatch, text, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ok_task = "task: X\ndataset_path: text\ndataset_kwargs:\n  data_files:\n    test: data.txt\n"
    (tmp_path / "data.txt").write_text("hi\n")
    path = _suite(tmp_path, text, {"a": ok_task.replace("X", "a"), "tinystories_ppl": ok_task.replace("X", "t")})
    with pytest.raises(ConfigError, match=message):
        load_suite(path)


def test_local_task_with_missing_data_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = (
        "task: a\ndataset_path: json\nprocess_docs: !function hooks.f\ndataset_kwargs:\n  data_files:\n"
        "    test: ../shared/nope.jsonl\n"
    )
    path = _suite(tmp_path, "target: [a]\nretain: [a]\n", {"a": task})
    missing = os.path.normpath(tmp_path / ".." / "shared" / "nope.jsonl")
    with pytest.raises(ConfigError, match=f"data file not found: {missing}"):
        load_suite(path)


# --- report and lm-eval runs on the real stories260K -----------------------------------------------------------

from llmreg.eval import run as ev  # noqa: E402

MODEL = os.path.join(REPO, "..", "shared", "data", "models", "stories260K")


def test_forgetting_report_signs_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = load_suite(os.path.join(SUITES, "general_offline.yaml"))
    suite.retain = [e for e in suite.retain if e.task == "tinystories_ppl"]  # target gsm8k_local, retain tinystories
    metrics = {"gsm8k_local": "exact_match,strict-match", "tinystories_ppl": "word_perplexity,none"}
    base = ev.Scores({"gsm8k_local": 0.10, "tinystories_ppl": 4.0}, metrics)
    runs = {
        "a": {"gsm8k_local": 0.30, "tinystories_ppl": 8.0},  # gain 0.2, perplexity up 4 -> forgetting 4
        "b": {"gsm8k_local": 0.20, "tinystories_ppl": 5.0},  # gain 0.1, forgetting 1
        "c": {"gsm8k_local": 0.15, "tinystories_ppl": 6.0},
    }  # gain 0.05, forgetting 2: dominated by b
    report = ev.forgetting_report(base, runs, suite)
    a = report["runs"]["a"]
    assert a["target_gain"] == pytest.approx(0.2) and a["forgetting"] == pytest.approx(4.0)
    assert a["gain_per_forgetting"] == pytest.approx(0.05)
    assert a["tasks"]["tinystories_ppl"]["delta"] == pytest.approx(4.0)
    assert a["tasks"]["tinystories_ppl"]["gain"] == pytest.approx(-4.0)  # lower perplexity is better
    assert report["pareto_front"] == ["a", "b"]
    files = ev.write_report(report, str(tmp_path))
    assert all(os.path.getsize(f) > 0 for f in files)
    assert "| b | 0.1 | 1 | 0.1 | yes |" in open(tmp_path / "forgetting_report.md").read()


@pytest.mark.parametrize(
    "paths, names",
    [
        (["runs/a/final", "runs/b/final"], ["a", "b"]),  # was "final" and "final-1"
        (["runs/a/final"], ["a"]),  # a run's final model is named after the run
        (["/x/run1/final", "y/run1/final", "z/run2/final"], ["x/run1", "y/run1", "z/run2"]),
        (["runs/a/checkpoint-3", "runs/a/final"], ["checkpoint-3", "final"]),
        (["runs/a/final", "runs/a/final"], ["a", "a-2"]),
        (["../shared/data/models/stories260K"], ["stories260K"]),
    ],
)
def test_run_names_are_the_distinguishing_part_of_each_path(paths, names):
    from llmreg.eval.compare import run_names

    assert run_names(paths) == names
    assert run_names(paths, [f"n{i}" for i in range(len(paths))]) == [f"n{i}" for i in range(len(paths))]


def test_compare_records_run_names_and_paths(tmp_path, monkeypatch):
    """`llmreg eval --model runs/a/final --model runs/b/final`: runs a and b, each with its absolute path."""
    from llmreg.eval.compare import compare_to_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    suite = load_suite(os.path.join(SUITES, "stories260k.yaml"))
    scores = {"runs/a/final": 10.0, "runs/b/final": 20.0}
    for path in scores:
        (tmp_path / path).mkdir(parents=True)
    fake = lambda s, path, **k: ev.Scores(  # noqa: E731
        {"gsm8k_ppl": scores.get(path, 100.0), "tinystories_ppl": 5.0},
        {"gsm8k_ppl": "word_perplexity,none", "tinystories_ppl": "word_perplexity,none"},
    )
    monkeypatch.setattr(ev, "cached_evaluate", fake)
    monkeypatch.setattr(ev, "evaluate_suite", fake)
    compare_to_base(suite, "suite.yaml", "base_model", list(scores), str(tmp_path / "out"), limit=7)
    report = json.load(open(tmp_path / "out" / "forgetting_report.json"))
    assert list(report["runs"]) == ["a", "b"] and report["runs"]["b"]["tasks"]["gsm8k_ppl"]["tuned"] == 20.0
    assert report["run_paths"] == {"a": str(tmp_path / "runs/a/final"), "b": str(tmp_path / "runs/b/final")}
    assert report["base_path"] == "base_model" and report["limit"] == 7  # not a local path: kept as given
    named = compare_to_base(suite, "s.yaml", "m", list(scores), str(tmp_path / "o2"), names=["lr_high", "lr_low"])
    assert list(json.load(open(named[0]))["runs"]) == ["lr_high", "lr_low"]


def test_plots_use_a_log_axis_for_perplexities_and_label_changes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmreg.eval.report import _task_panel, change_text, write_plots

    assert change_text(4.0e8, 1836.0, lower_is_better=True) == "1836 (x4.59e-06)"
    assert change_text(0.005, 0.855, lower_is_better=False) == "0.855 (+0.85)"
    task = {"role": "target", "metric": "word_perplexity,none", "lower_is_better": True}
    acc = {"role": "retain", "metric": "acc,none", "lower_is_better": False}
    report = {
        "suite": "eval/suites/s.yaml",
        "pareto_front": ["only"],
        "runs": {
            "only": {
                "target_gain": 4e8,
                "forgetting": 0.1,
                "tasks": {"ppl": {**task, "base": 4e8, "tuned": 1836.0}, "acc": {**acc, "base": 0.9, "tuned": 0.8}},
            }
        },
    }
    fig, (ax1, ax2) = plt.subplots(1, 2)
    _task_panel(ax1, "ppl", report, ["C0"])
    _task_panel(ax2, "acc", report, ["C0"])
    assert ax1.get_xscale() == "log" and ax2.get_xscale() == "linear"
    assert {t.get_text() for t in ax1.get_yticklabels()} == {"base", "only"}  # base and tuned, one bar each
    assert [t.get_text() for t in ax1.texts] == ["4e+08 (base)", "1836 (x4.59e-06)"]
    assert "lower is better" in ax1.get_xlabel() and ax1.get_title() == "ppl (target)"
    plt.close(fig)
    files = write_plots(report, str(tmp_path))  # one run: a single-point Pareto plot
    assert [os.path.basename(f) for f in files] == ["deltas.png", "pareto.png"]
    assert all(os.path.getsize(f) > 0 for f in files)


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(MODEL), AutoTokenizer.from_pretrained(MODEL)


def test_report_numbers_equal_lm_eval(stories, tmp_path, monkeypatch):
    """Acceptance: what the report says is what lm-eval's simple_evaluate says for the same model and tasks."""
    import copy

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = stories
    suite = load_suite(os.path.join(SUITES, "stories260k.yaml"))
    base = ev.evaluate_suite(suite, model, tok, limit=5)
    assert base.metrics == {"gsm8k_ppl": "word_perplexity,none", "tinystories_ppl": "word_perplexity,none"}

    include = ev.write_local_tasks(suite, tmp_path / "tasks")
    direct = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=4),  # same batching
        tasks=["gsm8k_ppl", "tinystories_ppl"],
        limit=5,
        task_manager=TaskManager(include_path=include, include_defaults=False),
    )
    for task in ("gsm8k_ppl", "tinystories_ppl"):
        assert base[task] == pytest.approx(direct["results"][task]["word_perplexity,none"], rel=1e-9)
    assert 1 < base["tinystories_ppl"] < base["gsm8k_ppl"]  # a TinyStories model knows stories, not maths

    noisy = copy.deepcopy(model)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tuned = ev.evaluate_suite(suite, noisy, tok, limit=5)
    report = ev.forgetting_report(base, {"noisy": tuned}, suite)
    run = report["runs"]["noisy"]
    assert run["tasks"]["tinystories_ppl"]["base"] == base["tinystories_ppl"]
    assert run["tasks"]["tinystories_ppl"]["tuned"] == tuned["tinystories_ppl"]
    assert run["forgetting"] == pytest.approx(tuned["tinystories_ppl"] - base["tinystories_ppl"])
    assert run["target_gain"] == pytest.approx(base["gsm8k_ppl"] - tuned["gsm8k_ppl"])


def test_base_scores_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = load_suite(os.path.join(SUITES, "stories260k.yaml"))
    first = ev.cached_evaluate(suite, MODEL, limit=2, cache_dir=str(tmp_path))
    monkeypatch.setattr(ev, "evaluate_suite", lambda *a, **k: pytest.fail("evaluated again"))
    again = ev.cached_evaluate(suite, MODEL, limit=2, cache_dir=str(tmp_path))
    assert again == first and again.metrics == first.metrics and again.per_doc == first.per_doc
    assert ev.cache_path(str(tmp_path), MODEL, suite, 3) != ev.cache_path(str(tmp_path), MODEL, suite, 2)
    # the cache keeps each document's (loglik, words): their ratio of sums is the cached word perplexity
    record = again.per_doc["tinystories_ppl"]
    assert record["metric"] == "word_perplexity,none" and set(record["values"]) == {"0", "1"}
    lls, words = zip(*record["values"].values())
    assert again["tinystories_ppl"] == pytest.approx(math.exp(-sum(lls) / sum(words)), rel=1e-9)


def test_cache_entry_without_per_doc_scores_is_evaluated_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = load_suite(os.path.join(SUITES, "stories260k.yaml"))
    path = ev.cache_path(str(tmp_path), MODEL, suite, 2)
    old = {"model": MODEL, "suite": suite.path, "limit": 2, "scores": {"gsm8k_ppl": 1.0}, "metrics": {}}
    os.makedirs(tmp_path, exist_ok=True)
    json.dump(old, open(path, "w"))  # the format before per-document scores
    fresh = ev.Scores({"gsm8k_ppl": 2.0}, {"gsm8k_ppl": "word_perplexity,none"}, {"gsm8k_ppl": {"metric": "x"}})
    monkeypatch.setattr(ev, "evaluate_suite", lambda *a, **k: fresh)
    assert ev.cached_evaluate(suite, MODEL, limit=2, cache_dir=str(tmp_path)) == {"gsm8k_ppl": 2.0}
    saved = json.load(open(path))
    assert saved["format"] == ev.CACHE_FORMAT and saved["per_doc"] == {"gsm8k_ppl": {"metric": "x"}}


def test_cache_key_follows_the_model_files(tmp_path):
    """A model retrained into the same folder is a new cache entry (its files' sizes / times changed)."""
    suite = load_suite(os.path.join(SUITES, "testbed.yaml"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"1")
    first = ev.cache_path(str(tmp_path), str(tmp_path / "m"), suite, None)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"22")
    assert ev.cache_path(str(tmp_path), str(tmp_path / "m"), suite, None) != first


# --- llmreg eval ---------------------------------------------------------------------------------------------


def test_cli_eval_writes_report(tmp_path):
    import json
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "llmreg.cli",
        "eval",
        "--suite",
        os.path.join(SUITES, "stories260k.yaml"),
        "--base",
        MODEL,
        "--model",
        MODEL,
        "--out",
        str(tmp_path / "out"),
        "--limit",
        "3",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.load(open(tmp_path / "out" / "forgetting_report.json"))
    run = report["runs"]["stories260K"]  # the base against itself: nothing gained, nothing forgotten
    assert run["target_gain"] == 0 and run["forgetting"] == 0
    # the report says what it compared: every model's path, the suite, the limit, the versions
    assert report["base_path"] == os.path.abspath(MODEL) == report["run_paths"]["stories260K"]
    assert report["suite_path"] == os.path.join(SUITES, "stories260k.yaml") and report["limit"] == 3
    assert set(report["versions"]) == {"llmreg", "lm_eval"} and report["versions"]["lm_eval"]
    md = open(tmp_path / "out" / "forgetting_report.md").read()
    assert f"| base | `{os.path.abspath(MODEL)}` |" in md and f"| stories260K | `{os.path.abspath(MODEL)}` |" in md
    assert "documents per task: 3" in md
    for name in ("forgetting_report.md", "deltas.png", "pareto.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert len(os.listdir(tmp_path / "cache")) == 1
    per_doc = json.load(open(tmp_path / "out" / "per_doc_scores.json"))
    assert per_doc["base"]["per_doc"] == per_doc["runs"]["stories260K"]["per_doc"]
    assert len(per_doc["base"]["per_doc"]["gsm8k_ppl"]["values"]) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "./no/such/model", "--base", MODEL], "model path not found: ./no/such/model"),
        (["--model", MODEL], "give --base, or at least two --model"),
        (["--model", REPO, "--base", MODEL], "is not a model folder"),
        (["--model", MODEL, "--model", MODEL, "--base", MODEL, "--name", "a"], "1 --name for 2 fine-tuned models"),
        (["--model", MODEL, "--model", MODEL, "--base", MODEL, "--name", "a", "--name", "a"], "must differ"),
        (["--model", MODEL, "--base", MODEL, "--limit", "0"], "--limit: must be >= 1 documents per task, got 0"),
        (["--model", MODEL, "--base", MODEL, "--limit", "-3"], "--limit: must be >= 1 documents per task, got -3"),
    ],
)
def test_cli_eval_errors_before_loading(args, message, tmp_path, capsys, monkeypatch):
    from llmreg.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(ev, "evaluate_suite", lambda *a, **k: pytest.fail("evaluated"))
    code = main(["eval", "--suite", os.path.join(SUITES, "stories260k.yaml"), "--out", str(tmp_path), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_eval_bad_suite(tmp_path, capsys, monkeypatch):
    from llmreg.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _suite(tmp_path, "target: [gsm8k_pp]\nretain: [tinystories_ppl]\n")
    assert main(["eval", "--suite", path, "--model", MODEL, "--base", MODEL, "--out", str(tmp_path)]) == 2
    assert "unknown task 'gsm8k_pp'" in capsys.readouterr().err
