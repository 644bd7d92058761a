"""Bad input never reaches a traceback (issue 19): every kind of bad recipe, data file, DeepSpeed config, eval
suite, override or resume request exits with status 2 and one line `error: ...` on stderr, before any model
loads, through both `llmreg validate` and `llmreg train` (one validation path).

Each case runs in-process through `llmreg.cli.main` with a load probe that makes every way of building a model
raise an AssertionError (which the CLI's error boundary deliberately lets through), so a case that loads a model
fails loudly; a few run as real subprocesses, where an untouched output_dir and an empty stdout (train prints
its first line before anything loads) show that nothing was built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from llmreg.cli import main
from llmreg.integrations.checkpoints import COMPLETE_MARKER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHAT = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
FILES = {
    "empty.jsonl": "",
    "corrupt.jsonl": '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n',
    "question.jsonl": '{"question": "1+1?", "answer": "2"}\n',
    "messages_str.jsonl": '{"messages": "hello"}\n',
    "chat.jsonl": json.dumps(CHAT) + "\n",
    "bad_role.jsonl": json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n",
    "text.jsonl": '{"text": "hello"}\n',
    "header_only.csv": "text\n",
    "notes.txt": "plain text\n",
    "notes.bin": "not a data file\n",
    "ds_optimizer.json": json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}),
    "ds_broken.json": '{"zero_optimization": {"stage": 2',
    "suite_broken.yaml": "target: [\n",
    "bad_yaml.yaml": "model: [\n",
}


def base_recipe(out_dir) -> dict:
    return {
        "model": {"config": {"size": "tiny"}},
        "data": {"train": "builtin:arithmetic", "num_examples": 32},
        "trainer": {"kind": "sft", "max_steps": 2, "per_device_train_batch_size": 4},
        "regularizers": [{"name": "l2_sp", "lam": 0.01}],
        "output_dir": str(out_dir),
    }


# (id, overrides or a function of the raw recipe, extra CLI flags, the start of the message after "error: ")
CASES = [
    # keys
    ("unknown_section", ["modle.config.size=tiny"], [], "recipe: unknown key 'modle'; did you mean 'model'?"),
    ("unknown_trainer_key", ["trainer.learnin_rate=1e-5"], [], "trainer: unknown key 'learnin_rate'"),
    ("unknown_regularizer", ["regularizers.0.name=l2sp"], [], "regularizers.0: unknown regularizer 'l2sp'"),
    ("unknown_option", ["regularizers.0.lamb=0.1"], [], "regularizers.0: unknown key 'lamb'; did you mean 'lam'?"),
    ("missing_section", lambda r: r.pop("trainer"), [], "recipe: missing section 'trainer'"),
    # types
    ("float_as_text", ["trainer.learning_rate=abc"], [], "trainer.learning_rate: expected float, got 'abc'"),
    ("int_as_float", ["trainer.max_steps=1.5"], [], "trainer.max_steps: expected int"),
    ("option_type", ["regularizers.0.lam=strong"], [], "regularizers.0.lam: expected float"),
    # ranges of trainer fields
    ("max_steps_zero", ["trainer.max_steps=0"], [], "trainer: max_steps must be >= 1, or -1"),
    ("max_steps_negative", ["trainer.max_steps=-5"], [], "trainer: max_steps must be >= 1, or -1"),
    ("lr_negative", ["trainer.learning_rate=-1"], [], "trainer: learning_rate must be > 0, got -1.0"),
    ("batch_zero", ["trainer.per_device_train_batch_size=0"], [], "trainer: per_device_train_batch_size must be >= 1"),
    ("save_steps_zero", ["trainer.save_steps=0"], [], "trainer: save_steps must be > 0"),
    (
        "epochs_zero",
        ["trainer.max_steps=-1", "trainer.num_train_epochs=0"],
        [],
        "trainer: num_train_epochs must be > 0",
    ),
    ("grad_accum_zero", ["trainer.gradient_accumulation_steps=0"], [], "trainer: gradient_accumulation_steps must"),
    ("adam_beta", ["trainer.adam_beta1=1"], [], "trainer: adam_beta1 must be in [0, 1), got 1.0"),
    ("num_examples_zero", ["data.num_examples=0"], [], "data.train: num_examples must be >= 1, got 0"),
    # regularizer options
    ("l2_sp_negative_lam", ["regularizers.0.lam=-1"], [], "regularizers.0: lam must be >= 0, got -1.0"),
    (
        "noisefit_alpha",
        lambda r: r.update(regularizers=[{"name": "noisefit", "alpha": 1.5}]),
        [],
        "regularizers.0: alpha must be in [0, 1], got 1.5",
    ),
    (
        "lfu_rank_zero",
        lambda r: r.update(regularizers=[{"name": "lfu", "aux_lora_rank": 0}]),
        [],
        "regularizers.0: aux_lora_rank must be >= 1, got 0",
    ),
    (
        "lp_reg_kappa",
        lambda r: r.update(regularizers=[{"name": "lp_reg", "minp_kappa": 1.0}]),
        [],
        "regularizers.0: minp_kappa must be in (0, 1), got 1.0",
    ),
    # combinations
    (
        "regularizer_kind",
        lambda r: r.update(regularizers=[{"name": "lp_reg"}]),
        [],
        "regularizers: regularizer 'lp_reg' does not support trainer kind 'sft'",
    ),
    ("reward_not_grpo", ["trainer.reward=exact_answer"], [], "trainer.reward: only trainer kind 'grpo'"),
    ("stage_eval_no_stages", lambda r: r.update(stage_eval={"suite": "x.yaml"}), [], "stage_eval: only a recipe"),
    # files
    ("missing_data", ["data.train=data/missing.jsonl"], [], "data.train: data file not found: data/missing.jsonl"),
    ("unsupported_file", ["data.train={tmp}/notes.bin"], [], "data.train: unsupported data file"),
    ("text_file_dpo", ["data.train={tmp}/notes.txt", "trainer.kind=dpo"], [], "data.train: trainer kind 'dpo' needs"),
    ("missing_model", lambda r: r.update(model={"name_or_path": "./no/such/model"}), [], "model.name_or_path: path"),
    ("missing_recipe", "MISSING", [], "recipe not found"),
    ("invalid_yaml", "BAD_YAML", [], "{tmp}/bad_yaml.yaml: invalid YAML"),
    # data content
    ("empty_data", ["data.train={tmp}/empty.jsonl"], [], "data.train: {tmp}/empty.jsonl has no rows"),
    ("corrupt_jsonl", ["data.train={tmp}/corrupt.jsonl"], [], "data.train: {tmp}/corrupt.jsonl line 3 is not valid"),
    ("wrong_columns", ["data.train={tmp}/question.jsonl"], [], "data.train: trainer kind 'sft' needs a 'text'"),
    ("hf_needs_text", ["data.train={tmp}/chat.jsonl", "trainer.kind=hf"], [], "data.train: trainer kind 'hf' needs"),
    ("messages_strings", ["data.train={tmp}/messages_str.jsonl"], [], "data.train: row 1: 'messages' must be a list"),
    ("chat_no_template", ["data.train={tmp}/chat.jsonl"], [], "data.train: chat-format data needs a tokenizer"),
    ("unknown_role", ["data.train={tmp}/bad_role.jsonl"], [], "data.train: row 1: 'messages'[0]: unknown role"),
    (
        "missing_text_field",
        ["data.train={tmp}/text.jsonl", "data.text_field=body"],
        [],
        "data.train.text_field: 'body'",
    ),
    ("csv_no_rows", ["data.eval={tmp}/header_only.csv"], [], "data.eval: {tmp}/header_only.csv has no rows"),
    # data mixtures (a list of sources)
    (
        "mix_weight_zero",
        ["data.train=[{path: {tmp}/text.jsonl, weight: 0.8}, {path: {tmp}/notes.txt, weight: 0}]"],
        [],
        "data.train[1]: weight must be > 0, got 0.0",
    ),
    (
        "mix_weight_negative",
        ["data.train=[{path: {tmp}/text.jsonl, weight: -0.2}, {path: {tmp}/notes.txt, weight: 0.2}]"],
        [],
        "data.train[0]: weight must be > 0, got -0.2",
    ),
    (
        "mix_unknown_column",
        ["data.train=[{tmp}/text.jsonl, {path: {tmp}/question.jsonl, prompt_field: qestion, completion_field: a}]"],
        [],
        "data.train[1].prompt_field: 'qestion' is not a column of question.jsonl; did you mean 'question'? (columns: q",
    ),
    ("mix_missing_file", ["data.train=[{tmp}/text.jsonl, {tmp}/txet.jsonl]"], [], "data.train[1]: data file not found"),
    (
        "mix_strategy",
        ["data.train=[{tmp}/text.jsonl, {tmp}/notes.txt]", "data.mix.strategy=interleaf"],
        [],
        "data.mix.strategy: unknown strategy 'interleaf'; did you mean 'interleave'?",
    ),
    # DeepSpeed configs
    ("ds_optimizer", ["trainer.deepspeed={tmp}/ds_optimizer.json"], [], "trainer.deepspeed: DeepSpeed config has an"),
    ("ds_missing", ["trainer.deepspeed=no_such_ds.json"], [], "trainer.deepspeed: file not found: no_such_ds.json"),
    ("ds_broken_json", ["trainer.deepspeed={tmp}/ds_broken.json"], [], "trainer.deepspeed: DeepSpeed config"),
    # eval suites
    ("suite_missing", ["eval_during_training.suite=nope.yaml"], [], "eval_during_training.suite: suite file not"),
    (
        "suite_every_zero",
        ["eval_during_training.suite={repo}/eval/suites/general_offline.yaml", "eval_during_training.every_steps=0"],
        [],
        "eval_during_training.every_steps: must be >= 1",
    ),
    ("suite_broken", ["eval_during_training.suite={tmp}/suite_broken.yaml"], [], "eval_during_training.suite:"),
    # overrides
    ("override_index", ["regularizers.5.lam=1"], [], "override 'regularizers.5.lam=1': index 5 is out of range"),
    ("override_yaml", ["trainer.max_steps=[1"], [], "override 'trainer.max_steps=[1': value is not valid YAML"),
    # resume
    ("resume_nothing", [], ["--resume"], "resume: no checkpoint in"),
    ("resume_incomplete", "INCOMPLETE", ["--resume"], "resume: no complete checkpoint (only incomplete ones: chec"),
    ("resume_and_overwrite", "COMPLETE", ["--resume", "--overwrite"], "resume and overwrite exclude each other"),
    ("earlier_run", "COMPLETE", [], "output_dir {tmp}/out already holds checkpoint-2 from an earlier run"),
]


def _prepare(tmp_path, case) -> list[str]:
    """Write the files and the recipe of `case`; its argv after the command."""
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    _, change, flags, _ = case
    raw = base_recipe(tmp_path / "out")
    subst = {"{tmp}": str(tmp_path), "{repo}": REPO}
    overrides = []
    if callable(change):
        change(raw)
    elif isinstance(change, list):
        overrides = [_sub(o, subst) for o in change]
    elif change in ("INCOMPLETE", "COMPLETE"):
        ckpt = tmp_path / "out" / "checkpoint-2"
        ckpt.mkdir(parents=True)
        if change == "COMPLETE":
            (ckpt / COMPLETE_MARKER).write_text("{}")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    special = {"MISSING": str(tmp_path / "missing.yaml"), "BAD_YAML": str(tmp_path / "bad_yaml.yaml")}
    recipe = special.get(change) if isinstance(change, str) else None
    return [recipe or str(path), *overrides, *flags]


def _sub(text: str, subst: dict[str, str]) -> str:
    for key, value in subst.items():
        text = text.replace(key, value)
    return text


@pytest.fixture
def load_probe(monkeypatch):
    """Every way of building a model raises an AssertionError, which the CLI does not turn into exit 2."""
    import transformers

    import llmreg.data
    import llmreg.recipe.build
    import llmreg.recipe.models

    def probe(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for cls in (transformers.AutoModelForCausalLM,):
        for name in ("from_pretrained", "from_config"):
            monkeypatch.setattr(cls, name, probe)
    for module, name in (
        (llmreg.data, "tiny_llama"),
        (llmreg.recipe.build, "build_model"),
        (llmreg.recipe.models, "build_model"),
    ):
        monkeypatch.setattr(module, name, probe)


def test_load_probe_catches_a_model_load(tmp_path, monkeypatch, capsys, load_probe):
    monkeypatch.chdir(tmp_path)
    argv = _prepare(tmp_path, ("ok", [], [], ""))
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["train", *argv])


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_before_loading(tmp_path, monkeypatch, capsys, load_probe, case, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    argv = _prepare(tmp_path, case)
    assert main([command, *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    expected = _sub(case[3], {"{tmp}": str(tmp_path), "{repo}": REPO})
    assert lines[0].startswith("error: " + expected), lines[0]
    assert not (tmp_path / "out" / "recipe.yaml").exists()


def test_at_least_thirty_kinds():
    assert len(CASES) >= 30


# -- absurd but legal values warn and run --------------------------------------------------------------------


def test_absurd_values_warn_once_and_validate(tmp_path, monkeypatch, capsys, load_probe):
    monkeypatch.chdir(tmp_path)
    argv = _prepare(tmp_path, ("absurd", ["regularizers.0.lam=1e30", "trainer.learning_rate=3"], [], ""))
    assert main(["validate", *argv]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: ")
    assert err.splitlines() == [
        "warning: trainer: learning_rate=3.0 is beyond 1; is that meant?",
        "warning: regularizers.0: lam=1e+30 is beyond 1e+06; is that meant?",
    ]


# -- the error boundary of building and starting a run --------------------------------------------------------


def test_library_error_while_building_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    import llmreg.recipe.build

    def broken(spec):
        raise RuntimeError("tokenizer.json is\ncorrupt")

    monkeypatch.setattr(llmreg.recipe.build, "build_tokenizer", broken)
    monkeypatch.chdir(tmp_path)
    argv = _prepare(tmp_path, ("tok", [], [], ""))
    assert main(["train", *argv]) == 2
    out, err = capsys.readouterr()
    assert err == "error: tokenizer: RuntimeError: tokenizer.json is corrupt\n"
    assert main(["train", *argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: tokenizer.json is" in err
    assert err.splitlines()[-1] == "error: tokenizer: RuntimeError: tokenizer.json is corrupt"
    monkeypatch.setenv("LLMREG_DEBUG", "1")
    assert main(["train", *argv]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_library_error_while_starting_is_one_line_naming_the_trainer(tmp_path, monkeypatch, capsys):
    from llmreg.integrations.hf import RegularizedTrainerMixin

    def refuse(self, model=None):
        raise ValueError("Invalid learning rate: -1.0")

    monkeypatch.setattr(RegularizedTrainerMixin, "create_optimizer", refuse)
    monkeypatch.chdir(tmp_path)
    argv = _prepare(tmp_path, ("start", [], [], ""))
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err  # TRL's dataset progress bars come first: the model and data were built
    assert "Traceback" not in err and err.splitlines()[-1] == "error: trainer: ValueError: Invalid learning rate: -1.0"


# -- real subprocesses ------------------------------------------------------------------------------------------

SUBPROCESS_CASES = ["lr_negative", "chat_no_template", "resume_incomplete"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_subprocess(tmp_path, name):
    case = next(c for c in CASES if c[0] == name)
    argv = _prepare(tmp_path, case)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, "-m", "llmreg.cli", "train", *argv], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: " + _sub(case[3], {"{tmp}": str(tmp_path)}))
    out = tmp_path / "out"
    assert (sorted(os.listdir(out)) if out.exists() else []) == (["checkpoint-2"] if "resume" in name else [])
