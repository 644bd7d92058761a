"""The `llmreg` command line, run as a subprocess: exit codes, messages, list, an end-to-end run and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from llmreg.cli import main
from llmreg.core.options import options_help
from llmreg.core.registry import available
from llmreg.integrations.checkpoints import COMPLETE_MARKER
from llmreg.recipe import load_recipe
from llmreg.recipe.callbacks import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "recipes", "quickstart.yaml")


def run(cmd: list[str], cwd=REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group, so that a hung launcher's workers are killed with it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "llmreg.cli", *args], cwd=cwd)


def test_validate_ok():
    result = cli("validate", QUICKSTART, "trainer.learning_rate=1e-5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {QUICKSTART}")
    assert "learning_rate=1e-05" in result.stdout and "l2_sp(lam=0.01)" in result.stdout


def test_validate_error_exits_2_with_one_line_on_stderr():
    result = cli("validate", QUICKSTART, "trainer.learnin_rate=1e-5")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "error: trainer: unknown key 'learnin_rate'; did you mean 'learning_rate'?\n"


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainr.kind=sft", "error: recipe: unknown key 'trainr'; did you mean 'trainer'?"),
        ("trainer.learning_rate=abc", "error: trainer.learning_rate: expected float, got 'abc' (str)"),
        ("regularizers.0.name=l2sp", "error: regularizers.0: unknown regularizer 'l2sp'; did you mean 'l2_sp'?"),
        ("data.train=data/missing.jsonl", "error: data.train: data file not found: data/missing.jsonl"),
    ],
)
def test_main_reports_config_errors(capsys, override, message):
    for command in ("validate", "train"):
        assert main([command, QUICKSTART, override]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(message)


def test_launcher_local_rank_argument_is_accepted(capsys):
    # the deepspeed launcher puts --local_rank=N before the subcommand
    assert main(["--local_rank=1", "validate", QUICKSTART]) == 0
    assert main(["validate", "--local-rank", "0", QUICKSTART]) == 0
    assert capsys.readouterr().out.count("ok: ") == 2


def test_overrides_may_follow_options(capsys):
    from llmreg.cli import _parse

    args = _parse(["train", "r.yaml", "a=1", "--resume", "b.c=2"])
    assert (args.recipe, args.overrides, args.resume) == ("r.yaml", ["a=1", "b.c=2"], True)
    with pytest.raises(SystemExit):
        _parse(["train", "r.yaml", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_validate_refuses_deepspeed_optimizer_block(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}))
    result = cli("validate", QUICKSTART, f"trainer.deepspeed={ds}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "'optimizer' block" in result.stderr


def test_train_with_bad_recipe_exits_2_before_writing_anything(tmp_path):
    out = tmp_path / "out"
    result = cli("train", QUICKSTART, f"output_dir={out}", "regularizers.0.lam=lots")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: regularizers.0.lam: expected float, got 'lots' (str)"
    assert not out.exists()


def test_resume_without_checkpoint_exits_2(tmp_path):
    result = cli("train", QUICKSTART, f"output_dir={tmp_path / 'out'}", "--resume")
    assert result.returncode == 2
    assert "no checkpoint in" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_list_shows_every_regularizer_with_its_options():
    result = cli("list")
    assert result.returncode == 0, result.stderr
    registered = available()
    assert {"l2_sp", "weight_decay"} <= set(registered)
    lines = result.stdout.splitlines()
    # the table first: one row per regularizer with its trainer kinds, PEFT and ZeRO-3 support
    assert lines[0].split()[:5] == ["regularizer", "trainer", "kinds", "PEFT", "ZeRO-3"]
    rows = {line.split()[0]: line for line in lines[1 : 1 + len(registered)]}
    assert list(rows) == list(registered)
    for name, cls in registered.items():
        cells = rows[name].split()
        kinds = cells[1 : 1 + len(cls.requires.trainers)]
        assert kinds == list(cls.requires.trainers), name
        peft, zero3 = cells[1 + len(kinds) : 3 + len(kinds)]
        assert (peft, zero3) == (("no", "yes")[cls.requires.supports_peft], ("no", "yes")[cls.requires.supports_zero3])
    assert rows["half_ft"].split()[1:7] == ["hf", "sft", "dpo", "grpo", "no", "yes"]  # refuses PEFT
    assert rows["lp_reg"].split()[1:4] == ["grpo", "yes", "yes"]
    # then the options
    for name, cls in registered.items():
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}: "))
        assert start > len(registered) and len(lines[start]) > len(f"{name}: ")  # a description follows the name
        block = lines[start + 1 : start + 1 + len(options_help(cls.options_cls))]
        for (opt, type_name, default, help_text), line in zip(options_help(cls.options_cls), block):
            assert line.strip() == f"{opt} ({type_name}, default {default!r}): {help_text}"
    # the declared range is shown with the type
    assert any(line.strip().startswith("lam (float, >= 0, default 0.01)") for line in lines)
    one = cli("list", "l2_sp")
    assert one.returncode == 0 and "l2_sp: " in one.stdout and "weight_decay" not in one.stdout
    typo = cli("list", "l2sp")
    assert typo.returncode == 2 and "did you mean 'l2_sp'?" in typo.stderr


def test_help_and_missing_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def _tiny_recipe(path, out) -> str:
    raw = {
        "model": {"config": {"size": "tiny"}},
        "data": {"train": "builtin:arithmetic", "num_examples": 64},
        "trainer": {
            "kind": "sft",
            "max_steps": 6,
            "save_steps": 3,
            "logging_steps": 1,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "activation_checkpointing": False,
            "disable_tqdm": True,
        },
        "regularizers": [{"name": "l2_sp", "lam": 0.01}],
        "output_dir": str(out),
        "seed": 0,
    }
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.slow
def test_train_end_to_end_then_resume(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    recipe_path = _tiny_recipe(tmp_path / "tiny.yaml", out)
    first = cli("train", recipe_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"outputs in {out}" in first.stdout and str(out / "final") in first.stdout
    # float-typed step counts print as written; DeepSpeed's CPU-fallback notice is dropped (no GPU here, or none
    # would be printed anyway)
    assert "save_steps=3," in first.stdout and "logging_steps=1," in first.stdout and "=3.0" not in first.stdout
    assert "Setting accelerator to CPU" not in first.stdout + first.stderr

    # the resolved recipe reloads to the same recipe
    assert load_recipe(str(out / "recipe.yaml")).to_dict() == load_recipe(recipe_path).to_dict()
    rows = read_metrics(str(out / "metrics.jsonl"))
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all("reg/l2_sp/penalty" in r for r in train_rows) and train_rows[-1]["reg/l2_sp/penalty"] > 0
    for step in (3, 6):
        assert (out / f"checkpoint-{step}" / "llmreg_regularizers" / "rank0.pt").is_file()
    final = out / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert (
        load_file(str(final / "model.safetensors")).keys()
        == load_file(str(out / "checkpoint-6" / "model.safetensors")).keys()
    )

    # a fresh run into the same directory is refused; --resume with more steps continues from checkpoint-6
    again = cli("train", recipe_path)
    assert again.returncode == 2 and "already holds checkpoint-6" in again.stderr
    resumed = cli("train", recipe_path, "trainer.max_steps=9", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-6'}" in resumed.stdout
    rows = read_metrics(str(out / "metrics.jsonl"))
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 10))
    assert [r["step"] for r in rows if "train_runtime" in r] == [6, 9]  # one summary per train() call
    # the L2-SP anchors came back from the checkpoint: re-anchoring at checkpoint-6 would give 0 at step 7
    assert train_rows[6]["reg/l2_sp/penalty"] > 0.5 * train_rows[5]["reg/l2_sp/penalty"] > 0
    state = json.loads((out / "checkpoint-9" / "trainer_state.json").read_text())
    assert state["global_step"] == 9
    assert yaml.safe_load((out / "recipe.yaml").read_text())["trainer"]["max_steps"] == 9


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "llmreg.cli",
            *args,
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "ds_configs/zero2.json"])
def test_train_under_torchrun_two_processes(tmp_path, deepspeed):
    out = tmp_path / "run"
    extra = [f"trainer.deepspeed={deepspeed}"] if deepspeed else []
    result = _torchrun("train", _tiny_recipe(tmp_path / "tiny.yaml", out), "trainer.max_steps=3", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 3 steps") == 1  # only rank 0 prints
    for rank in (0, 1):
        assert (out / "checkpoint-3" / "llmreg_regularizers" / f"rank{rank}.pt").is_file()
    assert (out / "checkpoint-3" / COMPLETE_MARKER).is_file()  # written after both ranks' pieces
    assert (out / "final" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r] == [1, 2, 3]
    if deepspeed:  # both ranks pick and agree on the newest complete checkpoint, skipping a half-written one
        (out / "checkpoint-5").mkdir()
        again = _torchrun("train", str(tmp_path / "tiny.yaml"), "trainer.max_steps=6", "--resume", *extra)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resuming from {out / 'checkpoint-3'} (skipping incomplete checkpoint-5" in again.stdout
        assert (out / "checkpoint-6" / COMPLETE_MARKER).is_file() and not (out / "checkpoint-5").exists()


@pytest.mark.slow
def test_train_single_process_deepspeed_on_cpu(tmp_path):
    out = tmp_path / "run"
    result = cli(
        "train",
        _tiny_recipe(tmp_path / "tiny.yaml", out),
        "trainer.max_steps=2",
        "trainer.deepspeed=ds_configs/zero3.json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoint-2" / "llmreg_regularizers" / "rank0.pt").is_file()
    assert (out / "final" / "model.safetensors").is_file()


def test_testbed_help_lists_its_commands_and_options(capsys):
    for argv, expected in (
        (["testbed", "--help"], ["usage: llmreg testbed", "build", "forget", "pre-train the testbed model"]),
        (["testbed", "forget", "--help"], ["fine-tuning steps (default 800)", "held-out examples per skill"]),
        (["testbed", "build", "-h"], ["pre-training steps (default 1500)", "build cache"]),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        out = capsys.readouterr().out
        assert info.value.code == 0, argv
        for text in expected:
            assert text in out, (argv, text)


def test_testbed_subcommand_reaches_the_testbed_cli():

    with pytest.raises(SystemExit) as info:
        main(["testbed", "forget", "--help"])
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        main(["testbed", "forget"])  # the checkpoint path is required: argparse exits 2
    assert info.value.code == 2
