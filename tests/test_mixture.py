"""Data mixtures (`data.train` as a list of sources, `data.mix`) and replay: the draw follows the weights, concat
and the stopping strategies, row formats brought to one schema, text-file sources with `skip`, validation before
anything loads, the resolved recipe.yaml, and training through the chat template with assistant-only loss."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from llmreg.core.options import ConfigError
from llmreg.recipe import dump_recipe, load_recipe, validate_recipe
from llmreg.recipe.build import load_sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(REPO, "..", "shared", "data"))
STORIES_MODEL = os.path.join(DATA, "models", "stories260K")
GSM8K = os.path.join(DATA, "gsm8k", "train.jsonl")
TINYSTORIES = os.path.join(DATA, "tinystories", "tinystories_validation_first1000.txt")
CHAT = os.path.join(REPO, "recipes", "stories260k", "chat_example.jsonl")
TEMPLATE = os.path.join(REPO, "recipes", "chat_templates", "simple.jinja")
REPLAY = os.path.join(REPO, "recipes", "replay", "gsm8k_replay.yaml")


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def texts(tmp_path, name: str, n: int) -> str:
    """`name`.jsonl with n rows {"text": "<name> <i>"}."""
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(n)])


def recipe(tmp_path, train, mix=None, kind: str = "sft", **trainer) -> dict:
    data = {"train": train, **({"mix": mix} if mix is not None else {})}
    return {
        "model": {"config": {"size": "tiny"}, "dtype": "float32"},
        "tokenizer": {"builtin": "char"},
        "data": data,
        "trainer": {
            "kind": kind,
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            **({"activation_checkpointing": False} if kind in ("sft", "hf") else {}),
            **trainer,
        },
        "output_dir": str(tmp_path / "out"),
        "seed": 0,
    }


def mixed(tmp_path, train, mix=None, kind: str = "sft", **trainer):
    return load_sources(validate_recipe(recipe(tmp_path, train, mix, kind, **trainer)), "train")


# -- the draw ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(0.8, 0.2), (4, 1), (0.3, 0.7)])
def test_interleave_draws_sources_in_proportion_to_their_weights(tmp_path, weights):
    """5000 rows of a seeded two-source mixture: each source's share is its normalised weight within 2 points."""
    a, b = texts(tmp_path, "a", 8000), texts(tmp_path, "b", 8000)
    train = [{"path": a, "weight": weights[0]}, {"path": b, "weight": weights[1]}]
    ds = mixed(tmp_path, train, {"seed": 3})
    rows = ds.select(range(5000))["text"]
    share_a = sum(r.startswith("a ") for r in rows) / 5000
    assert abs(share_a - weights[0] / sum(weights)) < 0.02, share_a
    # rows of each source come in their own order (interleave does not shuffle within a source)
    assert [r for r in rows if r.startswith("b ")][:3] == ["b 0", "b 1", "b 2"]
    again = mixed(tmp_path, train, {"seed": 3})
    assert again["text"] == ds["text"]  # the seed fixes the draw
    other = mixed(tmp_path, train, {"seed": 4})
    assert other["text"][:200] != ds["text"][:200]


def test_stopping_strategies_and_unweighted_alternation(tmp_path):
    a, b = texts(tmp_path, "a", 3), texts(tmp_path, "b", 5)
    first = mixed(tmp_path, [a, b])  # no weights: one row of each in turn, ending when a runs out
    assert first["text"] == ["a 0", "b 0", "a 1", "b 1", "a 2", "b 2"]
    every = mixed(tmp_path, [a, b], {"stopping": "all_exhausted"})  # a starts again until b's last row was drawn
    assert every["text"] == ["a 0", "b 0", "a 1", "b 1", "a 2", "b 2", "a 0", "b 3", "a 1", "b 4"]
    weighted = mixed(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 1}], {"stopping": "all_exhausted"})
    assert {f"a {i}" for i in range(3)} | {f"b {i}" for i in range(5)} <= set(weighted["text"])
    short = mixed(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 1}])
    assert sum(r.startswith("a ") for r in short["text"]) == 3 or sum(r.startswith("b ") for r in short["text"]) == 5


def test_concat_keeps_every_row_once_in_source_order_with_skip_and_max_examples(tmp_path):
    a, b = texts(tmp_path, "a", 6), texts(tmp_path, "b", 6)
    ds = mixed(tmp_path, [{"path": a, "skip": 4}, {"path": b, "skip": 1, "max_examples": 2}], {"strategy": "concat"})
    assert ds["text"] == ["a 4", "a 5", "b 1", "b 2"]


def test_single_source_list_and_single_source_are_the_same_rows(tmp_path):
    a = texts(tmp_path, "a", 5)
    one = validate_recipe(recipe(tmp_path, a))
    assert one.data.mix is None and not isinstance(one.data.train, list)
    assert load_sources(one, "train")["text"] == mixed(tmp_path, [a])["text"] == [f"a {i}" for i in range(5)]


# -- one schema ---------------------------------------------------------------------------------------------


def test_text_next_to_prompt_completion_becomes_a_pair_with_an_empty_prompt(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": "1+1?", "a": "2", "extra": 7}])
    train = [{"path": qa, "prompt_field": "q", "completion_field": "a"}, texts(tmp_path, "t", 1)]
    ds = mixed(tmp_path, train, {"strategy": "concat"})
    assert ds.column_names == ["prompt", "completion"]
    assert ds.to_list() == [{"prompt": "1+1?", "completion": "2"}, {"prompt": "", "completion": "t 0"}]


def test_any_conversational_source_makes_every_source_messages(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": "1+1?", "a": "2"}])
    chat_pair = write_jsonl(
        tmp_path / "pair.jsonl",
        [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}],
    )
    train = [CHAT, {"path": qa, "prompt_field": "q", "completion_field": "a"}, texts(tmp_path, "t", 1), chat_pair]
    ds = mixed(tmp_path, train, {"strategy": "concat"}, chat_template_path=TEMPLATE)
    assert ds.column_names == ["messages"]
    first_chat = json.loads(open(CHAT).readline())["messages"]
    rows = ds["messages"]
    assert rows[0] == first_chat
    assert rows[-3:] == [
        [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
        [{"role": "assistant", "content": "t 0"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    ]


def test_grpo_mixture_keeps_the_columns_every_source_has(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"q": "1+1?", "a": "2", "id": 1, "src": "x"}])
    two = write_jsonl(tmp_path / "two.jsonl", [{"q": "2+2?", "a": 4, "id": 2}])
    train = [{"path": p, "prompt_field": "q", "completion_field": "a"} for p in (one, two)]
    # prompt_field/completion_field keep only the two columns; the int answer is cast to the first source's string
    ds = mixed(tmp_path, train, {"strategy": "concat"}, kind="grpo")
    assert ds.to_list() == [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4"}]


# -- text files ------------------------------------------------------------------------------------------------


def test_text_file_rows_are_paragraphs_or_lines_with_skip(tmp_path):
    (tmp_path / "t.txt").write_text("one a\none b\n\n\ntwo\n\nthree\n")
    path = str(tmp_path / "t.txt")
    assert mixed(tmp_path, path)["text"] == ["one a\none b", "two", "three"]
    assert mixed(tmp_path, {"path": path, "separator": "\n"})["text"] == ["one a", "one b", "two", "three"]
    assert mixed(tmp_path, {"path": path, "skip": 1, "max_examples": 1})["text"] == ["two"]
    hf = validate_recipe(recipe(tmp_path, {"path": path, "skip": 2}, kind="hf"))
    assert load_sources(hf, "train")["text"] == ["three"]


def test_tinystories_replay_rows_are_disjoint_from_the_evaluated_paragraphs():
    """The retain task tinystories_ppl scores the file's first `limit` non-blank lines (lm-eval's documents); the
    replay recipe's `skip` starts after every one of them (a few paragraphs of the file span two lines)."""
    from llmreg.recipe.sources import read_text_rows

    raw = yaml.safe_load(open(REPLAY))
    replay = next(s for s in raw["data"]["train"] if "tinystories" in s["path"])
    limit = yaml.safe_load(open(os.path.join(REPO, "eval", "suites", "stories260k.yaml")))["limit"]
    evaluated = [line.strip() for line in open(TINYSTORIES) if line.strip()][:limit]
    rows = read_text_rows(TINYSTORIES)
    replayed = rows[replay["skip"] :]
    assert len(replayed) > 3000
    assert not any(doc in row for row in replayed for doc in evaluated)
    assert all(any(doc in row for row in rows[: replay["skip"]]) for doc in evaluated)  # the check can fail


# -- validation -----------------------------------------------------------------------------------------------


def _bad_cases(tmp_path):
    a, b = texts(tmp_path, "a", 4), texts(tmp_path, "b", 4)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": "2"}])
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [{"chosen": "pc", "rejected": "pr"}])
    w = lambda p, x: {"path": p, "weight": x}  # noqa: E731
    return [
        ([w(a, 0.8), w(b, 0)], None, "sft", "data.train[1]: weight must be > 0, got 0.0"),
        ([w(a, 0.8), w(b, -1)], None, "sft", "data.train[1]: weight must be > 0, got -1.0"),
        ([w(a, 0.8), w(b, "heavy")], None, "sft", "data.train[1].weight: expected float or None, got 'heavy'"),
        ([w(a, 0.8), w(b, float("inf"))], None, "sft", "data.train[1].weight: must be a positive finite number"),
        ([w(a, 0.8), b], None, "sft", "data.train[1]: missing weight; set a weight on every source"),
        ([w(a, 1), w(b, 1)], {"strategy": "concat"}, "sft", "data.train[0].weight: strategy concat keeps"),
        ([a, b], {"strategy": "concat", "stopping": "all_exhausted"}, "sft", "data.mix.stopping: only for"),
        ([a, b], {"strategy": "interleaved"}, "sft", "data.mix.strategy: unknown strategy 'interleaved'; did you"),
        ([a, b], {"stopping": "all_exausted"}, "sft", "data.mix.stopping: unknown stopping 'all_exausted'; did you"),
        ([a, b], {"sead": 1}, "sft", "data.mix: unknown key 'sead'; did you mean 'seed'?"),
        (
            [a, {"path": qa, "prompt_field": "qestion", "completion_field": "answer"}],
            None,
            "sft",
            "data.train[1].prompt_field: 'qestion' is not a column of qa.jsonl; did you mean 'question'? "
            "(columns: question, answer)",
        ),
        ([a, str(tmp_path / "missing.jsonl")], None, "sft", "data.train[1]: data file not found"),
        ([a, {"path": b, "skip": 4}], None, "sft", "data.train[1].skip: skips 4 rows, and"),
        ([a, {"path": b, "separator": "\n"}], None, "sft", "data.train[1].separator: splits a text file"),
        ([pref, implicit], None, "dpo", "data.train[1]: its rows are 'chosen + rejected' but data.train[0]'s"),
        ([], None, "sft", "data.train: an empty list"),
        ([a, 3], None, "sft", "data.train[1]: expected a path or a mapping"),
        (w(a, 2), None, "sft", "data.train.weight: a weight belongs to a source of a list"),
        (a, {"seed": 1}, "sft", "data.mix: mixes a list of sources; data.train is one source"),
    ]


def test_bad_mixtures_are_one_line_errors_naming_the_source(tmp_path):
    for train, mix, kind, message in _bad_cases(tmp_path):
        with pytest.raises(ConfigError) as info:
            validate_recipe(recipe(tmp_path, train, mix, kind))
        assert str(info.value).startswith(message), (message, str(info.value))
        assert "\n" not in str(info.value)


def test_eval_list_and_pretrain_mixture_are_refused(tmp_path):
    a, b = texts(tmp_path, "a", 4), texts(tmp_path, "b", 4)
    raw = recipe(tmp_path, a)
    raw["data"]["eval"] = [a, b]
    with pytest.raises(ConfigError, match=r"^data.eval: one source \(a list of sources is a training mixture"):
        validate_recipe(raw)
    raw = recipe(tmp_path, [a, b], kind="hf")
    raw["data"]["pretrain"] = {"block_size": 8}
    with pytest.raises(ConfigError, match="^data.train: a list of sources .a mixture. is not supported with data.pr"):
        validate_recipe(raw)


# -- the run ----------------------------------------------------------------------------------------------------


def test_mixture_trains_and_recipe_yaml_records_and_rebuilds_it(tmp_path):
    """A two-source mixture reaches the trainer (rows of both sources in its tokenized dataset), trains, and the
    run's recipe.yaml holds sources, weights, strategy, stopping and seed; loading it gives the same mixture."""
    from llmreg.recipe.run import RECIPE_FILE, train

    a = texts(tmp_path, "alpha", 40)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"beta {i}?", "a": str(i)} for i in range(40)])
    sources = [{"path": a, "weight": 0.7}, {"path": qa, "prompt_field": "q", "completion_field": "a", "weight": 0.3}]
    spec = validate_recipe(recipe(tmp_path, sources, {"seed": 5}, max_length=32))
    result = train(spec)
    assert result.global_step == 2
    tok_texts = [result.trainer.processing_class.decode(r["input_ids"]) for r in result.trainer.train_dataset]
    assert any("alpha" in t for t in tok_texts) and any("beta" in t for t in tok_texts)
    written = yaml.safe_load(open(os.path.join(spec.output_dir, RECIPE_FILE)))
    assert written["data"]["mix"] == {"strategy": "interleave", "stopping": "first_exhausted", "seed": 5}
    assert [s["weight"] for s in written["data"]["train"]] == [0.7, 0.3]
    assert written["data"]["train"][1]["prompt_field"] == "q"
    again = load_recipe(os.path.join(spec.output_dir, RECIPE_FILE))
    assert again.data == spec.data
    assert load_sources(again, "train").to_list() == load_sources(spec, "train").to_list()


def test_resolved_mixture_round_trips_through_dump_and_load(tmp_path):
    a = texts(tmp_path, "a", 4)
    raw = recipe(
        tmp_path, [{"path": a, "weight": 2}, {"path": "builtin:arithmetic", "weight": 1}], {"stopping": "all_exhausted"}
    )
    spec = validate_recipe(raw)
    assert spec.data.mix.seed == 0  # the recipe's seed
    dump_recipe(spec, str(tmp_path / "resolved.yaml"))
    again = load_recipe(str(tmp_path / "resolved.yaml"))
    assert again.to_dict() == spec.to_dict() and again.data == spec.data
    concat = validate_recipe(recipe(tmp_path, [a, a], {"strategy": "concat"}))
    assert concat.to_dict()["data"]["mix"] == {"strategy": "concat"}
    assert validate_recipe(concat.to_dict()).data == concat.data


def test_messages_mixture_trains_on_exactly_the_assistant_turns(tmp_path, monkeypatch):
    """`messages` JSONL mixed with prompt/completion GSM8K (made a user + assistant conversation): TRL formats
    every row with the chat template, and with assistant_only_loss the trained tokens (labels != -100) are exactly
    the assistant turns, each ending with EOS, and nothing else."""
    from llmreg.recipe.build import build_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources = [
        {"path": CHAT, "max_examples": 6},
        {"path": GSM8K, "prompt_field": "question", "completion_field": "answer", "max_examples": 6},
    ]
    raw = recipe(
        tmp_path,
        sources,
        {"strategy": "concat"},
        chat_template_path=TEMPLATE,
        assistant_only_loss=True,
        max_length=512,
        save_strategy="no",
    )
    raw["model"] = {"name_or_path": STORIES_MODEL, "dtype": "float32"}
    raw.pop("tokenizer")
    spec = validate_recipe(raw)
    run = build_run(spec)
    tok, ds = run.tokenizer, run.trainer.train_dataset
    chats = [json.loads(line)["messages"] for line in open(CHAT)][:6]
    qa = [json.loads(line) for line in open(GSM8K)][:6]
    expected = [[m["content"] for m in c if m["role"] == "assistant"] for c in chats] + [[r["answer"]] for r in qa]
    assert len(ds) == len(expected) == 12
    for row, answers in zip(ds, expected):
        trained = _runs(row["input_ids"], row["labels"])
        assert [tok.decode(t).strip() for t in trained] == [a + tok.eos_token for a in answers]
    run.trainer.train()
    assert run.trainer.state.global_step == 2


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive trained positions (label == id; every other label is -100)."""
    out, current = [], []
    for i, label in zip(ids, labels):
        assert label in (i, -100)
        if label != -100:
            current.append(i)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def test_replay_recipe_validates_and_trains_a_few_steps(tmp_path, monkeypatch):
    from llmreg.recipe.run import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = ["data.train.0.max_examples=64", "data.train.1.max_examples=64", "eval_during_training=null"]
    spec = load_recipe(REPLAY, [*overrides, "trainer.max_steps=2", f"output_dir={tmp_path / 'run'}"])
    assert [s.weight for s in spec.data.train] == [0.8, 0.2] and spec.data.mix.strategy == "interleave"
    assert train(spec).global_step == 2


def test_pretrain_reads_a_text_source_with_its_skip_and_separator(tmp_path):
    from llmreg.pretrain.data import _source_documents
    from llmreg.recipe.schema import SourceSpec

    (tmp_path / "t.txt").write_text("a\nb\n\nc\n\nd\n")
    path = str(tmp_path / "t.txt")
    assert _source_documents(SourceSpec(path=path, skip=1, max_examples=1), "\n\n", "train") == ["c"]
    assert _source_documents(SourceSpec(path=path, skip=1, separator="\n"), "\n\n", "train") == ["b", "c", "d"]
