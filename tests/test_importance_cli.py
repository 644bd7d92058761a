"""`llmreg importance RECIPE`: the two-phase flow end to end on a tiny model, and its errors before loading."""

from __future__ import annotations

import json

import pytest
import yaml

from llmreg.cli import main
from llmreg.regularizers.forgetting import artifact as art


def _recipe(tmp_path, name: str, **sections) -> str:
    recipe = {
        "model": {"config": {"size": "tiny"}, "dtype": "float32"},
        "tokenizer": {"builtin": "char"},
        "data": {"train": "builtin:arithmetic", "num_examples": 32},
        "trainer": {
            "kind": "sft",
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            "activation_checkpointing": False,
        },
        "output_dir": str(tmp_path / name),
        **sections,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_si_then_finetune_with_the_artifact(tmp_path, capsys):
    phase1 = _recipe(tmp_path, "imp", importance={"method": "si", "xi": 1e-3})
    assert main(["importance", phase1]) == 0
    out = capsys.readouterr().out
    directory = tmp_path / "imp" / "importance"
    assert f"importance artifact in {directory}" in out
    meta = art.read_meta(directory)
    assert meta["method"] == "si" and meta["steps"] == 3 and meta["data"] == "builtin:arithmetic"
    assert meta["final_model"] == str(tmp_path / "imp" / "final")
    assert len(meta["parameters"]) == 14  # the 2-D weights of the 2 decoder layers
    omega = art.load_importance(str(directory), meta["parameters"])
    assert all(t.min() >= 0 for t in omega.values()) and sum(float(t.sum()) for t in omega.values()) > 0

    # phase 2 starts from phase 1's final model: accepted; from a fresh model: refused before training
    regs = [{"name": "forgetting_penalty", "artifact": str(directory)}]
    phase2 = _recipe(
        tmp_path,
        "ft",
        model={"name_or_path": str(tmp_path / "imp" / "final"), "dtype": "float32"},
        tokenizer={"name_or_path": str(tmp_path / "imp" / "final")},
        regularizers=regs,
    )
    assert main(["train", phase2]) == 0
    logged = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("reg/forgetting_penalty/penalty", 0) > 0 for r in logged)
    assert any("reg/forgetting_penalty/layer_coef/1" in r for r in logged)

    wrong = _recipe(tmp_path, "wrong", regularizers=regs)  # a freshly initialised tiny model
    assert main(["train", wrong]) == 2
    assert "not the anchor of importance artifact" in capsys.readouterr().err


def test_ewc_records_the_fisher_without_training(tmp_path):
    phase1 = _recipe(tmp_path, "ewc", importance={"method": "ewc", "num_samples": 4})
    assert main(["importance", phase1]) == 0
    meta = art.read_meta(tmp_path / "ewc" / "importance")
    assert meta["method"] == "ewc" and meta["examples"] == 4 and meta["steps"] == 0
    assert meta["anchor_sum_sq"]["start"] == meta["anchor_sum_sq"]["end"]
    fisher = art.load_importance(str(tmp_path / "ewc" / "importance"), meta["parameters"])
    for n, t in fisher.items():  # the sums importance_scale mean divides by (a Fisher is >= 0: |F| = F)
        assert meta["importance_sum_abs"][n] == pytest.approx(float(t.double().sum()), rel=1e-6)
    assert not (tmp_path / "ewc" / "final").exists()  # nothing was trained


def test_importance_resume_flag_continues_an_interrupted_si_run(tmp_path, capsys):
    """The "already holds checkpoint-N: add --resume" advice must work with `llmreg importance` too."""
    path = _recipe(tmp_path, "si", importance={"method": "si"})
    assert main(["importance", path, "--resume"]) == 2  # accepted, but there is nothing to resume yet
    assert "no checkpoint in" in capsys.readouterr().err
    first = ["trainer.max_steps=2", "trainer.save_strategy=steps", "trainer.save_steps=2"]
    assert main(["importance", path, *first]) == 0
    capsys.readouterr()
    assert main(["importance", path, "trainer.max_steps=4", "trainer.save_strategy=steps"]) == 2
    assert "add --resume to continue it" in capsys.readouterr().err
    assert main(["importance", path, "--resume", "trainer.max_steps=4", "trainer.save_strategy=steps"]) == 0
    assert f"resuming from {tmp_path / 'si' / 'checkpoint-2'}" in capsys.readouterr().out
    assert art.read_meta(tmp_path / "si" / "importance")["steps"] == 4
    ewc = _recipe(tmp_path, "ewc", importance={"method": "ewc", "num_samples": 4})
    assert main(["importance", ewc, "--resume"]) == 2
    assert "method ewc does not train" in capsys.readouterr().err


@pytest.mark.parametrize(
    "sections,command,message",
    [
        (
            {"importance": {"method": "si", "num_samples": 3}},
            "importance",
            "importance: num_samples does not apply to method si",
        ),
        ({"importance": {"method": "sj"}}, "importance", "importance.method: expected one of ['si', 'ewc']"),
        ({"importance": {"mehtod": "si"}}, "importance", "importance: unknown key 'mehtod'; did you mean 'method'?"),
        ({"importance": {"method": "si"}, "peft": {"r": 4, "target_modules": ["q_proj"]}}, "importance", "drop peft"),
        (
            {"importance": {"method": "ewc"}, "trainer": {"kind": "sft", "deepspeed": "ds_configs/zero2.json"}},
            "importance",
            "runs without DeepSpeed",
        ),
        ({}, "importance", "has no `importance:` section"),
        ({"importance": {"method": "si"}}, "train", "run it with `llmreg importance`"),
        (
            {"regularizers": [{"name": "forgetting_penalty", "artifact": "nowhere/importance"}]},
            "train",
            "importance artifact not found: nowhere/importance",
        ),
    ],
)
def test_errors_before_anything_loads(tmp_path, capsys, monkeypatch, sections, command, message):
    import llmreg.recipe.build as build

    monkeypatch.setattr(build, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    path = _recipe(tmp_path, "bad", **sections)
    assert main([command, path]) == 2
    assert message in capsys.readouterr().err
