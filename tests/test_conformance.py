"""Every registered regularizer x {Trainer, SFT, GRPO} x {full, LoRA}: trains 2 steps, saves, resumes, state
round-trips. A trainer kind the regularizer does not declare in `requires.trainers` must be refused with a
ConfigError; the GRPO column runs only for regularizers limited to a subset of the kinds (GRPO-specific
methods), so the general ones are not run a third time.

A regularizer registered without a row in SETTINGS fails `test_every_regularizer_has_a_row`.
"""

from __future__ import annotations

import pytest
import torch
import trl
from conftest import hf_args, lm_dataset, random_artifact, sft_args
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling

import llmreg
from llmreg.data import build_char_tokenizer, make_builtin_dataset, tiny_llama
from llmreg.integrations.hf import STATE_DIR


def _artifact(tmp_path):
    tok = build_char_tokenizer()
    return {"artifact": random_artifact(tmp_path / "importance", tiny_llama(vocab_size=len(tok))), "lam": 1.0}


# options that make each regularizer do something visible in 2 steps (a callable gets a temporary directory)
SETTINGS = {
    "forgetting_penalty": _artifact,
    "half_ft": {"seed": 3},
    "kl_to_base": {"lam": 1.0},
    "l2_sp": {"lam": 1.0},
    "multipliers": {"lr_scale": 2.0},
    "lp_reg": {"rho": 0.9, "minp_kappa": 0.7},  # the untrained tiny model is nearly uniform
    "lfu": {"aux": "lora", "alpha": 0.5},  # full FT: the auxiliary LoRA; PEFT: the adapter itself
    "noisefit": {"num_layers": 1, "noise_std": 1.0},  # the tiny model has 2 decoder layers
    "si_importance": {},
    "weight_decay": {"weight_decay": 0.1},
}


def _settings(name, tmp_path):
    value = SETTINGS[name]
    return value(tmp_path) if callable(value) else value


def test_every_regularizer_has_a_row():
    assert set(SETTINGS) == set(llmreg.available())


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def _digit_count(completions, **_):
    return [float(sum(ch.isdigit() for ch in text)) for text in completions]


def _trainer(kind, peft, name, out, max_steps):
    tok = build_char_tokenizer()
    regs = [{"name": name, **_settings(name, out)}]
    common = dict(max_steps=max_steps, per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    model = tiny_llama(vocab_size=len(tok))
    if kind == "grpo":
        args = trl.GRPOConfig(
            output_dir=str(out),
            learning_rate=1e-2,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            num_generations=2,
            max_completion_length=6,
            beta=0.0,
            bf16=False,
            **common,
        )
        return llmreg.RegGRPOTrainer(
            model=model,
            args=args,
            processing_class=tok,
            regularizers=regs,
            reward_funcs=_digit_count,
            peft_config=_lora() if peft else None,
            train_dataset=make_builtin_dataset(format="prompt_only", num_examples=32),
        )
    if kind == "hf":
        if peft:
            model = get_peft_model(model, _lora())
        return llmreg.RegTrainer(
            model=model,
            args=hf_args(out, **common),
            train_dataset=lm_dataset(tok, n=32),
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            regularizers=regs,
        )
    args = sft_args(out, **common)
    return llmreg.RegSFTTrainer(
        model=model,
        args=args,
        processing_class=tok,
        regularizers=regs,
        peft_config=_lora() if peft else None,
        train_dataset=make_builtin_dataset(format="prompt_completion", num_examples=32),
    )


def _cases():
    cases = []
    for name in sorted(SETTINGS):
        kinds = llmreg.get_regularizer_class(name).requires.trainers
        cases += [(name, "hf"), (name, "sft")] + ([(name, "grpo")] if "grpo" in kinds and len(kinds) < 4 else [])
    return cases


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name,kind", _cases())
def test_trains_saves_resumes_and_round_trips(name, kind, peft, tmp_path):
    if kind not in llmreg.get_regularizer_class(name).requires.trainers:
        with pytest.raises(llmreg.ConfigError, match="does not support trainer kind"):
            _trainer(kind, peft, name, tmp_path, max_steps=2)
        return
    if peft and not llmreg.get_regularizer_class(name).requires.supports_peft:
        with pytest.raises(llmreg.ConfigError, match="does not support PEFT"):
            _trainer(kind, peft, name, tmp_path, max_steps=2)
        return
    first = _trainer(kind, peft, name, tmp_path, max_steps=2)
    first.train()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / STATE_DIR / "rank0.pt").is_file()

    resumed = _trainer(kind, peft, name, tmp_path, max_steps=3)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 3

    reg = resumed.reg_stack.regularizers[0]
    fresh = llmreg.build_regularizer({"name": name, **_settings(name, tmp_path)})
    fresh.load_state_dict(reg.state_dict())
    assert _same(reg.state_dict(), fresh.state_dict())


def _same(a, b) -> bool:
    """Nested state equality: tensors bit for bit, everything else by ==."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b
