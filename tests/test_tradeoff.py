"""Trade-off sweeps (issue 17 point 5): `llmreg sweep RECIPE --grid ... --suite SUITE [--merge-alphas ...]` on the
testbed writes one gain-vs-forgetting table and Pareto plot with paired error bars, resumes without training or
evaluating again, and refuses bad input with one line and exit 2 before anything loads."""

from __future__ import annotations

import json
import os

import pytest

from llmreg.cli import main
from llmreg.core.options import ConfigError
from llmreg.pretrain.tradeoff import parse_merge_alphas

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "testbed", "vanilla.yaml")
SUITE = os.path.join(REPO, "eval", "suites", "testbed.yaml")
# the reduced CI version: a testbed build of a few seconds, 2 steps per point, 5 documents per task
TINY = [
    "model.testbed={size: tiny, steps: 20, batch_size: 16, eval_n: 10}",
    "trainer.max_steps=2",
    "data.num_examples=16",
    "trainer.per_device_train_batch_size=8",
]


def test_parse_merge_alphas():
    assert parse_merge_alphas("0.5,0.25,0.5") == [0.25, 0.5]
    assert parse_merge_alphas("0,1") == [0.0, 1.0] and parse_merge_alphas(None) == []
    for bad in ("1.5", "-0.1", "0.5,nan", ""):
        with pytest.raises(ConfigError, match=r"--merge-alphas must lie in \[0, 1\]"):
            parse_merge_alphas(bad)
    with pytest.raises(ConfigError, match="takes numbers"):
        parse_merge_alphas("half")


def test_two_point_sweep_on_the_testbed_writes_the_tradeoff_and_resumes(tmp_path, monkeypatch, capsys):
    import llmreg.eval.run as eval_run
    import llmreg.recipe.run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LLMREG_CACHE", str(tmp_path / "llmreg_cache"))  # the tiny testbed build goes here
    out, cache = tmp_path / "sweep", tmp_path / "scores"
    argv = ["sweep", RECIPE, *TINY, "--grid", "trainer.learning_rate=1e-3,3e-2", "--suite", SUITE]
    argv += ["--limit", "5", "--merge-alphas", "0.5", "--out", str(out), "--cache-dir", str(cache)]
    assert main(argv) == 0
    report = json.loads((out / "tradeoff" / "forgetting_report.json").read_text())
    points = ["learning_rate=1e-3", "learning_rate=3e-2"]
    assert list(report["runs"]) == [points[0], f"{points[0]}@alpha=0.5", points[1], f"{points[1]}@alpha=0.5"]
    for run in report["runs"].values():  # every row has its paired error bars (exact match per document)
        assert run["target_gain_se"] is not None and run["forgetting_se"] is not None
        assert all(t["n_paired"] == 5 for t in run["tasks"].values())
    # (YAML reads 1e-3 without a dot as a string; the recipe's type check turns it into a float)
    assert [float(p["values"]["trainer.learning_rate"]) for p in report["sweep"]["points"]] == [1e-3, 3e-2]
    assert report["run_paths"][f"{points[1]}@alpha=0.5"] == str(out / points[1] / "wise_ft" / "alpha-0.5")
    md = (out / "tradeoff" / "forgetting_report.md").read_text()
    assert "| run | target gain ± SE | forgetting ± SE |" in md and f"| {points[1]}@alpha=0.5 | " in md
    for name in ("pareto.png", "deltas.png"):
        assert (out / "tradeoff" / name).stat().st_size > 0
    assert len(os.listdir(cache)) == 5  # the base, two points, two merges

    # a second run trains, merges and evaluates nothing, and writes the same table
    capsys.readouterr()
    monkeypatch.setattr(llmreg.recipe.run, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(eval_run, "evaluate_suite", lambda *a, **k: pytest.fail("evaluated again"))
    monkeypatch.setattr("llmreg.eval.merge.merge", lambda *a, **k: pytest.fail("merged again"))
    assert main(argv) == 0
    assert "2 finished, 0 to run" in capsys.readouterr().out
    assert json.loads((out / "tradeoff" / "forgetting_report.json").read_text())["runs"] == report["runs"]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Building or loading a model, the testbed, or evaluating, fails the test (the CLI lets AssertionError out)."""
    import transformers

    import llmreg.eval.run
    import llmreg.recipe.build
    import llmreg.testbed

    def probe(*args, **kwargs):
        raise AssertionError("something was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", probe)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", probe)
    monkeypatch.setattr(llmreg.recipe.build, "build_model", probe)
    monkeypatch.setattr(llmreg.testbed, "build", probe)
    monkeypatch.setattr(llmreg.eval.run, "evaluate_suite", probe)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--grid", "trainer.learnig_rate=1e-3,3e-3"], "did you mean 'learning_rate'?"),
        (["--grid", "trainer.learning_rate=1e-3", "--merge-alphas", "1.5"], "--merge-alphas must lie in [0, 1]"),
        (["--grid", "trainer.learning_rate=1e-3", "--merge-alphas", "-0.25"], "--merge-alphas must lie in [0, 1]"),
        (["--grid", "trainer.learning_rate=1e-3", "--suite", "no/such/suite.yaml"], "suite file not found"),
        (["--grid", "trainer.learning_rate=1e-3", "--base", "./no/such/model"], "model path not found"),
        (["--grid", "trainer.learning_rate=1e-3", "--limit", "0"], "--limit: must be >= 1"),
        (["--grid", "model.dtype=float32,bfloat16"], "the grid changes 'model.dtype'"),
    ],
)
def test_bad_sweep_input_exits_2_with_one_line_before_loading(extra, message, tmp_path, capsys, nothing_loads):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = ["sweep", RECIPE, "--out", str(tmp_path / "sweep"), "--suite", SUITE, *extra]
    if "no/such/suite.yaml" in extra:
        argv.remove(SUITE), argv.remove("--suite")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--merge-alphas", "0.5"], "sweep: --merge-alphas needs --suite"),
        (["--base", "x"], "sweep: --base needs --suite"),
    ],
)
def test_suite_options_need_suite(argv, message, tmp_path, capsys, nothing_loads):
    code = main(["sweep", RECIPE, "--out", str(tmp_path), "--grid", "trainer.learning_rate=1e-3", *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_a_from_config_recipe_needs_base(tmp_path, capsys, nothing_loads):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {config: {size: tiny}}\ndata: {train: 'builtin:arithmetic', num_examples: 8}\n"
        f"trainer: {{kind: sft, max_steps: 1}}\noutput_dir: {tmp_path / 'run'}\n"
    )
    code = main(["sweep", str(recipe), "--grid", "trainer.learning_rate=1e-3", "--suite", SUITE])
    assert code == 2 and "give --base MODEL" in capsys.readouterr().err


def test_a_merge_made_from_another_base_is_redone(tmp_path, monkeypatch):
    """A rerun with a different --base must not reuse the merges (and so the cached scores) of the old base."""
    import llmreg.eval.merge
    from llmreg.eval.merge import MERGE_FILE
    from llmreg.pretrain.tradeoff import merged_models

    bases = {}
    for name in ("base_a", "base_b", "run/final"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
        bases[name] = str(tmp_path / name)
    done = tmp_path / "run" / "wise_ft" / "alpha-0.5"
    done.mkdir(parents=True)
    (done / MERGE_FILE).write_text(json.dumps({"base": bases["base_a"], "alpha": 0.5}))  # newer than final/
    merged = []
    monkeypatch.setattr(llmreg.eval.merge, "plan_merge", lambda base, tuned, alphas, out, overwrite: (base, alphas))
    monkeypatch.setattr(llmreg.eval.merge, "merge", merged.append)
    final, run_dir = bases["run/final"], str(tmp_path / "run")
    assert merged_models(bases["base_a"], final, run_dir, [0.5]) == {0.5: str(done)} and merged == []
    merged_models(bases["base_b"], final, run_dir, [0.5])
    assert merged == [(bases["base_b"], "0.5")]
