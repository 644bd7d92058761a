"""Multi-stage recipes (llmreg.recipe.stages): validation per stage, the merge rule, stage-index injection,
a 2-stage run where stage 1 starts from stage 0's final weights, resume, and stage_eval's continual report."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import yaml

from llmreg.core.options import ConfigError
from llmreg.recipe import validate_recipe
from llmreg.recipe.schema import StagedRecipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINYSTORIES = os.path.abspath(
    os.path.join(REPO, "..", "shared", "data", "tinystories", "tinystories_validation_first1000.txt")
)


def staged_raw(out_dir, stages=None, **sections) -> dict:
    """Two small SFT stages on different builtin tasks; `sections` replace whole top-level entries."""
    raw = {
        "model": {"config": {"size": "tiny"}},
        "data": {"train": "builtin:arithmetic", "num_examples": 32},
        "trainer": {
            "kind": "sft",
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "disable_tqdm": True,
        },
        "output_dir": str(out_dir),
        "seed": 0,
        "stages": stages
        if stages is not None
        else [
            {"name": "a", "data": {"train": "builtin:testbed_add"}},
            {"name": "b", "data": {"train": "builtin:testbed_sub"}, "trainer": {"learning_rate": 1e-4}},
        ],
    }
    raw.update(sections)
    return raw


def write_suite(tmp_path, target="testbed_sub", retain="tinystories_ppl") -> str:
    """A suite of the repository's local tasks (a suite outside a checkout resolves tasks in this one)."""
    path = tmp_path / "suite.yaml"
    path.write_text(f"target: [{target}]\nretain: [{retain}]\n")
    return str(path)


# -- the probe: a test-only regularizer whose options have `stage` ---------------------------------

SEEN: list[dict] = []  # per setup call: the stage it got and the model's weights before training


@pytest.fixture
def probe():
    """Register `_stage_probe` for one test only (the conformance suite checks the registry's contents)."""
    from llmreg.core import Regularizer, option, register, registry

    @dataclasses.dataclass
    class ProbeOptions:
        stage: int = option(0, "stage index (filled in by staged recipes)")
        scale: float = option(1.0, "unused")

    class StageProbe(Regularizer):
        """Records the stage it was built for and the weights it starts from."""

        options_cls = ProbeOptions

        def setup(self, model, trainer) -> None:
            SEEN.append(
                {"stage": self.options.stage, "weights": {n: p.detach().clone() for n, p in model.state_dict().items()}}
            )

    SEEN.clear()
    register("_stage_probe")(StageProbe)
    yield StageProbe
    registry._REGISTRY.pop("_stage_probe", None)
    SEEN.clear()


# -- validation ------------------------------------------------------------------------------------


def _stage(name, **sections):
    return {"name": name, **sections}


BAD = [
    (
        dict(stages=[_stage("sft"), _stage("dpo", trainer={"kind": "dpo", "learning_rat": 1e-5})]),
        "stages[1] (dpo): trainer: unknown key 'learning_rat'; did you mean 'learning_rate'?",
    ),
    (
        dict(stages=[_stage("a", trainr={"max_steps": 1})]),
        "stages[0] (a): unknown key 'trainr'; did you mean 'trainer'?",
    ),
    (
        dict(stages=[_stage("a"), _stage("b", model={"config": {"size": "tiny"}})]),
        "stages[1] (b): model is set at the top level only",
    ),
    (dict(stages=[_stage("a"), {"output_dir": "x"}]), "stages[1] (stage1): output_dir is set at the top level only"),
    (dict(stages=[_stage("a"), _stage("a")]), "stages[1] (a): duplicate stage name 'a'"),
    (
        dict(stages=[_stage("a", regularizers=[{"name": "l2sp"}])]),
        "stages[0] (a): regularizers.0: unknown regularizer 'l2sp'; did you mean 'l2_sp'?",
    ),
    (dict(stages=[_stage("a/b")]), "stages[0].name: 'a/b' is not a usable folder name"),
    (dict(stages=[]), "stages: expected a non-empty list"),
    (dict(stages=[_stage("a", peft={"r": 4}), _stage("b")]), "stages[0] (a): peft: only the last stage"),
    (dict(stages=[_stage("a", eval_task="testbed_sub")]), "stages[0] (a): eval_task: needs a top-level stage_eval"),
    (dict(importance={"method": "ewc"}), "importance: not allowed together with stages"),
    (dict(stages=[_stage("a", data=None)], data=None), "stages[0] (a): recipe: missing section 'data'"),
]


@pytest.mark.parametrize("sections,message", BAD, ids=[m[:40] for _, m in BAD])
def test_stage_errors_name_the_stage(tmp_path, sections, message):
    raw = staged_raw(tmp_path / "out", **sections)
    with pytest.raises(ConfigError) as err:
        validate_recipe(raw)
    assert message in str(err.value)


def test_eval_task_must_be_in_the_suite(tmp_path):
    stage_eval = {"suite": write_suite(tmp_path), "limit": 2}
    raw = staged_raw(
        tmp_path / "out",
        stage_eval=stage_eval,
        stages=[_stage("a", eval_task="testbed_sub"), _stage("b", eval_task="testbed_su")],
    )
    with pytest.raises(
        ConfigError,
        match=r"stages\[1\] \(b\): eval_task: 'testbed_su' is not a task of .*suite.yaml; "
        r"did you mean 'testbed_sub'\?",
    ):
        validate_recipe(raw)
    raw["stages"][1]["eval_task"] = "tinystories_ppl"
    assert [s.eval_task for s in validate_recipe(raw).stages] == ["testbed_sub", "tinystories_ppl"]
    with pytest.raises(ConfigError, match="stage_eval.suite: suite file not found"):
        validate_recipe({**raw, "stage_eval": {"suite": str(tmp_path / "nope.yaml")}})


def test_stage_eval_without_stages_is_refused(tmp_path):
    raw = staged_raw(tmp_path / "out", stage_eval={"suite": write_suite(tmp_path)})
    del raw["stages"]
    with pytest.raises(ConfigError, match="stage_eval: only a recipe with `stages:`"):
        validate_recipe(raw)


def test_cli_validate_reports_the_stage_and_exits_2(tmp_path, capsys):
    from llmreg.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(staged_raw(tmp_path / "out")))
    assert main(["validate", str(path), "stages.1.trainer.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "error: stages[1] (b): trainer: unknown key 'max_stepz'; did you mean 'max_steps'?" in err
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stage 1/2: a (sft), from the model above" in out and "stage 2/2: b (sft), from stage 1's final model" in out
    assert "learning_rate=0.0001" in out


# -- the merge rule and the stage index ------------------------------------------------------------


def test_stage_sections_merge_over_the_top_level(tmp_path):
    stages = [
        _stage("a", peft=None),
        _stage(
            "b",
            data={"train": "builtin:testbed_add"},
            trainer={"learning_rate": 1e-4},
            regularizers=[{"name": "weight_decay"}],
            peft=None,
        ),
        {"peft": {"r": 4}},
    ]
    raw = staged_raw(
        tmp_path / "out", stages=stages, peft={"r": 8, "lora_alpha": 16}, regularizers=[{"name": "l2_sp", "lam": 0.01}]
    )
    staged = validate_recipe(raw)
    assert isinstance(staged, StagedRecipe)
    a, b, c = (s.recipe for s in staged.stages)
    assert [s.name for s in staged.stages] == ["a", "b", "stage2"]
    assert [r.output_dir for r in (a, b, c)] == [str(tmp_path / "out" / d) for d in ("0_a", "1_b", "2_stage2")]
    # mappings merge key by key: b keeps the top-level max_steps and num_examples, changes lr and train
    assert (a.trainer.args["learning_rate"], b.trainer.args["learning_rate"]) == (1e-3, 1e-4)
    assert b.trainer.args["max_steps"] == 2 and b.data.train.num_examples == 32
    assert (a.data.train.path, b.data.train.path, c.data.train.path) == (
        "builtin:arithmetic",
        "builtin:testbed_add",
        "builtin:arithmetic",
    )
    # regularizers replace; peft: null turns it off, a mapping merges (r from the stage, lora_alpha from the top)
    assert [r["name"] for r in a.regularizers] == ["l2_sp"] and [r["name"] for r in b.regularizers] == ["weight_decay"]
    assert a.peft is None and b.peft is None and (c.peft["r"], c.peft["lora_alpha"]) == (4, 16)
    # to_dict round-trips
    again = validate_recipe(staged.to_dict())
    assert [s.recipe.to_dict() for s in again.stages] == [s.recipe.to_dict() for s in staged.stages]


def test_merge_section_rule():
    from llmreg.recipe.stages import merge_section

    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    assert merge_section(base, {"a": {"y": [3]}, "c": 4}) == {"a": {"x": 1, "y": [3]}, "b": 2, "c": 4}
    assert merge_section(base, None) is None and merge_section(None, {"k": 1}) == {"k": 1}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2}  # not modified


def test_stage_index_is_injected_into_regularizers_with_a_stage_option(tmp_path, probe):
    stages = [_stage("a"), _stage("b"), _stage("c", regularizers=[{"name": "_stage_probe", "stage": 7}, "l2_sp"])]
    staged = validate_recipe(staged_raw(tmp_path / "out", stages=stages, regularizers=["_stage_probe"]))
    regs = [s.recipe.regularizers for s in staged.stages]
    assert regs[0] == [{"name": "_stage_probe", "stage": 0}]
    assert regs[1] == [{"name": "_stage_probe", "stage": 1}]
    assert regs[2] == [{"name": "_stage_probe", "stage": 7}, {"name": "l2_sp"}]  # explicit wins; l2_sp has no stage
    # a recipe without stages is left alone
    plain = validate_recipe(
        {k: v for k, v in staged_raw(tmp_path / "o2", regularizers=["_stage_probe"]).items() if k != "stages"}
    )
    assert plain.regularizers == [{"name": "_stage_probe"}]


# -- running ---------------------------------------------------------------------------------------


def _final_weights(final_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(final_dir).state_dict()


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_two_stages_chain_resume_and_stage_eval(tmp_path, probe, capsys, monkeypatch):
    """One 2-stage run (the costly part) checked several ways; then resume after deleting stage b's final."""
    from llmreg.eval.continual import continual_metrics
    from llmreg.eval.run import evaluate_suite
    from llmreg.recipe.stages import plan_stages, run_stages, starting_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert os.path.isfile(TINYSTORIES), f"the shared data is missing: {TINYSTORIES}"
    suite = write_suite(tmp_path)
    out = tmp_path / "out"
    raw = staged_raw(
        out,
        regularizers=["_stage_probe"],
        stage_eval={"suite": suite, "limit": 2},
        stages=[
            _stage("a", data={"train": "builtin:testbed_add"}, eval_task="tinystories_ppl"),
            _stage(
                "b", data={"train": "builtin:testbed_sub"}, eval_task="testbed_sub", trainer={"learning_rate": 1e-4}
            ),
        ],
    )
    staged = validate_recipe(raw)
    result = run_stages(staged)
    printed = capsys.readouterr().out
    assert "stage 1/2: a (sft)" in printed and "stage 2/2: b (sft)" in printed
    assert result.trained == ["a", "b"] and result.skipped == []
    final_a, final_b = result.final_dirs
    assert final_a == str(out / "0_a" / "final") and final_b == str(out / "1_b" / "final")

    # each stage's regularizer got its index; stage b started from exactly stage a's final weights,
    # which differ from stage a's start (so the comparison means something)
    assert [s["stage"] for s in SEEN] == [0, 1]
    weights_a = _final_weights(final_a)
    _assert_same(SEEN[1]["weights"], weights_a)
    assert any(not torch.equal(SEEN[0]["weights"][n], weights_a[n]) for n in weights_a)
    b_recipe = yaml.safe_load((out / "1_b" / "recipe.yaml").read_text())
    assert b_recipe["model"]["name_or_path"] == final_a and b_recipe["tokenizer"]["name_or_path"] == final_a
    assert b_recipe["regularizers"] == [{"name": "_stage_probe", "stage": 1}]
    assert b_recipe["trainer"]["learning_rate"] == 1e-4

    # stage_eval: the starting model is the one stage a trained from; R, baseline and the metrics follow
    # from the per-model scores; stage b's score equals an independent evaluation of its final model
    start, _ = starting_model(staged)
    _assert_same(start.state_dict(), SEEN[0]["weights"])
    scores = json.loads((out / "stage_eval" / "scores.json").read_text())
    report = json.loads((out / "stage_eval" / "continual_report.json").read_text())
    by = {k: v["scores"] for k, v in scores["models"].items()}
    assert set(by) == {"start", "0_a", "1_b"}
    assert report["tasks"] == ["tinystories_ppl", "testbed_sub"] and report["negated"] == ["tinystories_ppl"]
    assert report["R"] == [
        [-by["0_a"]["tinystories_ppl"], by["0_a"]["testbed_sub"]],
        [-by["1_b"]["tinystories_ppl"], by["1_b"]["testbed_sub"]],
    ]
    assert report["baseline"] == [-by["start"]["tinystories_ppl"], by["start"]["testbed_sub"]]
    assert len({by[k]["tinystories_ppl"] for k in by}) == 3  # three different models, three perplexities
    metrics = continual_metrics(report["R"], report["baseline"])
    assert {k: report[k] for k in ("op", "bwt", "fwt")} == metrics
    assert report["bwt"] == pytest.approx(by["0_a"]["tinystories_ppl"] - by["1_b"]["tinystories_ppl"])
    assert evaluate_suite(suite, final_b, limit=2) == by["1_b"]
    md = (out / "stage_eval" / "continual_report.md").read_text()
    assert "| 1_b |" in md and "negated: tinystories_ppl" in md

    # rerun: both finished stages are skipped
    SEEN.clear()
    monkeypatch.setattr("llmreg.recipe.stages.evaluate_stages", lambda staged: None)
    again = run_stages(validate_recipe(raw))
    assert again.skipped == ["a", "b"] and again.trained == [] and SEEN == []
    assert "stage 1/2: a (sft): skipped" in capsys.readouterr().out

    # stage b unfinished with a checkpoint: refused without --resume; with it, a is skipped and b continues
    # from its checkpoint, again starting from a's final model
    import shutil

    shutil.rmtree(final_b)
    with pytest.raises(ConfigError, match=r"stages\[1\] \(b\): .*checkpoint-2 from an earlier run: add --resume"):
        plan_stages(validate_recipe(raw))
    resumed_recipe = validate_recipe({**raw, "resume": True})
    assert [(p.action, p.resume_from) for p in plan_stages(resumed_recipe)] == [
        ("skip", None),
        ("train", str(out / "1_b" / "checkpoint-2")),
    ]
    resumed = run_stages(resumed_recipe)
    assert resumed.skipped == ["a"] and resumed.trained == ["b"] and [s["stage"] for s in SEEN] == [1]
    _assert_same(SEEN[0]["weights"], weights_a)
    assert os.path.isfile(os.path.join(final_b, "config.json"))

    # --overwrite clears every stage, then trains both again
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        plan_stages(resumed_recipe, overwrite=True)
    SEEN.clear()
    fresh = run_stages(validate_recipe(raw), overwrite=True)
    assert fresh.trained == ["a", "b"] and [s["stage"] for s in SEEN] == [0, 1]
    assert not (out / "stage_eval").exists()  # cleared, and evaluate_stages is patched out here


def test_continual_report_orientation():
    """R[i][j] = after stage i, on stage j's task; a lower-is-better metric is negated."""
    from types import SimpleNamespace

    from llmreg.recipe.stages import continual_report

    stages = [
        SimpleNamespace(name="a", dir_name="0_a", eval_task="x"),
        SimpleNamespace(name="b", dir_name="1_b", eval_task="y"),
    ]
    scores = {"start": {"x": 0.1, "y": 20.0}, "0_a": {"x": 0.9, "y": 15.0}, "1_b": {"x": 0.5, "y": 10.0}}
    report = continual_report(stages, scores, {"x": "acc,none", "y": "word_perplexity,none"})
    assert report["R"] == [[0.9, -15.0], [0.5, -10.0]] and report["baseline"] == [0.1, -20.0]
    assert report["op"] == pytest.approx((0.5 - 10.0) / 2)
    assert report["bwt"] == pytest.approx(0.5 - 0.9) and report["fwt"] == pytest.approx(-15.0 + 20.0)
    no_task = SimpleNamespace(name="c", dir_name="1_c", eval_task=None)
    assert continual_report([stages[0], no_task], scores, {}) is None


def test_train_refuses_a_staged_recipe(tmp_path):
    from llmreg.recipe.run import train

    with pytest.raises(TypeError, match="run_stages"):
        train(validate_recipe(staged_raw(tmp_path / "out")))


def test_cli_trains_sft_then_dpo(tmp_path, capsys):
    """`llmreg train` on a staged recipe: a DPO stage after an SFT one, starting from its final model."""
    from llmreg.cli import main

    out = tmp_path / "out"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(staged_raw(out, stages=[_stage("sft"), _stage("dpo", trainer={"kind": "dpo"})])))
    assert main(["train", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "stage 1/2: sft (sft)" in printed and "stage 2/2: dpo (dpo), from " + str(out / "0_sft" / "final") in printed
    assert "done: 2 stages trained" in printed
    dpo_recipe = yaml.safe_load((out / "1_dpo" / "recipe.yaml").read_text())
    assert dpo_recipe["trainer"]["kind"] == "dpo"
    assert dpo_recipe["model"]["name_or_path"] == str(out / "0_sft" / "final")
    logged = [json.loads(line) for line in (out / "1_dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/chosen" in row for row in logged)  # DPO's own metrics: the second stage really is DPO
    staged_file = yaml.safe_load((out / "recipe.yaml").read_text())
    assert [s["name"] for s in staged_file["stages"]] == ["sft", "dpo"]
    assert main(["train", str(path)]) == 0  # everything finished: both skipped
    assert "done: 0 stages trained, 2 skipped (sft, dpo)" in capsys.readouterr().out
