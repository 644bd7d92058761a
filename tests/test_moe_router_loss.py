"""MoE models (Qwen3-MoE, Mixtral; issue 16): the router load-balancing loss the host adds stays in the objective
of NoiseFiT (which replaces the host's loss; prefix sharing on and off, full and LoRA), KL-to-base and LfU,
checked against `model(..., output_router_logits=True).aux_loss` and the parents' losses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_args, lm_dataset, losses, max_rel_diff, sft_args, weights
from families import MOE_FAMILIES, tiny_model
from test_kl_to_base import _explicit_kl, _perturb
from test_noisefit import batch_with_prompt_mask, fake_trainer
from test_output_head import _noisefit_explicit

import llmreg
from llmreg.data import make_builtin_dataset
from llmreg.integrations.moe import router_aux
from llmreg.regularizers.kl_to_base import kl_positions

COEF = 0.5  # large enough that dropping the router term fails every comparison below


def _moe(name, router_logits=True):
    model = tiny_model(name)
    model.config.output_router_logits = router_logits
    model.config.router_aux_loss_coef = model.router_aux_loss_coef = COEF
    return model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _aux(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    return out.aux_loss


# -- NoiseFiT: the objective ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("forward", ["shared_prefix", "stacked", "three_forwards"])
@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_noisefit_objective_adds_the_router_loss_of_the_clean_branch(tok, name, forward, peft):
    model = _moe(name)
    model = _lora(model) if peft else model
    batch = batch_with_prompt_mask(tok)
    share = forward == "shared_prefix"
    opts = {"prefix_sharing": share, "pack_branches": "never" if forward == "three_forwards" else "auto"}
    reg = llmreg.build_regularizer({"name": "noisefit", "num_layers": 1, "noise_std": 0.8, **opts})
    reg.setup(model, None)
    reg.load_state_dict({"selected": [0]})  # layer 1 runs on 3B rows, layer 0 on B rows with sharing
    reg.on_prepared(model, None)
    assert reg._share_prefix == share
    model.train()
    ctx = llmreg.LossContext(model=model, inputs=batch, loss=None, outputs=None, trainer=fake_trainer(step=2))
    loss = reg.training_loss(ctx)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    logged = reg.metrics()
    reg.post_step(None)
    model.zero_grad()
    clean_aux = _aux(model, batch)
    want = _noisefit_explicit(model, batch, [0], 0.8, step=2, shard=0) + COEF * clean_aux
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert logged["router_aux"] == pytest.approx(clean_aux.item(), rel=1e-5)
    assert max_rel_diff({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, got) < 1e-4
    assert COEF * clean_aux.item() > 0.1  # the router term is a visible part of the objective


def test_router_loss_follows_the_host(tmp_path):
    model = _moe("mixtral", router_logits=False)
    assert router_aux(model, None) is None  # transformers' Trainer: the model adds it only when its config asks
    model.config.output_router_logits = True
    setting = router_aux(model, None)
    assert (setting.coef, setting.per_window, setting.num_experts, setting.top_k) == (COEF, False, 4, 2)
    assert router_aux(tiny_model("llama"), None) is None
    sft = _sft(tmp_path, _moe("qwen3_moe", router_logits=False), [], router_aux_loss_coef=0.25)
    setting = router_aux(sft.model, sft)  # TRL's SFTTrainer: on for MoE models, its coefficient, per window
    assert (setting.coef, setting.per_window) == (0.25, True)


# -- NoiseFiT: training, at zero noise the parent's loss ---------------------------------------------------------------


def _sft(out, model, regs, **kw):
    base = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=0.0,
        router_aux_loss_coef=COEF,
        bf16=False,  # TRL turns bf16 autocast on, also on CPU
        activation_checkpointing=True,  # SFTConfig's default, as these tests were written
    )
    base.update(kw)
    return llmreg.RegSFTTrainer(
        model=model,
        args=sft_args(out, **base),
        processing_class=_tok(),
        regularizers=regs,
        train_dataset=make_builtin_dataset(format="prompt_completion", num_examples=16),
    )


def _tok():
    from llmreg.data import build_char_tokenizer

    return build_char_tokenizer()


def _zero_noise():
    # alpha = 1, lam = 0 and no noise: the hybrid loss is the clean CE, so the objective is the parent's loss
    return {"name": "noisefit", "num_layers": 1, "layers": r"layers\.0$", "noise_std": 0.0, "alpha": 1.0, "lam": 0.0}


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_sft_noisefit_at_zero_noise_trains_like_sft_with_its_router_loss(tmp_path, name, peft):
    """With a 2-step accumulation window (TRL averages the router term over it), prefix sharing on and off."""

    def model():
        return _lora(_moe(name)) if peft else _moe(name)

    plain = _sft(tmp_path / "plain", model(), [])
    plain.train()
    for share in (True, False):
        reg = dict(_zero_noise(), prefix_sharing=share)
        ours = _sft(tmp_path / str(share), model(), [reg])
        ours.train()
        assert losses(ours) == pytest.approx(losses(plain), rel=1e-5)
        assert max_rel_diff(weights(plain.model), weights(ours.model)) < 1e-5
        aux = [h["reg/noisefit/router_aux"] for h in ours.state.log_history if "reg/noisefit/router_aux" in h]
        assert len(aux) == 2 and min(aux) > 0.1


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_sft_noisefit_with_noise_trains_on_moe(tmp_path, name):
    reg = {"name": "noisefit", "num_layers": 1, "layers": r"layers\.0$", "noise_std": 1.0}
    plain, ours = _sft(tmp_path / "plain", _moe(name), []), _sft(tmp_path / "ours", _moe(name), [reg])
    plain.train()
    ours.train()
    assert all(torch.isfinite(torch.tensor(losses(ours))))
    assert max_rel_diff(weights(plain.model), weights(ours.model)) > 1e-4  # the noise and soft terms act
    assert ours.reg_stack.regularizers[0]._share_prefix


def test_hf_trainer_noisefit_at_zero_noise_trains_like_the_trainer(tok, tmp_path):
    """transformers' Trainer: the model's own loss adds the router term per micro-batch (not averaged over the
    accumulation window); NoiseFiT adds it the same way."""
    from transformers import DataCollatorForLanguageModeling

    out = {}
    for regs in ([], [dict(_zero_noise(), prefix_sharing=True)]):
        trainer = llmreg.RegTrainer(
            model=_moe("mixtral"),
            args=hf_args(
                tmp_path / str(len(regs)),
                max_steps=2,
                per_device_train_batch_size=2,
                gradient_accumulation_steps=2,
                optim="sgd",
                max_grad_norm=0.0,
            ),  # fmt: skip
            train_dataset=lm_dataset(tok, n=8),
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            regularizers=regs,
        )
        trainer.train()
        out[len(regs)] = (losses(trainer), weights(trainer.model))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    assert max_rel_diff(out[0][1], out[1][1]) < 1e-5


# -- KL to the base and LfU keep the host's loss, router term included ----------------------------------------------


def _explicit_sft_loss(model, batch):
    """SFT's loss of one micro-batch (no accumulation): completion-token mean CE + coef * aux, and the logits."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return ce + COEF * out.aux_loss, out.logits


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_kl_to_base_and_lfu_add_to_the_host_loss_with_its_router_term(tmp_path, name):
    lam = 0.7
    policy = _moe(name)
    base = copy.deepcopy(policy).eval()  # before TRL patches the policy's forward with its fused head
    kl = _sft(tmp_path / "kl", policy, [{"name": "kl_to_base", "lam": lam}])
    _perturb(kl.model)  # the policy moved away from its base copy: KL > 0
    batch = kl._prepare_inputs(next(iter(kl.get_train_dataloader())))
    model = kl.model.train()
    got = kl.compute_loss(model, dict(batch))
    host, logits = _explicit_sft_loss(model, batch)
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = kl_positions(batch, batch["input_ids"].shape, "all")
    want = host + lam * _explicit_kl(logits, base_logits, mask).float()
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and want.item() - host.item() > 1e-4
    lfu = _sft(tmp_path / "lfu", _moe(name), [{"name": "lfu", "lam": 0.0}])
    model = lfu.model.train()
    got = lfu.compute_loss(model, dict(batch))
    assert got.item() == pytest.approx(_explicit_sft_loss(model, batch)[0].item(), rel=1e-5)
    lfu.reg_stack.regularizers[0].options.lam = 5.0
    lfu.train()  # and it trains with its consistency term on the MoE model
    assert all(torch.isfinite(torch.tensor(losses(lfu))))
