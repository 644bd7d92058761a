"""The testbed through recipes and suites: `model: {testbed: ...}`, `builtin:testbed_<skill>` data, the
shipped recipes/testbed/*.yaml, and eval/suites/testbed.yaml agreeing with `testbed.evaluate_all`."""

from __future__ import annotations

import os

import pytest
import yaml

from llmreg import testbed
from llmreg.core.options import ConfigError
from llmreg.recipe.validate import validate_recipe
from llmreg.testbed import skills as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes", "testbed")
SUITE = os.path.join(REPO, "eval", "suites", "testbed.yaml")
TINY = dict(size="tiny", steps=20, batch_size=16, eval_n=10)  # a build of a few seconds


def raw_recipe(name: str = "vanilla") -> dict:
    with open(os.path.join(RECIPES, f"{name}.yaml")) as f:
        return yaml.safe_load(f)


@pytest.fixture
def nothing_builds(monkeypatch):
    """Fail the test if validation builds the testbed or loads a model, a tokenizer or data."""
    import importlib

    import datasets
    import transformers

    import llmreg.data.builtin

    B = importlib.import_module("llmreg.testbed.build")  # the attribute `llmreg.testbed.build` is the function

    def boom(*args, **kwargs):
        raise AssertionError("validation built or loaded something")

    for module, name in (
        (testbed, "build"),
        (B, "build"),
        (B, "train"),
        (B, "load"),
        (llmreg.data.builtin, "make_builtin_dataset"),
        (datasets, "load_dataset"),
        (transformers.AutoModelForCausalLM, "from_pretrained"),
        (transformers.AutoTokenizer, "from_pretrained"),
    ):
        monkeypatch.setattr(module, name, boom)


# -- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, regularizers", [("vanilla", []), ("l2_sp", [{"name": "l2_sp"}])])
def test_shipped_recipes_have_finetunes_defaults(nothing_builds, name, regularizers):
    path = os.path.join(RECIPES, f"{name}.yaml")
    recipe = validate_recipe(raw_recipe(name), path)
    assert recipe.model.testbed == {"seed": 0} and recipe.model.name_or_path is None and recipe.model.config is None
    assert recipe.tokenizer.builtin == "char"  # the tokenizer the testbed was built with
    assert recipe.data.train.path == "builtin:testbed_sub" and recipe.data.train.seed == 1
    args = recipe.trainer.args
    assert recipe.trainer.kind == "sft" and args["eos_token"] == "\n"
    assert (args["max_steps"], args["learning_rate"], args["per_device_train_batch_size"]) == (800, 1e-4, 32)
    assert args["lr_scheduler_type"] == "constant" and args["weight_decay"] == 0.0
    assert recipe.data.train.num_examples == 800 * 32
    assert recipe.regularizers == regularizers
    again = validate_recipe(recipe.to_dict(), path)  # the resolved recipe.yaml loads to the same recipe
    assert again.model == recipe.model and again.data == recipe.data


BAD = [
    ({"model": {"testbed": "defualt"}}, "model.testbed: unknown testbed 'defualt'; did you mean 'default'?"),
    ({"model": {"testbed": {"stpes": 20}}}, "model.testbed: unknown build option 'stpes'; did you mean 'steps'?"),
    ({"model": {"testbed": {"size": "tinny"}}}, "model.testbed: unknown size 'tinny'; did you mean 'tiny'?"),
    ({"model": {"testbed": {"steps": "many"}}}, "model.testbed: steps: expected int, got 'many'"),
    ({"model": {"testbed": {"skills": ["copy", "revrse"]}}}, "unknown skill 'revrse'; did you mean 'reverse'?"),
    ({"model": {"testbed": "default", "config": {"size": "tiny"}}}, "model: set exactly one of name_or_path"),
    (
        {"data": {"train": "builtin:testbed_sbu"}},
        "data.train: unknown built-in task 'testbed_sbu'; did you mean 'builtin:testbed_sub'?",
    ),
]


@pytest.mark.parametrize("patch, message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_testbed_input_fails_before_anything_loads(nothing_builds, patch, message):
    raw = raw_recipe()
    for section, value in patch.items():
        raw[section] = {**raw[section], **value} if section == "data" else value
    with pytest.raises(ConfigError) as info:
        validate_recipe(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


# -- data ---------------------------------------------------------------------------------------------------------


def test_builtin_testbed_data_is_finetunes_encoding():
    """prompt + completion tokenised as TRL does (prompt with <s>, then the whole text) gives finetune's ids and
    answer-only labels; the other formats carry the same rows."""
    from llmreg.data import build_char_tokenizer, make_builtin_dataset
    from llmreg.testbed.finetune import skill_dataset

    tok = build_char_tokenizer()
    ds = make_builtin_dataset("testbed_sub", "prompt_completion", num_examples=50, seed=1)
    reference = skill_dataset(tok, "sub", 50, seed=1)
    for row, ref in zip(ds, reference):
        prompt_ids = tok(row["prompt"])["input_ids"]
        ids = tok(row["prompt"] + row["completion"])["input_ids"]
        assert ids == ref["input_ids"] and ids[: len(prompt_ids)] == prompt_ids
        assert [-100] * len(prompt_ids) + ids[len(prompt_ids) :] == ref["labels"]
    pref = make_builtin_dataset("testbed_reverse", "preference", num_examples=30, seed=0)
    assert all(r["chosen"] != r["rejected"] and len(r["chosen"]) == len(r["rejected"]) for r in pref)
    assert all(r["rejected"].endswith("\n") for r in pref)
    only = make_builtin_dataset("testbed_add", "prompt_only", num_examples=5, seed=0)
    assert [(r["prompt"], r["answer"]) for r in only] == S.make_examples("add", 5, seed=0)
    text = make_builtin_dataset("testbed_copy", "text", num_examples=3, seed=2)
    assert text["text"] == [p + a + "\n" for p, a in S.make_examples("copy", 3, seed=2)]


# -- training through the recipe = testbed.finetune ----------------------------------------------------------------


def test_recipe_trains_like_finetune(tmp_path, monkeypatch):
    """The vanilla recipe on a tiny build reaches the weights of `testbed.finetune` with the same settings (same
    rows, order, loss and optimizer: equal up to float summation order), far from where both started."""
    from transformers import AutoModelForCausalLM

    from llmreg.recipe.run import train

    monkeypatch.setenv("LLMREG_CACHE", str(tmp_path / "cache"))
    raw = raw_recipe()
    raw["model"]["testbed"] = dict(TINY)
    raw["trainer"].update(max_steps=10, per_device_train_batch_size=8, learning_rate=3e-3)
    raw["data"]["num_examples"] = 80
    raw["output_dir"] = str(tmp_path / "run")
    result = train(validate_recipe(raw, os.path.join(RECIPES, "vanilla.yaml")))
    via_recipe = AutoModelForCausalLM.from_pretrained(result.final_dir)

    path = testbed.build(log=lambda s: None, **TINY)
    assert path.parent == tmp_path / "cache" / "testbed"  # the recipe built it there; this call loaded it
    via_api = testbed.finetune(path, "sub", steps=10, lr=3e-3, batch_size=8)
    base = testbed.load(path)[0]
    for (name, a), (_, b), (_, _start) in zip(
        via_recipe.state_dict().items(), via_api.state_dict().items(), base.state_dict().items()
    ):
        assert (a - b).abs().max() < 1e-4, name
    moved = max((a - s).abs().max() for a, s in zip(via_api.parameters(), base.parameters()))
    assert moved > 1e-2


# -- the suite ------------------------------------------------------------------------------------------------------


def test_suite_roles_and_held_out_documents(monkeypatch):
    from llmreg.eval.suite import load_suite

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = load_suite(SUITE)
    assert [e.task for e in suite.target] == ["testbed_sub"]
    assert [e.task for e in suite.retain] == [f"testbed_{s}" for s in S.OLD_SKILLS]
    docs = S.eval_dataset("recall")["test"]
    assert list(zip(docs["prompt"], docs["answer"])) == S.make_examples("recall", 200, split="eval")
    train_prompts = {p for p, _ in S.make_examples("sub", 3000, split="train")}
    assert not train_prompts & set(S.eval_dataset("sub", eval_n=50)["test"]["prompt"])


def test_suite_exact_match_agrees_with_evaluate_all(tmp_path, monkeypatch):
    """On a tiny model that learned `copy` part-way (a score strictly between 0 and 1), every task's suite score
    equals evaluate_all's."""
    from llmreg.eval.run import evaluate_suite

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = testbed.build(
        cache_dir=tmp_path,
        size="tiny",
        steps=500,
        lr=3e-3,
        warmup=10,
        batch_size=32,
        skills=["copy"],
        eval_n=50,
        log=lambda s: None,
    )
    model, tok, _ = testbed.load(path)
    direct = testbed.evaluate_all(model, tok, eval_n=50)
    assert 0.0 < direct["copy"] < 1.0, direct
    scores = evaluate_suite(SUITE, model, tok, limit=50, batch_size=32)
    assert {t: scores[f"testbed_{t}"] for t in S.SKILLS} == direct
    assert set(scores.metrics.values()) == {"exact_match,none"}
