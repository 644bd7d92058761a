"""The RLVR setting: verifiable rewards, GSM8K prompt data for GRPO, and the rlvr recipes."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, SHARED

from llmreg.data.builtin import exact_answer_reward
from llmreg.data.rewards import gold_number, numeric_answer_reward, predicted_number
from llmreg.recipe.loader import load_recipe
from llmreg.recipe.sources import load_source

GSM8K = os.path.join(SHARED, "data", "gsm8k", "train.jsonl")


def test_numeric_answer_reward():
    answers = ["She has 3 + 4 = 7 apples.\n#### 7", "#### 1,200", "42", "#### -3"]
    completions = ["3 + 4 = 7, so #### 7", "The total is \\boxed{1200}.", "first 41 then 42", "it is 3"]
    assert numeric_answer_reward(completions, answers) == [1.0, 1.0, 1.0, 0.0]
    assert gold_number("x #### 12.50") == 12.5 and predicted_number("no number") is None
    assert numeric_answer_reward(["#### 8"], ["#### 7"]) == [0.0]
    assert numeric_answer_reward([[{"role": "assistant", "content": "#### 5"}]], ["5"]) == [1.0]


def test_exact_answer_reward_on_testbed_completions():
    assert exact_answer_reward(["45\n", "4", "145", ""], ["45", "45", "45", "45"]) == [1.0, 0.0, 0.0, 0.0]


def test_gsm8k_prompts_for_grpo():
    recipe = load_recipe(os.path.join(REPO, "recipes", "rlvr", "gsm8k_lp_reg_cluster.yaml"))
    assert os.path.realpath(recipe.data.train.path) == os.path.realpath(GSM8K)
    ds = load_source(recipe.data.train, "grpo", "train")
    assert ds.column_names == ["prompt", "answer"] and len(ds) == 7473
    with open(GSM8K) as f:
        first = json.loads(f.readline())
    assert ds[0]["prompt"] == first["question"]
    # the reference solutions themselves score 1
    rows = ds.select(range(50))
    assert numeric_answer_reward(rows["answer"], rows["answer"]) == [1.0] * 50
    assert recipe.trainer.reward == "numeric_answer" and recipe.regularizers[0]["name"] == "lp_reg"


@pytest.mark.parametrize("name", ["grpo", "grpo_entropy", "lp_reg"])
def test_cpu_recipes_share_everything_but_the_method(name):
    base = load_recipe(os.path.join(REPO, "recipes", "rlvr", "grpo.yaml"))
    recipe = load_recipe(os.path.join(REPO, "recipes", "rlvr", f"{name}.yaml"))
    args = dict(recipe.trainer.args)
    assert args.pop("entropy_coef") == (0.002 if name == "grpo_entropy" else 0.0)
    base_args = dict(base.trainer.args)
    base_args.pop("entropy_coef")
    assert args == base_args and recipe.data == base.data and recipe.model == base.model
    assert (args["epsilon"], args["epsilon_high"], args["beta"], args["loss_type"]) == (1.0, 9.0, 0.0, "dapo")
    assert [r["name"] for r in recipe.regularizers] == (["lp_reg"] if name == "lp_reg" else [])


def test_testbed_rollouts_stop_at_the_newline(tmp_path):
    from llmreg.recipe.build import build_run

    recipe = load_recipe(
        os.path.join(REPO, "recipes", "rlvr", "lp_reg.yaml"),
        [
            "model.testbed={size: tiny, steps: 20, skills: [add]}",
            "data.num_examples=16",
            "trainer.per_device_train_batch_size=16",
            f"output_dir={tmp_path}",
        ],
    )
    run = build_run(recipe)
    newline = run.tokenizer.convert_tokens_to_ids("\n")
    assert newline in run.trainer.eos_token_ids and run.tokenizer.eos_token_id in run.trainer.eos_token_ids
