"""Eval during training: EvalSuiteCallback logs eval/<task> at the right steps with evaluate_suite's values;
the recipe's eval_during_training section is checked before anything loads."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

from llmreg.core.options import ConfigError
from llmreg.recipe import build_run, validate_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "eval", "suites", "stories260k.yaml")
MODEL = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "models", "stories260K"))
GSM8K = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "gsm8k", "train.jsonl"))


def stories_recipe(out_dir, **sections) -> dict:
    """stories260K (a real 260K-parameter Llama) trained on GSM8K text with the plain Trainer."""
    raw = {
        "model": {"name_or_path": MODEL},
        "data": {"train": {"path": GSM8K, "max_examples": 64, "text_field": "question"}},
        "trainer": {
            "kind": "hf",
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            "disable_tqdm": True,
        },
        "eval_during_training": {"suite": SUITE, "every_steps": 2, "limit": 2},
        "output_dir": str(out_dir),
        "seed": 0,
    }
    raw.update(sections)
    return raw


class Snapshots:
    """A callback registered after EvalSuiteCallback: sees the model exactly as it was just evaluated."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.states, self.training = {}, {}

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                outer.states[state.global_step] = copy.deepcopy(model.state_dict())
                outer.training[state.global_step] = model.training

        self.callback = _CB()


def test_logs_eval_metrics_equal_to_evaluate_suite(tmp_path, monkeypatch):
    from llmreg.eval.callback import EvalSuiteCallback
    from llmreg.eval.run import evaluate_suite

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = build_run(validate_recipe(stories_recipe(tmp_path / "out")))
    callbacks = [c for c in run.trainer.callback_handler.callbacks if isinstance(c, EvalSuiteCallback)]
    assert len(callbacks) == 1 and callbacks[0].trainer is run.trainer  # wired by the recipe
    snaps = Snapshots()
    run.trainer.add_callback(snaps.callback)
    run.trainer.train()

    logged = {row["step"]: row for row in run.trainer.state.log_history if "eval/tinystories_ppl" in row}
    assert sorted(logged) == [2, 4]  # every_steps=2 over 4 steps, nothing at 1 or 3
    assert all(snaps.training.values())  # back in train mode after each evaluation

    model = copy.deepcopy(run.trainer.model)
    for step in (2, 4):
        model.load_state_dict(snaps.states[step])
        again = evaluate_suite(SUITE, model, run.tokenizer, limit=2)
        for task in ("gsm8k_ppl", "tinystories_ppl"):
            assert logged[step][f"eval/{task}"] == pytest.approx(again[task], rel=1e-6), (step, task)
    assert logged[2]["eval/gsm8k_ppl"] != logged[4]["eval/gsm8k_ppl"]  # evaluated the live, changing model

    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    jsonl = {r["step"]: r["eval/gsm8k_ppl"] for r in rows if "eval/gsm8k_ppl" in r}
    assert jsonl == {s: logged[s]["eval/gsm8k_ppl"] for s in (2, 4)}  # the recipe's on_log file has them too
    losses = [r for r in rows if "loss" in r]
    assert len(losses) == 4 and not any("eval/gsm8k_ppl" in r for r in losses)  # own rows, loss rows intact


def test_evaluation_leaves_rng_and_mode_as_they_were(monkeypatch):
    """lm-eval reseeds torch/numpy/random; training after an evaluation must not see that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmreg.eval.callback import EvalSuiteCallback

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = AutoModelForCausalLM.from_pretrained(MODEL), AutoTokenizer.from_pretrained(MODEL)
    model.train()
    cb = EvalSuiteCallback(SUITE, every_steps=1, limit=1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(state)
    scores = cb.evaluate(model, tok)
    assert torch.equal(torch.rand(3), expected)
    assert model.training and scores["tinystories_ppl"] > 1


@pytest.mark.parametrize(
    "args",
    [
        SimpleNamespace(deepspeed={"zero_optimization": {"stage": 3}}, fsdp=""),
        SimpleNamespace(deepspeed=os.path.join(REPO, "ds_configs", "zero3.json"), fsdp=""),
        SimpleNamespace(deepspeed=None, fsdp="full_shard"),
    ],
)
def test_refuses_sharded_weights(args):
    from llmreg.eval.callback import EvalSuiteCallback

    cb = EvalSuiteCallback(SUITE, every_steps=5)
    with pytest.raises(ConfigError, match="ZeRO-3|FSDP"):
        cb.on_train_begin(args, None, None)
    with pytest.raises(ConfigError, match="ZeRO-3|FSDP"):
        cb.attach(SimpleNamespace(args=args))


def test_needs_the_trainer_and_accepts_zero2():
    from llmreg.eval.callback import EvalSuiteCallback

    cb = EvalSuiteCallback(SUITE, every_steps=5)
    zero2 = SimpleNamespace(deepspeed=os.path.join(REPO, "ds_configs", "zero2.json"), fsdp="")
    with pytest.raises(ConfigError, match="attach"):
        cb.on_train_begin(zero2, None, None)
    with pytest.raises(ConfigError, match="every_steps"):
        EvalSuiteCallback(SUITE, every_steps=0)


# -- recipe validation: before any model loads ------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    import transformers

    import llmreg.recipe.build

    def boom(*a, **k):
        raise AssertionError("validation loaded something")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(llmreg.recipe.build, "build_model", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"suite": SUITE, "evry_steps": 2},
            "eval_during_training: unknown key 'evry_steps'; did you mean 'every_steps'",
        ),
        ({"suite": SUITE, "every_steps": "often"}, "eval_during_training.every_steps: expected int"),
        ({"suite": SUITE, "limit": 0}, "eval_during_training.limit: must be >= 1"),
        ({"every_steps": 2}, "eval_during_training: missing key 'suite'"),
        ({"suite": "eval/suites/nope.yaml"}, "eval_during_training.suite: suite file not found: eval/suites/nope.yaml"),
    ],
)
def test_recipe_section_errors(tmp_path, no_loading, section, message):
    with pytest.raises(ConfigError, match=message):
        validate_recipe(stories_recipe(tmp_path, eval_during_training=section))


def test_every_steps_beyond_max_steps_warns_at_validation(tmp_path, no_loading):
    """A copied recipe with every_steps 100 and max_steps 50 would silently never evaluate."""
    import warnings

    from llmreg.recipe.errors import RecipeWarning

    trainer = {**stories_recipe(tmp_path)["trainer"], "max_steps": 50}
    with pytest.warns(RecipeWarning, match="every_steps=100 is larger than trainer.max_steps=50"):
        validate_recipe(stories_recipe(tmp_path, trainer=trainer, eval_during_training={"suite": SUITE}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal, smaller, or no max_steps (epochs): no warning
        for steps in (100, 200, -1):
            section = {"suite": SUITE, "every_steps": 100}
            validate_recipe(
                stories_recipe(tmp_path, trainer={**trainer, "max_steps": steps}, eval_during_training=section)
            )
    import subprocess
    import sys

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(stories_recipe(tmp_path, trainer=trainer, eval_during_training={"suite": SUITE})))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "llmreg.cli", "validate", str(path)], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    err = done.stderr
    assert "warning: eval_during_training.every_steps=100 is larger than trainer.max_steps=50:" in err
    assert "RecipeWarning" not in err and "warnings.warn" not in err  # one line, not Python's file:line form


def test_recipe_bad_suite_and_zero3(tmp_path, no_loading):
    bad = tmp_path / "eval" / "suites" / "bad.yaml"
    bad.parent.mkdir(parents=True)
    (tmp_path / "eval" / "tasks").mkdir()
    bad.write_text("target: [gsm8k_pp]\nretain: [tinystories_ppl]\n")
    with pytest.raises(ConfigError, match="eval_during_training.suite: .*unknown task 'gsm8k_pp'"):
        validate_recipe(stories_recipe(tmp_path, eval_during_training={"suite": str(bad)}))
    trainer = {**stories_recipe(tmp_path)["trainer"], "deepspeed": os.path.join(REPO, "ds_configs", "zero3.json")}
    with pytest.raises(ConfigError, match="eval_during_training: not supported with DeepSpeed ZeRO-3"):
        validate_recipe(stories_recipe(tmp_path, trainer=trainer))


def test_recipe_section_round_trips(tmp_path, no_loading):
    """The suite path is resolved against the recipe's folder and written back absolute."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    raw = stories_recipe(
        tmp_path / "out", eval_during_training={"suite": os.path.relpath(SUITE, recipes), "every_steps": 3}
    )
    path = recipes / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    from llmreg.recipe import load_recipe

    cwd = os.getcwd()
    os.chdir(tmp_path)  # not the repo: only the recipe folder can resolve the relative suite path
    try:
        recipe = load_recipe(str(path))
    finally:
        os.chdir(cwd)
    assert recipe.eval_during_training.suite == SUITE and recipe.eval_during_training.every_steps == 3
    assert validate_recipe(recipe.to_dict()).eval_during_training == recipe.eval_during_training
