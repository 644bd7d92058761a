"""half_ft (HFT, arXiv 2404.18466): the selection rule, freezing in each trainer, optimizer state, resume."""

from __future__ import annotations

import re

import pytest
import torch
import trl
from conftest import hf_args, lm_dataset, sft_args, weights
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel

import llmreg
from llmreg.core import ConfigError
from llmreg.data import build_char_tokenizer, make_builtin_dataset, tiny_llama
from llmreg.regularizers.half_ft import LLAMA_CATEGORIES, draw_frozen, group_layers

ATTN, FFN, NORMS = LLAMA_CATEGORIES["attention"], LLAMA_CATEGORIES["ffn"], LLAMA_CATEGORIES["norms"]


def _frozen_by_layer(frozen: list[str]) -> dict[int, set[str]]:
    """{layer index: module names frozen in it}, from parameter names."""
    out: dict[int, set[str]] = {}
    for name in frozen:
        m = re.search(r"layers\.(\d+)\.(?:self_attn\.|mlp\.)?(\w+)\.weight$", name)
        assert m, name
        out.setdefault(int(m.group(1)), set()).add(m.group(2))
    return out


def _select(model, **options):
    reg = llmreg.build_regularizer({"name": "half_ft", **options})
    reg.setup(model, trainer=None)
    return reg


def test_selection_rule_per_layer():
    model = tiny_llama(num_hidden_layers=8)
    reg = _select(model, seed=0)
    layers = _frozen_by_layer(reg.frozen)
    assert sorted(layers) == list(range(8))
    ffn_counts = []
    for index, mods in layers.items():
        assert len(mods & set(ATTN)) == 2, (index, mods)
        assert len(mods & set(NORMS)) == 1, (index, mods)
        ffn_counts.append(len(mods & set(FFN)))
    assert sorted(ffn_counts) == [1] * 4 + [2] * 4  # 2 of 3 in exactly half the layers, 1 of 3 in the rest
    # embeddings, LM head and the final norm stay trainable; requires_grad follows the frozen set
    for name, p in model.named_parameters():
        assert p.requires_grad == (name not in reg.frozen), name
    assert not any(n.startswith(("model.embed_tokens", "lm_head", "model.norm.")) for n in reg.frozen)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert reg.metrics()["trainable_fraction"] == pytest.approx(trainable / total)


def test_same_seed_same_selection_next_stage_another():
    first = _select(tiny_llama(num_hidden_layers=8), seed=5).frozen
    again = _select(tiny_llama(num_hidden_layers=8, seed=1), seed=5).frozen
    stage1 = _select(tiny_llama(num_hidden_layers=8), seed=5, stage=1).frozen
    other_seed = _select(tiny_llama(num_hidden_layers=8), seed=6).frozen
    assert first == again
    assert stage1 != first and other_seed != first
    assert len(set(_select(tiny_llama(num_hidden_layers=8), seed=5, stage=s).frozen.__str__() for s in range(6))) == 6


def test_params_balance_freezes_half_of_gqa_attention():
    # tiny: 4 query heads, 2 key/value heads -> k and v are half the size of q and o
    model = tiny_llama(num_hidden_layers=6)
    reg = _select(model, seed=0, balance="params")
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    for index, mods in _frozen_by_layer(reg.frozen).items():
        attn = mods & set(ATTN)
        assert len(attn & {"q_proj", "o_proj"}) == 1 and len(attn & {"k_proj", "v_proj"}) == 1, attn
        frozen_attn = sum(sizes[f"model.layers.{index}.self_attn.{m}.weight"] for m in attn)
        all_attn = sum(sizes[f"model.layers.{index}.self_attn.{m}.weight"] for m in ATTN)
        assert frozen_attn * 2 == all_attn
    # count balance on the same model can freeze q and o together (more than half the attention parameters)
    draws = [_frozen_by_layer(_select(tiny_llama(num_hidden_layers=6), seed=s).frozen) for s in range(5)]
    assert any({"q_proj", "o_proj"} <= mods for d in draws for mods in d.values())


def test_other_architecture_through_categories_and_clear_error_otherwise():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    with pytest.raises(ConfigError, match="cannot classify 'transformer.h.0.ln_1.weight'.*categories"):
        _select(gpt2, seed=0, categories={k: v for k, v in LLAMA_CATEGORIES.items()})
    categories = {
        "attention": ["attn.c_attn", "attn.c_proj"],
        "ffn": ["mlp.c_fc", "mlp.c_proj"],
        "norms": ["ln_1", "ln_2"],
    }
    reg = _select(gpt2, seed=0, categories=categories)
    # the default categories come from the model's anatomy: the same members, so the same draw
    assert _select(gpt2, seed=0).frozen == reg.frozen
    # 1 of 2 in each category; a frozen matrix takes its bias along
    per_layer: dict[str, set[str]] = {}
    for name in reg.frozen:
        layer, rest = re.match(r"transformer\.h\.(\d+)\.(.*)\.(?:weight|bias)$", name).groups()
        per_layer.setdefault(layer, set()).add(rest)
        assert name.replace(".weight", ".bias") in reg.frozen or name.endswith(".bias")
    assert len(per_layer) == 4
    for mods in per_layer.values():
        assert len(mods & {"attn.c_attn", "attn.c_proj"}) == 1
        assert len(mods & {"mlp.c_fc", "mlp.c_proj"}) == 1
        assert len(mods & {"ln_1", "ln_2"}) == 1
    # a layer without one of the listed modules is named in the error
    with pytest.raises(ConfigError, match="decoder layer 0 has no module \\['nope'\\]"):
        group_layers([n for n, _ in gpt2.named_parameters()], {**categories, "extra": ["nope"]})


def test_draw_is_pure_and_independent_of_parameter_order():
    model = tiny_llama(num_hidden_layers=4)
    named = [n for n, _ in model.named_parameters()]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    a = draw_frozen(group_layers(named, LLAMA_CATEGORIES), sizes, seed=2)
    b = draw_frozen(group_layers(list(reversed(named)), LLAMA_CATEGORIES), sizes, seed=2)
    assert a == b


# -- training ---------------------------------------------------------------------------------------------


def _hf_trainer(out, regs, max_steps=3, model=None, **kw):
    tok = build_char_tokenizer()
    model = model if model is not None else tiny_llama(vocab_size=len(tok), num_hidden_layers=4)
    return llmreg.RegTrainer(
        model=model,
        args=hf_args(out, max_steps=max_steps, **kw),
        train_dataset=lm_dataset(tok),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        regularizers=regs,
    )


def _sft_trainer(out, regs):
    tok = build_char_tokenizer()
    args = sft_args(out, max_steps=3)
    return llmreg.RegSFTTrainer(
        model=tiny_llama(vocab_size=len(tok), num_hidden_layers=4),
        args=args,
        processing_class=tok,
        regularizers=regs,
        train_dataset=make_builtin_dataset(format="prompt_completion", num_examples=16),
    )


def _dpo_trainer(out, regs):
    tok = build_char_tokenizer()
    args = trl.DPOConfig(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=48,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    return llmreg.RegDPOTrainer(
        model=tiny_llama(vocab_size=len(tok), num_hidden_layers=4),
        ref_model=tiny_llama(vocab_size=len(tok), num_hidden_layers=4),
        args=args,
        processing_class=tok,
        regularizers=regs,
        train_dataset=make_builtin_dataset(format="preference", num_examples=16),
    )


def _adam_state_params(trainer) -> list[torch.nn.Parameter]:
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return [p for p, st in opt.state.items() if "exp_avg" in st]


@pytest.mark.parametrize("build", [_hf_trainer, _sft_trainer, _dpo_trainer], ids=["hf", "sft", "dpo"])
def test_frozen_unchanged_trainable_changed_and_no_optimizer_state_for_frozen(build, tmp_path):
    trainer = build(tmp_path, [{"name": "half_ft", "seed": 1}])
    before = weights(trainer.model)
    trainer.train()
    after = weights(trainer.model)
    frozen = set(trainer.reg_stack.regularizers[0].frozen)
    assert frozen
    for name in before:
        if name in frozen:
            assert torch.equal(before[name], after[name]), f"frozen {name} moved"
        else:
            assert not torch.equal(before[name], after[name]), f"trainable {name} did not move"
    # Adam state exactly for the trainable tensors: 2 x their elements, nothing for the frozen ones
    name_of = {id(p): n for n, p in trainer.model.named_parameters()}
    with_state = {name_of[id(p)] for p in _adam_state_params(trainer)}
    assert with_state == set(before) - frozen
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state_numel = sum(t.numel() for st in opt.state.values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    assert state_numel == 2 * sum(before[n].numel() for n in set(before) - frozen)
    logged = [
        h["reg/half_ft/trainable_fraction"] for h in trainer.state.log_history if "reg/half_ft/trainable_fraction" in h
    ]
    total = sum(t.numel() for t in before.values())
    assert logged and logged[-1] == pytest.approx(sum(before[n].numel() for n in set(before) - frozen) / total)


def test_resume_reuses_the_saved_frozen_set_not_a_new_draw(tmp_path):
    first = _hf_trainer(tmp_path, [{"name": "half_ft", "seed": 0}], max_steps=2, save_strategy="steps", save_steps=2)
    start = weights(first.model)
    first.train()
    seed0 = list(first.reg_stack.regularizers[0].frozen)
    # a different seed would draw another set; resuming must bring back the checkpoint's
    resumed = _hf_trainer(tmp_path, [{"name": "half_ft", "seed": 9}], max_steps=4, save_strategy="steps", save_steps=2)
    assert resumed.reg_stack.regularizers[0].frozen != seed0
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert resumed.reg_stack.regularizers[0].frozen == seed0
    end = weights(resumed.model)
    assert all(torch.equal(start[n], end[n]) for n in seed0)
    assert all(not torch.equal(start[n], end[n]) for n in set(start) - set(seed0))


def test_resume_without_a_saved_frozen_set_fails(tmp_path):
    plain = _hf_trainer(tmp_path, [{"name": "weight_decay"}], max_steps=2, save_strategy="steps", save_steps=2)
    plain.train()
    resumed = _hf_trainer(tmp_path, [{"name": "half_ft"}], max_steps=3)
    with pytest.raises(ValueError, match="regularizer state does not match"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_peft_is_refused_by_trainer_and_recipe(tmp_path):
    tok = build_char_tokenizer()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ConfigError, match="'half_ft' does not support PEFT"):
        _hf_trainer(tmp_path, ["half_ft"], model=get_peft_model(tiny_llama(vocab_size=len(tok)), lora))
    from llmreg.recipe.validate import validate_recipe

    raw = {
        "model": {"config": {"size": "tiny"}},
        "tokenizer": {"builtin": "char"},
        "data": {"train": "builtin:arithmetic"},
        "trainer": {"kind": "sft", "max_steps": 2},
        "peft": {"r": 4, "target_modules": ["q_proj"]},
        "regularizers": [{"name": "half_ft"}],
    }
    with pytest.raises(ConfigError, match="half_ft.*PEFT"):
        validate_recipe(raw)
    with pytest.raises(ConfigError, match="balance"):
        validate_recipe({**raw, "peft": None, "regularizers": [{"name": "half_ft", "balance": "half"}]})


def test_state_loaded_before_setup_is_applied_instead_of_a_draw():
    saved = _select(tiny_llama(num_hidden_layers=4), seed=0).state_dict()
    later = llmreg.build_regularizer({"name": "half_ft", "seed": 7})
    later.load_state_dict(saved)
    model = tiny_llama(num_hidden_layers=4)
    later.setup(model, trainer=None)
    assert later.frozen == saved["frozen"] != _select(tiny_llama(num_hidden_layers=4), seed=7).frozen
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == set(saved["frozen"])
