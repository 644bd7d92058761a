"""stories260K (a real pretrained TinyStories Llama) forgets TinyStories when fine-tuned on GSM8K: the shipped
recipe, reduced, end to end through the recipe and eval APIs; and the prompt/completion column mapping it uses."""

from __future__ import annotations

import json
import os

import pytest

from llmreg.core.options import ConfigError
from llmreg.recipe import load_recipe, validate_recipe
from llmreg.recipe.sources import load_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "stories260k", "gsm8k_sft.yaml")
SUITE = os.path.join(REPO, "eval", "suites", "stories260k.yaml")
DATA = os.path.abspath(os.path.join(REPO, "..", "shared", "data"))
MODEL = os.path.join(DATA, "models", "stories260K")
GSM8K = os.path.join(DATA, "gsm8k", "train.jsonl")


def test_fine_tuning_on_gsm8k_forgets_tinystories(tmp_path, monkeypatch):
    from llmreg.eval.run import evaluate_suite, forgetting_report, write_report
    from llmreg.eval.suite import load_suite
    from llmreg.recipe.run import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe(
        RECIPE,
        [
            "trainer.max_steps=40",
            "trainer.warmup_steps=4",
            "trainer.save_steps=40",
            "eval_during_training.every_steps=20",
            "eval_during_training.limit=4",
            "data.train.max_examples=400",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    assert recipe.model.name_or_path == MODEL  # resolved relative to the recipe file, from any cwd
    result = train(recipe)
    assert result.global_step == 40

    suite = load_suite(SUITE)
    base = evaluate_suite(suite, MODEL, limit=10)
    tuned = evaluate_suite(suite, result.final_dir, limit=10)
    assert tuned["tinystories_ppl"] > 1.3 * base["tinystories_ppl"]  # forgot stories
    assert tuned["gsm8k_ppl"] < 0.5 * base["gsm8k_ppl"]  # learnt GSM8K text

    report = forgetting_report(base, {"gsm8k_sft": tuned}, suite)
    files = write_report(report, str(tmp_path / "report"))
    saved = json.load(open(tmp_path / "report" / "forgetting_report.json"))["runs"]["gsm8k_sft"]
    assert saved["forgetting"] == pytest.approx(tuned["tinystories_ppl"] - base["tinystories_ppl"])
    assert saved["forgetting"] > 0
    assert saved["target_gain"] > 0 and saved["tasks"]["tinystories_ppl"]["role"] == "retain"
    md = open(tmp_path / "report" / "forgetting_report.md").read()
    assert (
        f"| tinystories_ppl | retain | word_perplexity,none (lower is better) | {base['tinystories_ppl']:.4g} "
        f"| {tuned['tinystories_ppl']:.4g} |" in md
    )
    assert all(os.path.getsize(f) > 0 for f in files)

    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    during = {r["step"]: r["eval/tinystories_ppl"] for r in rows if "eval/tinystories_ppl" in r}
    assert sorted(during) == [20, 40]  # the recipe's eval_during_training section ran


# -- prompt_field / completion_field ----------------------------------------------------------------------------


def _recipe(train) -> dict:
    return {"model": {"name_or_path": MODEL}, "data": {"train": train}, "trainer": {"kind": "sft", "max_steps": 1}}


@pytest.mark.parametrize(
    "train, message",
    [
        ({"path": GSM8K, "prompt_field": "question"}, "set prompt_field and completion_field together"),
        ({"path": GSM8K, "completion_field": "answer"}, "set prompt_field and completion_field together"),
        (
            {"path": GSM8K, "prompt_field": "question", "completion_field": "answer", "text_field": "question"},
            "text_field or prompt_field/completion_field, not both",
        ),
        ({"path": GSM8K, "prompt_field": "answer", "completion_field": "answer"}, "name the same column 'answer'"),
        ({"path": "builtin:arithmetic", "prompt_field": "q", "completion_field": "a"}, "built-in data already"),
        ({"path": GSM8K, "promt_field": "question"}, "unknown key 'promt_field'; did you mean 'prompt_field'"),
        ({"path": GSM8K, "prompt_field": 3, "completion_field": "answer"}, "prompt_field: expected str"),
    ],
)
def test_column_mapping_errors(train, message):
    with pytest.raises(ConfigError, match=message):
        validate_recipe(_recipe(train))


def test_column_mapping_loads_prompt_completion():
    recipe = validate_recipe(
        _recipe({"path": GSM8K, "prompt_field": "question", "completion_field": "answer", "max_examples": 3})
    )
    ds = load_source(recipe.data.train, "sft", "train")
    first = json.loads(open(GSM8K).readline())
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 3
    assert ds[0] == {"prompt": first["question"], "completion": first["answer"]}

    # a mapped column that does not exist is refused at validation (the data check reads the first rows), before
    # anything loads
    with pytest.raises(ConfigError, match="data.train.completion_field: 'solution' is not a column"):
        validate_recipe(_recipe({"path": GSM8K, "prompt_field": "question", "completion_field": "solution"}))


# -- chat data: `messages` rows and trainer.chat_template_path ----------------------------------------------------

CHAT_RECIPE = os.path.join(REPO, "recipes", "stories260k", "chat_sft.yaml")
TEMPLATE = os.path.join(REPO, "recipes", "chat_templates", "simple.jinja")


def test_chat_recipe_trains_on_messages_with_the_shipped_template(tmp_path, monkeypatch):
    """The README's `messages` example: stories260K has no chat template; the shipped one is applied, and with
    assistant_only_loss the loss covers only the assistant turns the template marks."""
    from transformers import AutoTokenizer

    from llmreg.recipe.run import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the recipe's paths resolve against its own folder from anywhere
    recipe = load_recipe(CHAT_RECIPE, ["trainer.max_steps=2", "trainer.save_steps=2", "output_dir=run"])
    assert recipe.trainer.args["chat_template_path"] == TEMPLATE
    assert recipe.output_dir == str(tmp_path / "run")  # output_dir: against the working directory
    result = train(recipe)
    assert result.global_step == 2
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    rows = [json.loads(line) for line in open(recipe.data.train.path)]
    text = tok.apply_chat_template(rows[1]["messages"], tokenize=False)
    assert text.startswith("User: Tell me a story about") and "\nAssistant: Once upon a time" in text
    assert text.endswith(f"The end.{tok.eos_token}\n")
    masked = tok.apply_chat_template(rows[1]["messages"], return_dict=True, return_assistant_tokens_mask=True)
    answer = [i for i, m in zip(masked["input_ids"], masked["assistant_masks"]) if m]
    assert tok.decode(answer).strip() == rows[1]["messages"][1]["content"] + tok.eos_token


def _chat(**trainer) -> dict:
    return {
        "model": {"name_or_path": MODEL},
        "data": {"train": os.path.join(REPO, "recipes", "stories260k", "chat_example.jsonl")},
        "trainer": {"kind": "sft", "max_steps": 1, **trainer},
    }


def test_chat_template_path_is_checked_before_loading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "template.txt").write_text("{{ messages }}")
    (tmp_path / "folder").mkdir()
    cases = [
        ("no/such/template.jinja", f"file not found: no/such/template.jinja (looked for {tmp_path}/no/such"),
        ("missing.jinja", "trainer.chat_template_path: file not found: missing.jinja"),
        ("template.txt", "is a file but not a template"),
        ("folder", "folder without tokenizer_config.json"),
    ]
    for value, message in cases:
        with pytest.raises(ConfigError) as info:
            validate_recipe(_chat(chat_template_path=value))
        assert message in str(info.value), value
    assert validate_recipe(_chat(chat_template_path=TEMPLATE)).trainer.args["chat_template_path"] == TEMPLATE
    assert validate_recipe(_chat(chat_template_path=MODEL)).trainer.args["chat_template_path"] == MODEL
    hub = validate_recipe(_chat(chat_template_path="owner/tokenizer"))  # a hub id, cloned by TRL at build time
    assert hub.trainer.args["chat_template_path"] == "owner/tokenizer"
    with pytest.raises(ConfigError, match="trainer: unknown key 'chat_template_path'"):  # only SFTConfig has it
        validate_recipe(
            {**_chat(chat_template_path=TEMPLATE), "trainer": {"kind": "dpo", "chat_template_path": TEMPLATE}}
        )
