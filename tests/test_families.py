"""Issue 16, the structural side: the model anatomy layer (`llmreg.core.families`) on 15 architecture families, and
the regularizers that depend on it (half_ft, l2_sp, forgetting_penalty, multipliers, lfu aux lora), full and LoRA.

Tiny random models from `tests/families.py` (2 layers, hidden 64). Every family x regularizer x {full, LoRA}
training cell is `test_family_matrix.py`'s.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import edited_and_autograd_grads, random_artifact, sft_args, weights
from families import FAMILIES, MOE_FAMILIES, tiny_model
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

import llmreg
from llmreg.core import ConfigError
from llmreg.core.families import model_members, moe_parts
from llmreg.core.shards import ShardAccess
from llmreg.data import build_char_tokenizer, make_builtin_dataset
from llmreg.regularizers.forgetting import ForgettingPenalty
from llmreg.regularizers.forgetting import artifact as art
from llmreg.regularizers.forgetting.record import write_ewc_artifact, write_si_artifact
from llmreg.regularizers.forgetting.targets import adapted_tensor, default_selector, lora_delta, lora_targets

_DENSE = {"attention": 4, "ffn": 3, "norms": 2}
# members per category in one decoder layer: written out, so a misclassification fails here
EXPECTED = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "gemma": _DENSE,
    "granite": _DENSE,
    "qwen3": {**_DENSE, "qk_norms": 2},
    "olmo2": {**_DENSE, "qk_norms": 2},
    "gemma2": {**_DENSE, "norms": 4},
    "gemma3_text": {**_DENSE, "norms": 4, "qk_norms": 2},
    "qwen3_moe": {"attention": 4, "qk_norms": 2, "ffn": 2, "router": 1, "norms": 2},
    "mixtral": {"attention": 4, "ffn": 2, "router": 1, "norms": 2},
    "phi3": {"attention": 2, "ffn": 2, "norms": 2},  # fused qkv_proj / gate_up_proj: one member each
    "gpt_neox": {"attention": 2, "ffn": 2, "norms": 2},
    "falcon": {"attention": 2, "ffn": 2, "norms": 1},  # parallel attention: one block norm
    "gpt2": {"attention": 2, "ffn": 2, "norms": 2},
}
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


class _NoDS:
    is_deepspeed_enabled = False


def _sft(model, regs, out, peft=False, steps=3):
    args = sft_args(out, max_length=32, max_steps=steps, per_device_train_batch_size=2)
    return llmreg.RegSFTTrainer(
        model=model,
        args=args,
        processing_class=build_char_tokenizer(),
        regularizers=regs,
        peft_config=LoraConfig(**LORA) if peft else None,
        train_dataset=make_builtin_dataset(format="prompt_completion", num_examples=8),
    )


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


# -- the anatomy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_anatomy_places_every_decoder_tensor_once(family):
    model = tiny_model(family)
    layers = model_members(model)
    assert len(layers) == 2
    named = dict(model.named_parameters())
    for layer_name, members in layers:
        counts: dict[str, int] = {}
        for m in members:
            counts[m.category] = counts.get(m.category, 0) + 1
        assert counts == EXPECTED[family], (family, counts)
        claimed = [f"{layer_name}.{p}" for m in members for p in m.params]
        inside = [n for n in named if n.startswith(layer_name + ".")]
        assert sorted(claimed) == sorted(inside)  # every tensor of the layer, exactly once
    parts = moe_parts(model)
    assert bool(parts["experts"]) == bool(parts["router"]) == (family in MOE_FAMILIES)
    # under PEFT (all-linear: experts and routers wrapped too) the members are the plain model's
    peft = get_peft_model(tiny_model(family), LoraConfig(**LORA))
    assert [[(m.path, m.category, m.kind) for m in ms] for _, ms in model_members(peft)] == [
        [(m.path, m.category, m.kind) for m in ms] for _, ms in layers
    ]
    assert moe_parts(peft) == parts


# -- half_ft ----------------------------------------------------------------------------------------------


def _frozen_counts(model, frozen: set[str]) -> list[dict[str, tuple[int, int]]]:
    """Per layer {category: (members frozen, members)}; a member is frozen whole or not at all."""
    out = []
    for layer_name, members in model_members(model):
        counts: dict[str, tuple[int, int]] = {}
        for m in members:
            names = {f"{layer_name}.{p}" for p in m.params}
            assert names <= frozen or not names & frozen, m.path  # biases follow their matrix
            done, total = counts.get(m.category, (0, 0))
            counts[m.category] = (done + (names <= frozen), total + 1)
        out.append(counts)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_half_ft_default_categories_train_and_follow_the_rule(family, tmp_path):
    trainer = _sft(tiny_model(family), [{"name": "half_ft", "seed": 3}], tmp_path)
    model = trainer.model
    reg = list(trainer.reg_stack)[0]
    frozen = set(reg.frozen)
    before = weights(model)
    trainer.train()
    after = weights(model)
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # the frozen half is exactly unchanged
    moved = [n for n in before if n not in frozen and not torch.equal(before[n], after[n])]
    assert any(".0." in n for n in moved) and any(".1." in n for n in moved)
    per_layer = _frozen_counts(model, frozen)
    for category, n in EXPECTED[family].items():
        got = [layer[category][0] for layer in per_layer]
        if n % 2 == 0:
            assert got == [n // 2, n // 2], (category, got)
        else:  # floor(L/2) = 1 of the 2 layers rounds up
            assert sorted(got) == [n // 2, n // 2 + 1], (category, got)
    assert not any(n.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")) for n in frozen)


# -- forgetting penalty: LoRA on Conv1D and on MoE experts / routers -----------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "qwen3_moe", "mixtral", "phi3"])
def test_lora_delta_is_peft_delta_in_the_base_layout(family):
    model = get_peft_model(tiny_model(family), LoraConfig(**LORA, init_lora_weights=False))
    targets = {t.name: t for t in lora_targets(model, default_selector([], []))}
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        key, _, tensor = adapted_tensor(name, module)
        t = targets[key]
        ours = lora_delta(t, t.lora_a.detach(), t.lora_b.detach())
        assert ours.shape == tensor.shape == t.shape, key
        assert torch.allclose(ours, module.get_delta_weight("default").detach(), atol=1e-6), key
        checked += 1
    assert checked == len(targets) > 0
    if family in MOE_FAMILIES:  # experts (2 tensors) and the router of both layers are covered
        assert sum(".experts." in n or ".mlp.gate." in n for n in targets) == 6


@pytest.mark.parametrize("family", ["gpt2", "qwen3_moe"])
def test_lora_penalty_is_explicit_sum_in_the_weights_own_layout(family, tok, tmp_path):
    """An artifact recorded on the plain model is accepted under LoRA; penalty and gradients equal the explicit
    lam * sum Omega * (W - W0)^2 with W = base + PEFT's own delta, Omega aligned with the weight element for
    element (GPT-2 Conv1D [in, out], square c_proj included; 3-D experts)."""
    path = random_artifact(tmp_path / "imp", tiny_model(family), scale=5.0)
    model = get_peft_model(tiny_model(family), LoraConfig(**LORA, init_lora_weights=False))
    model.eval()  # GPT-2's dropout would make the two forwards differ
    reg = ForgettingPenalty(artifact=path, lam=0.7, layer_weighting="none")
    reg.setup(model, _NoDS())
    shards = ShardAccess.from_model(model)
    reg.on_prepared(model, shards)
    modules = {adapted_tensor(n, m)[0]: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    start = {k: m.get_delta_weight("default").detach().clone() for k, m in modules.items()}
    omega = art.load_importance(path, modules)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))

    def explicit(_model):
        return sum(0.7 * (omega[k] * (m.get_delta_weight("default") - start[k]) ** 2).sum() for k, m in modules.items())

    edited, reference, penalty = edited_and_autograd_grads(model, tok, reg, shards, explicit)
    for n in reference:
        assert torch.allclose(edited[n], reference[n], atol=1e-6, rtol=1e-4), n
    assert float(penalty.detach()) > 0 and reg.metrics()["penalty"] == pytest.approx(float(penalty.detach()), rel=1e-5)
    if family == "gpt2":  # the square c_proj: the transposed Omega would give another value
        key = "transformer.h.0.attn.c_proj.weight"
        m = modules[key]
        diff = (m.get_delta_weight("default") - start[key]).detach()
        assert not math.isclose(float((omega[key] * diff**2).sum()), float((omega[key].T * diff**2).sum()))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_importance_phase_records_experts_and_router_and_the_lora_run_uses_them(family, tmp_path):
    """SI (trained) and EWC (Fisher) artifacts of an MoE model cover the expert tensors and routers, and a LoRA
    all-linear run regularises them with that importance."""
    trainer = _sft(tiny_model(family), [{"name": "si_importance"}], tmp_path)
    trainer.train()
    write_si_artifact(trainer, list(trainer.reg_stack)[0], str(tmp_path / "si"))
    write_ewc_artifact(_sft(tiny_model(family), [], tmp_path), str(tmp_path / "ewc"), num_samples=2)
    for method in ("si", "ewc"):
        names = art.read_meta(str(tmp_path / method))["importance_sum_sq"]
        for layer in (0, 1):
            mlp = f"model.layers.{layer}.mlp."
            wanted = {mlp + "experts.gate_up_proj", mlp + "experts.down_proj", mlp + "gate.weight"}
            assert wanted <= set(names), (method, sorted(names))
            assert all(names[n] > 0 for n in wanted), method
    regs = [{"name": "forgetting_penalty", "artifact": str(tmp_path / "si"), "anchor": "pretrained"}]
    trainer = _sft(tiny_model(family), regs, tmp_path, peft=True)
    trainer.train()
    _check_penalty(trainer, family, "forgetting_penalty")


# -- multipliers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MOE_FAMILIES + ("gpt2",)])
def test_multipliers_at_init_leave_the_logits_unchanged(family):
    plain = tiny_model(family).eval()
    wrapped = tiny_model(family).eval()
    reg = llmreg.build_regularizer({"name": "multipliers", "placement": "all", "tied_embeddings": "untie"})
    reg.setup(wrapped, trainer=None)
    embed_name = next(n for n, m in wrapped.named_modules() if m is wrapped.get_input_embeddings())
    assert embed_name in reg.plan  # the embedding is wrapped (tied or not)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(wrapped(ids).logits, plain(ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_multipliers_refuse_moe_unless_skip(family):
    with pytest.raises(ConfigError, match="mixture-of-experts.*moe: skip"):
        llmreg.build_regularizer({"name": "multipliers"}).setup(tiny_model(family), trainer=None)
    reg = llmreg.build_regularizer({"name": "multipliers", "moe": "skip"})
    reg.setup(tiny_model(family), trainer=None)
    assert reg.plan and not any(".mlp." in n for n in reg.plan)


def test_multipliers_refuse_conv1d():
    with pytest.raises(ConfigError, match="Conv1D"):
        llmreg.build_regularizer({"name": "multipliers"}).setup(tiny_model("gpt2"), trainer=None)


# -- helpers ----------------------------------------------------------------------------------------------


def _covered(reg) -> set[str]:
    return set(reg._params) | {t.name for t in reg._lora}


def _check_penalty(trainer, family, name):
    assert _logged(trainer, f"reg/{name}/penalty")[-1] > 0
    if family in MOE_FAMILIES:  # expert tensors and routers are regularised
        covered = _covered(list(trainer.reg_stack)[0])
        assert any(".mlp.experts." in n for n in covered) and any(".mlp.gate." in n for n in covered), covered
