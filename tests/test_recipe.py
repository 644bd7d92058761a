"""Recipes: validation before anything loads, overrides, paths, data sources, build_run per trainer kind."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from llmreg.core.options import ConfigError
from llmreg.integrations.checkpoints import COMPLETE_MARKER
from llmreg.recipe import apply_overrides, build_run, dump_recipe, load_recipe, validate_recipe
from llmreg.recipe.callbacks import MetricsJsonlCallback, read_metrics
from llmreg.recipe.run import resume_checkpoint, train
from llmreg.recipe.sources import load_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "recipes", "quickstart.yaml")


def tiny_recipe(out_dir, **sections) -> dict:
    """A small valid recipe as a dict; `sections` replace whole top-level entries."""
    raw = {
        "model": {"config": {"size": "tiny"}},
        "data": {"train": "builtin:arithmetic", "num_examples": 32},
        "trainer": {"kind": "sft", "max_steps": 2, "per_device_train_batch_size": 4},
        "regularizers": [{"name": "l2_sp", "lam": 0.01}],
        "output_dir": str(out_dir),
    }
    raw.update(sections)
    return raw


def write_recipe(path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Make every way of loading a model, a tokenizer or data fail the test if it is used."""
    import datasets
    import transformers

    import llmreg.data
    import llmreg.recipe.build
    import llmreg.recipe.sources

    def boom(*args, **kwargs):
        raise AssertionError("validation loaded a model, a tokenizer or data")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        for name in ("from_pretrained", "from_config"):
            if hasattr(cls, name):
                monkeypatch.setattr(cls, name, boom)
    for module, name in (
        (llmreg.data, "tiny_llama"),
        (llmreg.data, "build_char_tokenizer"),
        (llmreg.data, "make_builtin_dataset"),
        (datasets, "load_dataset"),
        (datasets, "load_from_disk"),
        (llmreg.recipe.build, "build_model"),
        (llmreg.recipe.build, "build_tokenizer"),
        (llmreg.recipe.sources, "load_source"),
    ):
        monkeypatch.setattr(module, name, boom)


def test_nothing_loads_fixture_catches_loading(tmp_path, nothing_loads):
    recipe = validate_recipe(tiny_recipe(tmp_path / "out"))
    with pytest.raises(AssertionError, match="loaded a model"):
        build_run(recipe)


# -- bad input: a one-line ConfigError before anything loads -------------------------------------

BAD_OVERRIDES = [
    ("modle.config.size=tiny", "recipe: unknown key 'modle'; did you mean 'model'?"),
    ("trainer.learnin_rate=1e-5", "trainer: unknown key 'learnin_rate'; did you mean 'learning_rate'?"),
    ("trainer.learning_rate=abc", "trainer.learning_rate: expected float, got 'abc'"),
    ("trainer.max_steps=1.5", "trainer.max_steps: expected int"),
    ("trainer.kind=sfft", "did you mean 'sft'?"),
    ("trainer.lr_scheduler_type=cosin", "did you mean 'cosine'?"),
    ("trainer.output_dir=x", "set output_dir at the top level"),
    ("regularizers.0.name=l2sp", "regularizers.0: unknown regularizer 'l2sp'; did you mean 'l2_sp'?"),
    ("regularizers.0.lamb=0.1", "regularizers.0: unknown key 'lamb'; did you mean 'lam'?"),
    ("regularizers.0.lam=strong", "regularizers.0.lam: expected float"),
    (
        "model.config.num_hidden_layer=4",
        "model.config: unknown key 'num_hidden_layer'; did you mean 'num_hidden_layers'?",
    ),
    ("model.config.size=huge", "model.config.size: unknown value 'huge'"),
    ("model.dtype=fp32", "did you mean 'float32'?"),
    ("model.name_or_path=./no/such/model", "set exactly one of name_or_path"),
    ("tokenizer.builtin=bpe", "tokenizer.builtin: unknown value 'bpe'"),
    ("data.train=data/missing.jsonl", "data.train: data file not found: data/missing.jsonl"),
    ("data.eval=missing.csv", "data.eval: data file not found: missing.csv"),
    ("data.train=builtin:arithmetc", "did you mean 'builtin:arithmetic'?"),
    ("data.train=gsm8k", "write hub:gsm8k for a hub dataset"),
    ("data.train=hub:gsm8k", "needs the hub, but HF_HUB_OFFLINE is set"),
    ("data.num_exampels=5", "data: unknown key 'num_exampels'; did you mean 'num_examples'?"),
    ("peft.rr=8", "peft: unknown key 'rr'; did you mean 'r'?"),
    ("trainer.deepspeed=no_such_ds.json", "trainer.deepspeed: file not found: no_such_ds.json"),
    ("trainer.reward=exact_answer", "only trainer kind 'grpo' takes a reward"),
]


@pytest.mark.parametrize("override,message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_input_is_one_line_config_error_before_loading(tmp_path, monkeypatch, nothing_loads, override, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out"))
    with pytest.raises(ConfigError) as info:
        load_recipe(path, [override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert not (tmp_path / "out").exists()


def test_deepspeed_config_with_optimizer_block_is_refused(tmp_path, nothing_loads):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}})
    )
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"^trainer\.deepspeed: DeepSpeed config has an 'optimizer' block") as info:
        load_recipe(path, [f"trainer.deepspeed={ds}"])
    assert "\n" not in str(info.value)


def test_shipped_deepspeed_configs_pass_and_resolve(tmp_path, monkeypatch, nothing_loads):
    monkeypatch.chdir(REPO)
    for name in sorted(os.listdir(os.path.join(REPO, "ds_configs"))):
        recipe = load_recipe(QUICKSTART, [f"trainer.deepspeed=ds_configs/{name}", f"output_dir={tmp_path}"])
        assert recipe.trainer.args["deepspeed"] == os.path.join(REPO, "ds_configs", name)


def test_yaml_that_is_not_a_mapping_or_not_yaml(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.yaml").write_text("model: {config: [\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_recipe(str(tmp_path / "list.yaml"))
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_recipe(str(tmp_path / "bad.yaml"))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(str(tmp_path / "absent.yaml"))


def test_missing_sections_and_keys(tmp_path):
    raw = tiny_recipe(tmp_path)
    for section in ("model", "data", "trainer"):
        broken = {k: v for k, v in raw.items() if k != section}
        with pytest.raises(ConfigError, match=f"missing section '{section}'"):
            validate_recipe(broken)
    with pytest.raises(ConfigError, match="trainer: missing key 'kind'"):
        validate_recipe({**raw, "trainer": {"max_steps": 2}})
    with pytest.raises(ConfigError, match="data: missing key 'train'"):
        validate_recipe({**raw, "data": {"num_examples": 3}})
    with pytest.raises(ConfigError, match="regularizers.0: missing key 'name'"):
        validate_recipe({**raw, "regularizers": [{"lam": 0.1}]})


# -- overrides --------------------------------------------------------------------------------------


def test_apply_overrides_dotted_list_index_and_nesting():
    raw = {
        "trainer": {"kind": "sft"},
        "regularizers": [{"name": "l2_sp", "lam": 0.01}],
        "peft": None,
        "model": {"config": {"size": "tiny"}},
    }
    out = apply_overrides(
        raw,
        [
            "trainer.learning_rate=1e-5",
            "regularizers.0.lam=0.1",
            "model.config.num_hidden_layers=4",
            "regularizers.1.name=weight_decay",
            "peft.r=8",
            "trainer.report_to=[tensorboard]",
            "output_dir=",
        ],
    )
    # YAML 1.1: '1e-5' stays a string here; validation coerces it (test below)
    assert out["trainer"] == {"kind": "sft", "learning_rate": "1e-5", "report_to": ["tensorboard"]}
    assert out["regularizers"] == [{"name": "l2_sp", "lam": 0.1}, {"name": "weight_decay"}]
    assert out["model"]["config"] == {"size": "tiny", "num_hidden_layers": 4}
    assert out["peft"] == {"r": 8}
    assert out["output_dir"] is None
    assert raw["regularizers"][0]["lam"] == 0.01 and raw["peft"] is None  # the input is not modified


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.learning_rate", "expected key=value"),
        ("trainer..lr=1", "empty component"),
        ("regularizers.5.lam=1", "index 5 is out of range"),
        ("regularizers.first.lam=1", "must be a number"),
        ("trainer.kind.x=1", "trainer.kind is 'sft', not a mapping or list"),
        ("trainer.x=[1,", "not valid YAML"),
    ],
)
def test_bad_overrides(override, message):
    raw = {"trainer": {"kind": "sft"}, "regularizers": [{"name": "l2_sp"}]}
    with pytest.raises(ConfigError, match=message) as info:
        apply_overrides(raw, [override])
    assert "\n" not in str(info.value)


def test_overrides_are_validated_and_coerced(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out"))
    assert isinstance(yaml.safe_load("1e-5"), str)  # why coercion is needed at all
    recipe = load_recipe(
        path,
        [
            "trainer.learning_rate=1e-5",
            "regularizers.0.lam=0.1",
            "model.config.num_hidden_layers=4",
            "trainer.weight_decay=0",
        ],
    )
    assert recipe.trainer.args["learning_rate"] == 1e-5 and isinstance(recipe.trainer.args["learning_rate"], float)
    assert recipe.regularizers == [{"name": "l2_sp", "lam": 0.1}]
    assert recipe.model.config == {"size": "tiny", "num_hidden_layers": 4}
    assert recipe.trainer.args["weight_decay"] == 0.0 and isinstance(recipe.trainer.args["weight_decay"], float)


def test_regularizer_shorthand_and_defaults(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path, regularizers=["l2_sp", {"name": "weight_decay"}]))
    assert [r["name"] for r in recipe.regularizers] == ["l2_sp", "weight_decay"]


# -- defaults, paths, round trip --------------------------------------------------------------------


def test_quickstart_recipe_validates(nothing_loads):
    recipe = load_recipe(QUICKSTART)
    assert recipe.trainer.kind in ("sft", "hf")
    assert recipe.model.config["size"] == "tiny" and recipe.tokenizer.builtin == "char"
    assert recipe.data.train.path == "builtin:arithmetic"
    assert recipe.regularizers == [{"name": "l2_sp", "lam": 0.01}]
    assert recipe.output_dir == os.path.abspath("runs/quickstart")


def test_defaults_filled_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_recipe(tmp_path, seed=7)
    del raw["output_dir"]
    recipe = validate_recipe(raw, recipe_path=str(tmp_path / "myexp.yaml"))
    args = recipe.trainer.args
    assert args["report_to"] == "none" and args["save_strategy"] == "steps" and args["logging_steps"] == 10
    assert args["seed"] == 7 and recipe.model.seed == 7
    assert recipe.output_dir == str(tmp_path / "runs" / "myexp")
    assert recipe.tokenizer.builtin == "char"
    assert recipe.data.train.num_examples == 32 and recipe.data.train.seed == 0


def test_eval_source_gets_its_own_builtin_seed_and_eval_schedule(tmp_path):
    recipe = validate_recipe(
        tiny_recipe(tmp_path, data={"train": "builtin:arithmetic", "eval": "builtin:arithmetic", "seed": 3})
    )
    assert (recipe.data.train.seed, recipe.data.eval.seed) == (3, 4)
    assert recipe.trainer.args["eval_strategy"] == "steps"
    explicit = validate_recipe(
        tiny_recipe(tmp_path, data={"train": "builtin:arithmetic", "eval": {"path": "builtin:arithmetic", "seed": 3}})
    )
    assert explicit.data.eval.seed == 3


def test_tokenizer_defaults_to_the_pretrained_model(tmp_path):
    model_dir = tmp_path / "my_model"
    model_dir.mkdir()
    recipe = validate_recipe(tiny_recipe(tmp_path, model={"name_or_path": str(model_dir)}))
    assert recipe.tokenizer.name_or_path == str(model_dir)
    hub = validate_recipe(tiny_recipe(tmp_path, model={"name_or_path": "someone/some-model"}))
    assert hub.model.name_or_path == "someone/some-model" == hub.tokenizer.name_or_path


def test_relative_paths_resolve_against_cwd_then_recipe_dir(tmp_path, monkeypatch):
    recipe_dir, cwd = tmp_path / "recipes", tmp_path / "work"
    recipe_dir.mkdir()
    cwd.mkdir()
    (recipe_dir / "train.jsonl").write_text('{"text": "a"}\n')
    path = write_recipe(recipe_dir / "r.yaml", tiny_recipe(tmp_path / "out", data={"train": "train.jsonl"}))
    monkeypatch.chdir(cwd)
    assert load_recipe(path).data.train.path == str(recipe_dir / "train.jsonl")
    (cwd / "train.jsonl").write_text('{"text": "b"}\n')
    assert load_recipe(path).data.train.path == str(cwd / "train.jsonl")


def test_not_found_errors_name_every_absolute_path_tried(tmp_path, monkeypatch):
    recipe_dir, cwd = tmp_path / "recipes", tmp_path / "work"
    recipe_dir.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    raw = tiny_recipe("out", data={"train": "../data/train.jsonl"})
    del raw["output_dir"]
    path = write_recipe(recipe_dir / "r.yaml", raw)
    tried = f"(looked for {tmp_path}/data/train.jsonl)"
    with pytest.raises(ConfigError) as info:  # both candidates are the same file here: named once
        load_recipe(path)
    assert str(info.value) == f"data.train: data file not found: ../data/train.jsonl {tried}"
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["data.train=sub/train.jsonl"])
    assert str(info.value).endswith(f"(looked for {cwd}/sub/train.jsonl, then {recipe_dir}/sub/train.jsonl)")
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["data.train=builtin:arithmetic", "model.name_or_path=./my/model", "model.config=null"])
    assert str(info.value) == (
        f"model.name_or_path: path not found: ./my/model (looked for {cwd}/my/model, then {recipe_dir}/my/model)"
    )
    with pytest.raises(ConfigError, match=f"recipe not found: nope.yaml \\(looked for {cwd}/nope.yaml\\)"):
        load_recipe("nope.yaml")
    # output_dir is a place to write: the working directory, never the recipe's folder
    ok = load_recipe(path, ["data.train=builtin:arithmetic", "output_dir=runs/x"])
    assert ok.output_dir == str(cwd / "runs" / "x")


def test_builtin_num_examples_zero_or_negative_is_an_error_not_the_default(tmp_path):
    for value in (0, -5):
        with pytest.raises(ConfigError) as info:
            validate_recipe(tiny_recipe(tmp_path, data={"train": "builtin:arithmetic", "num_examples": value}))
        # refused by the declared range at validation, before the builder's own check would see it
        assert str(info.value) == f"data.train: num_examples must be >= 1, got {value}"
    assert validate_recipe(tiny_recipe(tmp_path, data={"train": "builtin:arithmetic"})).data.train.num_examples == 1000


def test_num_examples_zero_exits_2_from_the_cli(tmp_path, capsys):
    from llmreg.cli import main

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out"))
    assert main(["validate", path, "data.num_examples=0"]) == 2
    assert capsys.readouterr().err == "error: data.train: num_examples must be >= 1, got 0\n"


def test_resolved_recipe_round_trips(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out", peft={"r": 4, "lora_alpha": 8}))
    recipe = load_recipe(
        path, [f"trainer.deepspeed={ds}", "trainer.learning_rate=3e-4", "data.eval=builtin:arithmetic"]
    )
    dump_recipe(recipe, str(tmp_path / "resolved.yaml"))
    again = load_recipe(str(tmp_path / "resolved.yaml"))
    assert again.to_dict() == recipe.to_dict()


# -- data sources -----------------------------------------------------------------------------------


def test_local_data_sources(tmp_path):
    from datasets import Dataset

    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.csv", "d.parquet", "saved"):
        data = {"train": {"path": str(tmp_path / name), "max_examples": 4, "text_field": "question"}}
        recipe = validate_recipe(tiny_recipe(tmp_path / "out", data=data))
        ds = load_source(recipe.data.train, "sft", "train")
        assert len(ds) == 4 and ds["text"] == ["q0", "q1", "q2", "q3"], name


def test_unusable_local_sources(tmp_path):
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "d.bin").write_text("x")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    cases = [
        ({"train": str(tmp_path / "plain_dir")}, "not written by Dataset.save_to_disk"),
        ({"train": str(tmp_path / "d.bin")}, "unsupported data file"),
        ({"train": {"path": str(tmp_path / "d.jsonl"), "split": "test"}}, "a single file has no split 'test'"),
        ({"train": {"file": "x.jsonl"}}, "data.train: missing key 'path'"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate_recipe(tiny_recipe(tmp_path / "out", data=data))


@pytest.mark.parametrize(
    "kind,columns",
    [
        ("hf", {"text"}),
        ("sft", {"prompt", "completion"}),
        ("dpo", {"prompt", "chosen", "rejected"}),
        ("grpo", {"prompt", "answer"}),
    ],
)
def test_builtin_format_follows_trainer_kind(tmp_path, kind, columns):
    recipe = validate_recipe(tiny_recipe(tmp_path, trainer={"kind": kind}))
    ds = load_source(recipe.data.train, kind, "train")
    assert set(ds.column_names) == columns and len(ds) == 32


# -- building runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf", "sft", "dpo", "grpo"])
def test_build_run_each_kind(tmp_path, kind):
    from llmreg.trainers import TRAINERS

    trainer_cfg = {"kind": kind, "max_steps": 1, "per_device_train_batch_size": 4}
    if kind == "grpo":
        trainer_cfg.update(num_generations=4, max_completion_length=4, beta=0.1)
    recipe = validate_recipe(tiny_recipe(tmp_path / "out", trainer=trainer_cfg))
    run = build_run(recipe)
    trainer = run.trainer
    assert type(trainer) is TRAINERS[kind]
    assert [r.name for r in trainer.reg_stack] == ["l2_sp"]
    assert trainer.model.config.vocab_size == len(run.tokenizer)
    assert run.args.use_cpu and run.args.output_dir == recipe.output_dir
    assert any(type(cb).__name__ == "MetricsJsonlCallback" for cb in trainer.callback_handler.callbacks)
    if kind == "hf":
        from transformers import DataCollatorForLanguageModeling

        assert isinstance(trainer.data_collator, DataCollatorForLanguageModeling)
        first = trainer.train_dataset[0]["input_ids"]
        assert first[0] == run.tokenizer.bos_token_id and first[-1] == run.tokenizer.eos_token_id
    if kind in ("dpo", "grpo"):  # TRL rebuilds the reference from _name_or_path: it must be a saved model
        init_dir = os.path.join(recipe.output_dir, "init")
        assert trainer.model.config._name_or_path == init_dir
        assert os.path.isfile(os.path.join(init_dir, "config.json"))


def test_build_run_with_lora(tmp_path):
    from peft import PeftModel

    peft = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    for kind in ("hf", "sft"):
        recipe = validate_recipe(tiny_recipe(tmp_path / kind, trainer={"kind": kind}, peft=peft))
        model = build_run(recipe).trainer.model
        assert isinstance(model, PeftModel), kind
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_build_time_errors_are_config_errors(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path, model={"config": {"size": "tiny", "vocab_size": 50}}))
    with pytest.raises(ConfigError, match="vocab_size: 50 is smaller than the tokenizer"):
        build_run(recipe)
    (tmp_path / "d.jsonl").write_text('{"question": "x"}\n')
    # a missing column is now refused by validation, before anything loads (tests/test_bad_input.py)
    with pytest.raises(ConfigError, match="data.train: trainer kind 'hf' needs a 'text' column, found"):
        validate_recipe(tiny_recipe(tmp_path, trainer={"kind": "hf"}, data={"train": str(tmp_path / "d.jsonl")}))


# -- resume rules and the metrics file --------------------------------------------------------------


def test_resume_rules(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path / "out", resume=True))
    with pytest.raises(ConfigError, match="no checkpoint in"):
        resume_checkpoint(recipe)
    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no complete checkpoint \(only incomplete ones: checkpoint-4\)"):
        resume_checkpoint(recipe)  # no completion marker: a run killed while saving it
    (tmp_path / "out" / "checkpoint-4" / COMPLETE_MARKER).write_text("{}")
    assert resume_checkpoint(recipe) == str(tmp_path / "out" / "checkpoint-4")
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        resume_checkpoint(recipe, overwrite=True)
    recipe.resume = False
    with pytest.raises(ConfigError, match="already holds checkpoint-4 from an earlier run: add --resume"):
        resume_checkpoint(recipe)
    assert resume_checkpoint(recipe, overwrite=True) is None


def test_overwrite_replaces_an_earlier_run_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    for name in ("checkpoint-50", "final", "init", "notes"):
        (out / name).mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 50, "loss": 1.0}\n')
    (out / "keep.txt").write_text("mine")
    recipe = validate_recipe(
        tiny_recipe(
            out,
            trainer={
                "kind": "sft",
                "max_steps": 2,
                "save_steps": 2,
                "logging_steps": 1,
                "per_device_train_batch_size": 4,
            },
        )
    )
    result = train(recipe, overwrite=True)
    assert result.checkpoints == ["checkpoint-2"] and result.global_step == 2
    assert sorted(os.listdir(out)) == [
        "README.md",
        "checkpoint-2",
        "final",
        "keep.txt",
        "metrics.jsonl",
        "notes",
        "recipe.yaml",
    ]
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r] == [1, 2]


def test_metrics_file_is_trimmed_to_the_resumed_step(tmp_path):
    from types import SimpleNamespace

    path = str(tmp_path / "metrics.jsonl")
    cb = MetricsJsonlCallback(path)
    fresh = SimpleNamespace(is_world_process_zero=True, global_step=0, epoch=0.0)
    cb.on_train_begin(None, fresh, None)
    for step in (1, 2, 3, 4):
        cb.on_log(
            None,
            SimpleNamespace(is_world_process_zero=True, global_step=step, epoch=step / 4),
            None,
            logs={"loss": float(step)},
        )
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    cb.on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=2, epoch=0.5), None)
    assert [r["loss"] for r in read_metrics(path)] == [1.0, 2.0]
    cb.on_train_begin(None, fresh, None)
    assert read_metrics(path) == []
