"""With regularizers=[] each Reg*Trainer is its parent: same per-step losses, same weights after N steps."""

from __future__ import annotations

import pytest
import torch
import transformers
import trl
from conftest import losses, weights

import llmreg
from llmreg.data import build_char_tokenizer, make_builtin_dataset, tiny_llama

STEPS = 4
COMMON = dict(
    max_steps=STEPS,
    learning_rate=5e-3,
    lr_scheduler_type="constant",
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    seed=0,
    data_seed=0,
    disable_tqdm=True,
)


def _hf(cls, out, tok, extra):
    from conftest import lm_dataset

    args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, **COMMON)
    return cls(
        model=tiny_llama(vocab_size=len(tok)),
        args=args,
        train_dataset=lm_dataset(tok),
        data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
        **extra,
    )


def _sft(cls, out, tok, extra):
    args = trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_length=64, **COMMON)
    return cls(
        model=tiny_llama(vocab_size=len(tok)),
        args=args,
        processing_class=tok,
        train_dataset=make_builtin_dataset(format="prompt_completion", num_examples=32),
        **extra,
    )


def _dpo(cls, out, tok, extra):
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=4, max_length=64, **COMMON)
    # an unsaved model has no path TRL could rebuild the reference from: pass the same init explicitly
    return cls(
        model=tiny_llama(vocab_size=len(tok)),
        ref_model=tiny_llama(vocab_size=len(tok)),
        args=args,
        processing_class=tok,
        train_dataset=make_builtin_dataset(format="preference", num_examples=32),
        **extra,
    )


def digit_count_reward(completions, **_):
    """A dense reward, so an untrained model gets non-zero advantages and the weights move."""
    return [float(sum(ch.isdigit() for ch in text)) for text in completions]


def _grpo(cls, out, tok, extra):
    args = trl.GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        beta=0.0,
        **COMMON,
    )
    return cls(
        model=tiny_llama(vocab_size=len(tok)),
        args=args,
        processing_class=tok,
        reward_funcs=digit_count_reward,
        train_dataset=make_builtin_dataset(format="prompt_only", num_examples=32),
        **extra,
    )


CASES = {
    "hf": (_hf, transformers.Trainer, llmreg.RegTrainer),
    "sft": (_sft, trl.SFTTrainer, llmreg.RegSFTTrainer),
    "dpo": (_dpo, trl.DPOTrainer, llmreg.RegDPOTrainer),
    "grpo": (_grpo, trl.GRPOTrainer, llmreg.RegGRPOTrainer),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_empty_stack_is_indistinguishable_from_parent(kind, tmp_path):
    build, parent_cls, reg_cls = CASES[kind]
    tok = build_char_tokenizer()
    assert issubclass(reg_cls, parent_cls) and reg_cls.trainer_kind == kind
    parent = build(parent_cls, tmp_path / "parent", tok, {})
    parent.train()
    ours = build(reg_cls, tmp_path / "ours", tok, {"regularizers": []})
    ours.train()
    assert len(losses(parent)) == STEPS
    assert losses(ours) == losses(parent)
    w_parent, w_ours = weights(parent.model), weights(ours.model)
    assert w_parent.keys() == w_ours.keys()
    assert all(torch.equal(w_parent[n], w_ours[n]) for n in w_parent)
    # the run did train: weights moved from the seed-0 init
    init = weights(tiny_llama(vocab_size=len(tok)))
    assert any(not torch.equal(init[n], w_ours[n]) for n in init)
