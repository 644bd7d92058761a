"""Issue 16, point 6: every architecture family x every regularizer that trains under the HF Trainer x {full, LoRA}.

Each cell trains 2 steps (batch 2, sequence 16) of a tiny random model (`tests/families.py`, built once per family
and deep-copied) with `RegTrainer`, the cheapest host, and asserts that the regularizer did something on that
architecture: a penalty > 0 over exactly the tensors the anatomy layer names, a frozen share of the decoder near
one half, the wrapped-module count, KL terms > 0, the weight-decay groups. Or the cell is refused with the one-line
ConfigError that the README's regularizer table lists ("not supported on X because Y"; `test_readme_lists_...`
checks the table), and where the refusal names a way out (`moe: skip`, `aux_lora_targets`) the way out runs too.

`lp_reg` is GRPO only: its cells are the proxy pass on every family at forward level (the min-p proxy from the
final hidden states equals the one from the model's own logits), and a 2-step GRPO run per family and mode.

The quick loop keeps one dense family, one MoE, Gemma 2 (softcap, 4 norms) and GPT-2 (Conv1D); the other families'
cells are `slow`. What this file does not repeat: the anatomy's member counts and half_ft's per-category rule
(`test_families.py`), the logit transforms against the model's forward (`test_output_head.py`), the MoE router
loss in the objective (`test_moe_router_loss.py`).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, hf_args, lm_dataset, random_artifact
from families import FAMILIES, MOE_FAMILIES, tiny_model
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling

import llmreg
from llmreg.core import ConfigError
from llmreg.core.anatomy import base_name
from llmreg.core.families import model_members
from llmreg.data import build_char_tokenizer

# the 15 architectures (tied Llama among them) and Gemma 1: every family of tests/families.py
MATRIX = FAMILIES + ("llama_tied",)
QUICK = ("llama", "qwen3_moe", "gemma2", "gpt2")
CELLS = (
    "l2_sp",
    "forgetting_penalty",
    "half_ft",
    "noisefit",
    "lfu_reps",
    "lfu_lora",
    "multipliers",
    "weight_decay",
    "kl_to_base",
    "si_importance",
)
OPTIONS = {  # options that act visibly in 2 steps on a 2-layer model
    "l2_sp": {"name": "l2_sp", "lam": 1.0},
    "forgetting_penalty": {"name": "forgetting_penalty", "lam": 1.0},  # + the family's artifact
    "half_ft": {"name": "half_ft", "seed": 3},
    "noisefit": {"name": "noisefit", "num_layers": 1, "noise_std": 1.0},
    "lfu_reps": {"name": "lfu", "aux": "reps", "alpha": 0.5},
    "lfu_lora": {"name": "lfu", "aux": "lora", "alpha": 0.5},
    "multipliers": {"name": "multipliers"},
    "weight_decay": {"name": "weight_decay", "weight_decay": 0.1},
    "kl_to_base": {"name": "kl_to_base", "lam": 1.0},
    "si_importance": {"name": "si_importance"},
}
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
PEFT_REFUSED = ("half_ft", "multipliers", "si_importance")  # requires.supports_peft is False


def refusal(cell: str, mode: str, family: str) -> tuple[str, dict] | None:
    """(message pattern, options of the way out or {}) of a refused cell; None where the cell must train."""
    moe = family in MOE_FAMILIES
    if mode == "lora" and cell in PEFT_REFUSED:
        return "does not support PEFT", {}
    if cell == "multipliers" and family == "gpt2":
        return "Conv1D", {}
    if cell == "multipliers" and moe:
        return "mixture-of-experts.*moe: skip", {"moe": "skip"}
    if cell == "lfu_lora" and moe:  # full: the auxiliary LoRA; PEFT all-linear: experts and routers are adapted
        if mode == "full":
            return "mixture-of-experts.*aux_lora_targets", {"aux_lora_targets": ["self_attn"]}
        return "ParamWrapper.*target_modules", {}
    return None


# -- builders ---------------------------------------------------------------------------------------------------------

_MODELS: dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    return lm_dataset(tok, n=8, length=16)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """One importance artifact per family, recorded on its tiny model (random Omega)."""
    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            made[family] = random_artifact(tmp_path_factory.mktemp(family), _base(family))
        return made[family]

    return get


def _base(family: str) -> torch.nn.Module:
    if family not in _MODELS:
        model = tiny_model(family)
        if family in MOE_FAMILIES:  # the router load-balancing loss in the host's loss, as TRL's SFT trainer sets it
            model.config.output_router_logits = True
        _MODELS[family] = model
    return _MODELS[family]


def _model(family: str, mode: str) -> torch.nn.Module:
    model = copy.deepcopy(_base(family))
    return get_peft_model(model, LoraConfig(**LORA)) if mode == "lora" else model


def _trainer(model, regs, out, tok, data):
    return llmreg.RegTrainer(
        model=model,
        args=hf_args(out, max_steps=2, per_device_train_batch_size=2),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        regularizers=regs,
    )


def _logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


# -- what the anatomy says each cell must cover -----------------------------------------------------------------------


def _decoder(family: str) -> list[tuple[str, list]]:
    return model_members(_base(family))


def decoder_matrices(family: str) -> set[str]:
    """The weight matrices of the decoder layers: every member but the norms (linear, Conv1D, router, each 3-D expert
    tensor) has exactly one tensor of 2 or more dimensions."""
    named = dict(_base(family).named_parameters())
    out = set()
    for layer, members in _decoder(family):
        for m in members:
            big = [f"{layer}.{p}" for p in m.params if named[f"{layer}.{p}"].dim() >= 2]
            assert len(big) == (m.kind != "norm"), m
            out.update(big)
    return out


def projections(family: str) -> list[str]:
    """Linear / Conv1D members (module paths) of the decoder layers: what multipliers and lfu's aux LoRA wrap."""
    kinds = ("linear", "conv1d")
    return [f"{layer}.{m.path}" for layer, members in _decoder(family) for m in members if m.kind in kinds]


def decoder_frozen_share(model, frozen: set[str]) -> tuple[list[float], float]:
    """Frozen share of each decoder layer's parameters, and of all decoder layers together."""
    named = dict(model.named_parameters())
    per_layer, done, total = [], 0, 0
    for layer, members in model_members(model):
        sizes = {f"{layer}.{p}": named[f"{layer}.{p}"].numel() for m in members for p in m.params}
        layer_frozen = sum(n for name, n in sizes.items() if name in frozen)
        per_layer.append(layer_frozen / sum(sizes.values()))
        done, total = done + layer_frozen, total + sum(sizes.values())
    return per_layer, done / total


# -- the checks: what "did something" means per regularizer -----------------------------------------------------------


def _covered(reg) -> set[str]:
    return set(reg._params) | {t.name for t in reg._lora}


def check_penalty(trainer, reg, family, mode, key):
    assert _logged(trainer, f"reg/{key}/penalty")[-1] > 0
    if key == "l2_sp" and mode == "full":  # every trainable tensor, embeddings and norms included
        want = {base_name(n) for n, p in trainer.model.named_parameters() if p.requires_grad}
    else:  # forgetting_penalty's default and every LoRA run: the decoder's matrices (experts and routers included)
        want = decoder_matrices(family)
    assert _covered(reg) == want


def check_half_ft(trainer, reg, family, mode):
    frozen = set(reg.frozen)
    assert frozen and not any(p.requires_grad for n, p in trainer.model.named_parameters() if n in frozen)
    # a category freezes half of its members, whole: on a 2-layer model with members of unequal size (GQA k/v,
    # fused qkv) one draw freezes between a third and two thirds of a layer; the share over draws is
    # test_half_ft_frozen_share_over_draws's
    per_layer, total = decoder_frozen_share(trainer.model, frozen)
    assert all(0.3 < share < 0.7 for share in per_layer + [total]), (per_layer, total)


def check_noisefit(trainer, reg, family, mode):
    assert _logged(trainer, "reg/noisefit/soft")[-1] > 0
    assert _logged(trainer, "reg/noisefit/consistency")[-1] > 0
    assert _logged(trainer, "reg/noisefit/num_noisy_layers")[-1] == 1
    if family in MOE_FAMILIES:  # the router term stays in the objective NoiseFiT replaces the host's with
        assert _logged(trainer, "reg/noisefit/router_aux")[-1] > 0


def check_lfu(trainer, reg, family, mode, targets=()):
    assert _logged(trainer, "reg/lfu/l_cons")[-1] > 0
    assert _logged(trainer, "reg/lfu/ascent_grad_norm")[-1] > 0
    if reg.options.aux == "lora" and mode == "full":  # one perturbation per (selected) decoder projection
        want = [p for p in projections(family) if not targets or any(re.search(t, p) for t in targets)]
        assert len(reg._aux.a_factors) == len(want) > 0


def check_multipliers(trainer, reg, family, mode):
    model = trainer.model
    embed = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    want = set(projections(family)) | (set() if tied else {embed})  # tied: no embedding multipliers by default
    assert set(reg.plan) == want
    assert sum(n.endswith("lrm_row") for n, _ in model.named_parameters()) == len(want)


def check_weight_decay(trainer, reg, family, mode):
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups: dict[float, set[str]] = {}
    for g in trainer.optimizer.param_groups:
        groups.setdefault(g["weight_decay"], set()).update(names[id(p)] for p in g["params"])
    assert set(groups) <= {0.0, 0.1}
    decay, plain = groups.get(0.1, set()), groups.get(0.0, set())
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert decay | plain == trainable and not decay & plain
    if mode == "lora":  # the adapters' factors are matrices
        assert decay == trainable
        return
    inside = {f"{layer}.{p}" for layer, members in _decoder(family) for m in members for p in m.params}
    assert decoder_matrices(family) <= decay  # every matrix of the decoder decays ...
    assert inside - decoder_matrices(family) <= plain  # ... its norm gains and biases do not


def check_kl(trainer, reg, family, mode):
    assert _logged(trainer, "reg/kl_to_base/kl_per_token")[-1] > 0


def check_si(trainer, reg, family, mode):
    assert set(reg.names) == decoder_matrices(family)
    assert all(float(reg.omega[n].abs().sum()) > 0 for n in reg.names)


CHECKS = {
    "l2_sp": lambda *a: check_penalty(*a, "l2_sp"),
    "forgetting_penalty": lambda *a: check_penalty(*a, "forgetting_penalty"),
    "half_ft": check_half_ft,
    "noisefit": check_noisefit,
    "lfu_reps": check_lfu,
    "lfu_lora": check_lfu,
    "multipliers": check_multipliers,
    "weight_decay": check_weight_decay,
    "kl_to_base": check_kl,
    "si_importance": check_si,
}


# -- the matrix -------------------------------------------------------------------------------------------------------


def _families():
    return [f if f in QUICK else pytest.param(f, marks=pytest.mark.slow) for f in MATRIX]


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("family", _families())
def test_cell(family, cell, mode, tmp_path, tok, data, artifacts):
    options = dict(OPTIONS[cell])
    if cell == "forgetting_penalty":
        options["artifact"] = artifacts(family)
    refused = refusal(cell, mode, family)
    if refused is not None:
        pattern, way_out = refused
        with pytest.raises(ConfigError, match=pattern) as err:
            _trainer(_model(family, mode), [options], tmp_path, tok, data)
        assert "\n" not in str(err.value)
        if not way_out:
            return
        options.update(way_out)
    trainer = _trainer(_model(family, mode), [options], tmp_path, tok, data)
    trainer.train()
    assert trainer.state.global_step == 2
    reg = trainer.reg_stack.regularizers[0]
    if cell == "lfu_lora" and refused:
        check_lfu(trainer, reg, family, mode, targets=options["aux_lora_targets"])
    else:
        CHECKS[cell](trainer, reg, family, mode)


def test_every_registered_regularizer_is_in_the_matrix():
    assert {o["name"] for o in OPTIONS.values()} | {"lp_reg"} == set(llmreg.available())


# -- the README lists every refusal -----------------------------------------------------------------------------------

# the pattern of a refusal -> (README row, the phrase that row must hold)
DOCUMENTED = {
    "Conv1D": ("multipliers", "not supported on GPT-2 Conv1D layers because"),  # compared ignoring case
    "mixture-of-experts.*moe: skip": ("multipliers", "not supported on MoE routers because"),
    "mixture-of-experts.*aux_lora_targets": ("lfu", "not supported on MoE expert tensors and routers because"),
    "ParamWrapper.*target_modules": ("lfu", "not supported on MoE expert tensors and routers because"),
}


def _readme_row(name: str) -> str:
    text = Path(REPO, "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, name
    return rows[0]


def test_readme_lists_every_refusal_of_the_matrix():
    seen = set()
    for family in MATRIX:
        for cell in CELLS:
            for mode in ("full", "lora"):
                refused = refusal(cell, mode, family)
                if refused is None:
                    continue
                name = OPTIONS[cell]["name"]
                row, phrase = DOCUMENTED.get(refused[0], (name, "not supported under PEFT because"))
                assert row == name
                assert phrase.lower() in _readme_row(name).lower(), (name, phrase)
                seen.add(refused[0])
    assert seen == set(DOCUMENTED) | {"does not support PEFT"}


# -- half_ft: the frozen share over draws (the "45-55 %" acceptance) ------------------------------------------


@pytest.mark.parametrize("family", MATRIX)
def test_half_ft_frozen_share_over_draws(family):
    """The paper's rule freezes 2 of 3 FFN matrices in half the layers (39 % / 61 % of a Llama layer): the decoder
    as a whole is the half. With the default `balance: count` the share of the decoder is one half on average over
    draws on every family; with `balance: params` every draw freezes half the decoder's parameters on every family
    (GQA's k/v are smaller than q/o; fused pairs alternate across layers)."""
    from llmreg.regularizers.half_ft import anatomy_layers, draw_frozen

    model = _base(family)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    layers = anatomy_layers(model)
    inside = [
        {name: sizes[name] for cat in layer.values() for names in cat.values() for name in names} for layer in layers
    ]
    total = sum(sum(layer.values()) for layer in inside)

    def share(balance: str, seed: int) -> float:
        frozen = set(draw_frozen(layers, sizes, seed, 0, balance))
        return sum(n for layer in inside for name, n in layer.items() if name in frozen) / total

    counted = [share("count", seed) for seed in range(200)]
    assert abs(sum(counted) / len(counted) - 0.5) < 0.02
    # params: unequal pairs (fused qkv beside o, MoE gate_up beside down) alternate across layers: exactly half
    assert all(abs(share("params", seed) - 0.5) < 0.005 for seed in range(50))


@pytest.mark.parametrize("family", ["phi3", "gpt2", "qwen3_moe"])
def test_half_ft_params_balance_freezes_the_larger_of_an_unequal_pair_in_half_the_layers(family):
    """No choice inside one layer halves a pair of unequal members (Phi-3 qkv_proj / o_proj): `balance: params`
    freezes the larger in a random half of the layers and the smaller in the others, for every seed."""
    from llmreg.regularizers.half_ft import anatomy_layers, draw_frozen

    model = _base(family)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    layers = anatomy_layers(model)
    for seed in range(10):
        frozen = set(draw_frozen(layers, sizes, seed, 0, "params"))
        for cat in layers[0]:
            members = layers[0][cat]
            member_sizes = {m: sum(sizes[n] for n in members[m]) for m in members}
            if len(members) != 2 or len(set(member_sizes.values())) != 2:
                continue
            larger = max(member_sizes, key=member_sizes.get)
            froze_larger = [all(n in frozen for n in layer[cat][larger]) for layer in layers]
            froze_any = [sum(all(n in frozen for n in layer[cat][m]) for m in layer[cat]) for layer in layers]
            assert froze_any == [1] * len(layers)  # one member per layer
            assert sum(froze_larger) == len(layers) // 2  # the larger one in half of the layers


# -- lp_reg (GRPO only): the proxy pass on every family, a GRPO run on the quick ones -----------------------------


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", MATRIX)
def test_lp_reg_proxy_from_hidden_states_is_the_models_on_every_family(family, mode):
    """The min-p proxy Lp-Reg forms from the final hidden states and the LM head (then the model's own logit
    transform) equals the one of the model's own logits, on every architecture, plain and under LoRA."""
    from test_output_head import check_lp_reg_proxy_is_the_model_logits_proxy

    model = copy.deepcopy(_base(family))
    if mode == "lora":  # adapters that change the output: the proxy must be the adapted model's
        model = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False))
    check_lp_reg_proxy_is_the_model_logits_proxy(model.eval())


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", _families())
def test_lp_reg_trains_two_grpo_steps(family, mode, tmp_path, tok):
    from test_lp_reg_grpo import grpo_args

    from llmreg.data import make_builtin_dataset

    draws = torch.Generator().manual_seed(0)

    def reward(completions, **_):  # never a tie: every group has negative-advantage tokens to regularise
        return torch.rand(len(completions), generator=draws).tolist()

    trainer = llmreg.RegGRPOTrainer(
        model=copy.deepcopy(_base(family)),
        args=grpo_args(tmp_path, max_steps=2, bf16=False),
        processing_class=tok,
        reward_funcs=reward,
        train_dataset=make_builtin_dataset(format="prompt_only", num_examples=8),
        regularizers=[{"name": "lp_reg", "rho": 0.9, "minp_kappa": 0.7}],
        peft_config=LoraConfig(**LORA) if mode == "lora" else None,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    # the proxy pass ran on each generation batch, from this architecture's hidden states (its values are the
    # forward-level test's); whether a sampled token is selected depends on the draw on a near-uniform tiny model
    assert len(_logged(trainer, "reg/lp_reg/threshold_prob")) == 2
    assert all(0 < t < 1 for t in _logged(trainer, "reg/lp_reg/threshold_prob"))
    assert len(_logged(trainer, "reg/lp_reg/penalty")) == 2
