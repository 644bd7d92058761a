"""A run interrupted at step k and resumed equals an uninterrupted run, regularizer state included."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import losses, make_hf_trainer, max_rel_diff, weights
from transformers import TrainerCallback

from llmreg.data import tiny_llama
from llmreg.integrations.hf import STATE_DIR

KW = dict(
    max_steps=6,
    save_strategy="steps",
    save_steps=3,
    learning_rate=1e-2,
    lr_scheduler_type="cosine",
    train_sampling_strategy="random",
)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True
            control.should_save = True


def _regs():
    return [{"name": "l2_sp", "lam": 2.0}, {"name": "weight_decay", "weight_decay": 0.1}]


def test_interrupted_and_resumed_run_equals_uninterrupted(tok, tmp_path):
    full = make_hf_trainer(tok, tmp_path / "full", regularizers=_regs(), **KW)
    full.train()

    first = make_hf_trainer(tok, tmp_path / "cut", regularizers=_regs(), **KW)
    first.add_callback(StopAt(3))
    first.train()
    ckpt = tmp_path / "cut" / "checkpoint-3"
    assert (ckpt / STATE_DIR / "rank0.pt").is_file()

    # a different init proves the weights and the l2_sp anchors both come from the checkpoint
    resumed = make_hf_trainer(
        tok, tmp_path / "cut", regularizers=_regs(), model=tiny_llama(vocab_size=len(tok), seed=7), **KW
    )
    resumed.train(resume_from_checkpoint=str(ckpt))

    assert losses(full)[3:] == pytest.approx(losses(resumed)[-3:], rel=1e-5, abs=1e-6)
    assert max_rel_diff(weights(full.model), weights(resumed.model)) < 1e-5
    saved = torch.load(ckpt / STATE_DIR / "rank0.pt", weights_only=False)
    anchors = saved["state"]["l2_sp"]["anchors"]
    init = weights(tiny_llama(vocab_size=len(tok), seed=0))
    assert all(torch.equal(anchors[n], init[n].reshape(-1)) for n in init)


def test_resume_without_regularizer_state_is_a_clear_error(tok, tmp_path):
    plain = make_hf_trainer(tok, tmp_path, regularizers=[], max_steps=2, save_strategy="steps", save_steps=2)
    plain.train()
    ckpt = os.path.join(tmp_path, "checkpoint-2")
    again = make_hf_trainer(tok, tmp_path, regularizers=_regs(), max_steps=4)
    with pytest.raises(FileNotFoundError, match="has no regularizer state"):
        again.train(resume_from_checkpoint=ckpt)
