"""The model's own logit transform (`llmreg.core.output_head`, issue 16) and every path that forms logits from
hidden states (NoiseFiT, Lp-Reg, KL-to-base) against the model's own forward logits, on the families that
transform them: Gemma 2 / Gemma 3 (`final_logit_softcapping`) and Granite (`logits_scaling`).

A tiny random model's logits are below 1 in size, where the families' softcap of 30 changes them by about 1e-5:
the tests cap at 0.3 instead, so that a path without the softcap fails them by far."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import trl
from conftest import losses, make_hf_trainer, max_rel_diff, weights
from families import _COMMON, FAMILIES, tiny_model
from test_kl_to_base import check_gradient_is_autograd_of_the_explicit_objective
from test_lp_reg_math import ref_proxy

import llmreg
from llmreg.core import anatomy
from llmreg.core.output_head import LogitTransform, logit_transform, with_transform
from llmreg.integrations import trl as trl_compat
from llmreg.regularizers.lp_reg import hidden_proxy_stats
from llmreg.regularizers.noisefit.noise import adaptive_noise, branch_base, standard_normal, training_noise_key

TRANSFORMED = ("gemma2", "gemma3_text", "granite")
CAP = 0.3  # final_logit_softcapping of the Gemma models here (see the module docstring)
# more families whose forward transforms its logits, as tiny configs (mpt: a `logit_scale` its model ignores)
EXTRA = {
    "cohere": dict(_COMMON, logit_scale=0.25),
    "cohere2": dict(_COMMON, logit_scale=0.25),
    "hyperclovax": dict(_COMMON, logits_scaling=0.5),
    "granitemoe": dict(_COMMON, logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2),
    "vaultgemma": dict(_COMMON, final_logit_softcapping=CAP),
    "recurrent_gemma": dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        logits_soft_cap=CAP,
        lru_width=64,
        attention_window_size=16,
    ),  # fmt: skip
    "mpt": dict(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=128, logit_scale=0.5),
}
NOT_IDENTITY = set(TRANSFORMED) | set(EXTRA) - {"mpt"}


def _model(name):
    """The family's tiny model; Gemma's softcap lowered to CAP (the model reads its config in forward)."""
    if name not in EXTRA:
        model = tiny_model(name)
        if getattr(model.config, "final_logit_softcapping", None):
            model.config.final_logit_softcapping = CAP
        return model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **EXTRA[name])).float()


def _final_hidden(model, **inputs):
    return anatomy.final_hidden(anatomy.decoder(model)(**inputs, use_cache=False))


# -- the transform ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES + tuple(EXTRA))
def test_head_and_transform_reproduce_the_forward_logits(name):
    model = _model(name).eval()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
        hidden = _final_hidden(model, input_ids=ids)
        transform = logit_transform(model.config)
        got = with_transform(model.get_output_embeddings(), transform)(hidden).float()
        raw = model.get_output_embeddings()(hidden).float()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert transform.is_identity == (name not in NOT_IDENTITY), transform
    if name in NOT_IDENTITY:  # the bare head is not the model's logits there: the check above can fail
        assert (raw - want).abs().max() > 1e-3


def test_transform_formula_and_config_reading():
    from transformers import AutoConfig

    z = torch.linspace(-200, 200, 11)
    assert torch.allclose(LogitTransform(0.5, 30.0)(z), 30.0 * torch.tanh(0.5 * z / 30.0))
    assert LogitTransform().is_identity and LogitTransform()(z) is z
    assert logit_transform(AutoConfig.for_model("falcon_h1", lm_head_multiplier=0.3)) == LogitTransform(0.3)
    assert logit_transform(AutoConfig.for_model("granite", logits_scaling=8.0)) == LogitTransform(0.125)
    # a multimodal config: the text part's softcap
    gemma3 = AutoConfig.for_model("gemma3", text_config=dict(final_logit_softcapping=7.0))
    assert logit_transform(gemma3) == LogitTransform(1.0, 7.0)
    assert logit_transform(AutoConfig.for_model("llama")).is_identity


# -- NoiseFiT ---------------------------------------------------------------------------------------------------------


def _noisefit_explicit(model, batch, selected, sigma, step, shard, alpha=0.5, lam=0.1):
    """Three forwards of the model with the noise on `selected` layers, its own logits, the hybrid formula."""
    layers = [m for _, m in anatomy.decoder_layers(model)]
    logits = []
    for branch in (0, 1, 2):
        handles = []
        for layer in selected if branch else ():

            def hook(m, a, out, layer=layer, branch=branch):
                h = out if torch.is_tensor(out) else out[0]
                eps = standard_normal(h.shape, h.device, *training_noise_key(0, step, shard, layer, branch))
                noisy = adaptive_noise(h, eps, branch_base(h, sigma))
                return noisy if torch.is_tensor(out) else (noisy, *out[1:])

            handles.append(layers[layer].register_forward_hook(hook))
        logits.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float())
        for handle in handles:
            handle.remove()
    labels = batch["labels"][:, 1:]
    z0, z1, z2 = (z[:, :-1] for z in logits)
    mask = (labels != -100).float()
    ce = F.cross_entropy(z0.reshape(-1, z0.shape[-1]), labels.reshape(-1), ignore_index=-100)
    lp0, lq1, lq2 = (F.log_softmax(z, -1) for z in (z0, z1, z2))
    soft = 0.5 * ((lp0.exp() * (lp0 - lq1)).sum(-1) + (lp0.exp() * (lp0 - lq2)).sum(-1))
    cons = (lq2.exp() * (lq2 - lq1)).sum(-1)
    return alpha * ce + (1 - alpha) * (soft * mask).sum() / mask.sum() + lam * (cons * mask).sum() / mask.sum()


@pytest.mark.parametrize("name", TRANSFORMED)
def test_noisefit_loss_and_gradient_equal_the_formula_on_the_model_logits(tok, name):
    from test_noisefit import batch_with_prompt_mask, fake_trainer

    model = _model(name)
    batch = batch_with_prompt_mask(tok)
    reg = llmreg.build_regularizer({"name": "noisefit", "num_layers": 1, "noise_std": 0.8})
    reg.setup(model, None)
    reg.load_state_dict({"selected": [0]})
    reg.on_prepared(model, None)
    model.train()
    ctx = llmreg.LossContext(model=model, inputs=batch, loss=None, outputs=None, trainer=fake_trainer(step=2))
    loss = reg.training_loss(ctx)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.post_step(None)
    model.zero_grad()
    want = _noisefit_explicit(model, batch, [0], 0.8, step=2, shard=0)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert max_rel_diff({n: p.grad for n, p in model.named_parameters()}, got) < 1e-4
    # v2's calibration probe forms its log-probabilities through the same head
    from llmreg.regularizers.noisefit.loss import positions

    model.eval()
    with torch.no_grad():
        pos = positions(batch["labels"])
        logp, _ = reg._probe().logprobs(_final_hidden(model, input_ids=batch["input_ids"]), pos)
        want_lp = F.log_softmax(model(input_ids=batch["input_ids"]).logits[pos.rows, pos.cols].float(), -1)
    assert torch.allclose(logp, want_lp, atol=1e-5)


# -- KL to the base ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["host_logits", "hidden_states"])
@pytest.mark.parametrize("name", TRANSFORMED)
def test_kl_to_base_equals_the_explicit_objective_on_the_model_logits(tok, tmp_path, name, path):
    lam = 0.7
    trainer = make_hf_trainer(tok, tmp_path, [{"name": "kl_to_base", "lam": lam, "chunk_size": 16}], model=_model(name))
    check_gradient_is_autograd_of_the_explicit_objective(trainer, tok, lam, path)


# -- Lp-Reg -----------------------------------------------------------------------------------------------------------


def check_lp_reg_proxy_is_the_model_logits_proxy(model, temperature: float = 0.8):
    """Lp-Reg's min-p proxy formed from the final hidden states and the LM head (then the model's logit transform)
    equals `ref_proxy` of the model's own logits; returns (ids, the reference log-probs). Shared with
    tests/test_family_matrix.py."""
    reg = llmreg.build_regularizer({"name": "lp_reg"})
    reg.setup(model, SimpleNamespace(loss_type="dapo"))
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    kappa = 0.9  # a nearly uniform model: only a large kappa filters
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        hidden = _final_hidden(model, input_ids=ids)[:, :-1]
        head = model.get_output_embeddings()
        stats = hidden_proxy_stats(
            hidden, head.weight, head.bias, ids[:, 1:], kappa, temperature, chunk_size=7, transform=reg._transform
        )
    logp, proxy, kept = ref_proxy(logits, ids[:, 1:], kappa, temperature)
    assert torch.allclose(stats.logp.double(), logp.double(), atol=1e-5)
    assert torch.equal(stats.kept, kept) and not kept.all()
    assert torch.allclose(stats.proxy_logp[kept].double(), proxy[kept].double(), atol=1e-5)
    return ids, logp


@pytest.mark.parametrize("name", TRANSFORMED)
def test_lp_reg_proxy_is_formed_from_the_model_logits_and_matches_trls_fused_head(name):
    model = _model(name).eval()
    temperature = 0.8
    ids, logp = check_lp_reg_proxy_is_the_model_logits_proxy(model, temperature)
    # the policy's log-probs in the penalty come from TRL's fused head: the same transform
    fused = copy.deepcopy(model)
    trl.trainer.utils.add_fused_lm_head(fused, temperature=temperature)
    with torch.no_grad():
        trl_logp = fused(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    assert torch.allclose(trl_logp.double(), logp.double(), atol=1e-5)


# -- training on the transformed families -----------------------------------------------------------------------------


def _sft(out, model, regs):
    from test_moe_router_loss import _sft as sft

    return sft(out, model, regs, gradient_accumulation_steps=1, router_aux_loss_coef=None)


@pytest.mark.parametrize("name", TRANSFORMED)
def test_noisefit_and_kl_to_base_train_on_the_family(tmp_path, name):
    init = weights(_model(name))
    for reg in ({"name": "noisefit", "num_layers": 1, "noise_std": 1.0}, {"name": "kl_to_base", "lam": 1.0}):
        trainer = _sft(tmp_path / reg["name"], _model(name), [reg])
        trainer.train()
        assert len(losses(trainer)) == 2 and all(torch.isfinite(torch.tensor(losses(trainer))))
        assert max_rel_diff(init, weights(trainer.model)) > 1e-4
    kl = [h["reg/kl_to_base/kl_per_token"] for h in trainer.state.log_history if "reg/kl_to_base/kl_per_token" in h]
    assert kl[-1] > 0  # the policy moved off its base


@pytest.mark.slow
def test_lp_reg_trains_on_gemma2_with_the_proxy_of_the_model_logits(tmp_path):
    """The GRPO run of test_lp_reg_grpo's proxy check (proxy and penalty == explicit, from the unfused model's
    softcapped logits) on a Gemma 2 model."""
    from test_lp_reg_grpo import Spy, digit_count_reward, grpo_args

    from llmreg.data import build_char_tokenizer, make_builtin_dataset

    KAPPA = 0.6  # noqa: N806 (the softcapped model is nearly uniform: a large kappa filters something)
    spy = Spy(rho=0.9, minp_kappa=KAPPA)
    trainer = llmreg.RegGRPOTrainer(
        model=_model("gemma2"),
        args=grpo_args(tmp_path, temperature=0.8, max_steps=2, bf16=False),
        processing_class=build_char_tokenizer(),
        reward_funcs=digit_count_reward,
        train_dataset=make_builtin_dataset(format="prompt_only", num_examples=16),
        regularizers=[spy],
    )
    trainer.train()
    assert spy.batches and spy.terms
    for rec in spy.batches:
        batch, mask = rec["batch"], trl_compat.response_mask(rec["batch"]).bool()
        logp, proxy, kept = ref_proxy(rec["logits"], batch["completion_ids"], KAPPA, rec["T"])
        assert torch.allclose(rec["old_logp"][mask], logp[mask].float(), atol=1e-4)
        assert torch.equal(batch["lp_reg_kept"][mask], kept[mask]) and not kept[mask].all()
        fin = mask & kept
        assert torch.allclose(batch["lp_reg_proxy_logp"][fin], proxy[fin].float(), atol=1e-4)
    assert all(torch.isfinite(rec["term"]) for rec in spy.terms)
    assert max(h.get("reg/lp_reg/selected_share", 0.0) for h in trainer.state.log_history) > 0


@pytest.mark.slow
def test_lp_reg_full_kl_on_gemma2_equals_the_kl_of_the_model_logits(tmp_path):
    """estimator full_kl forms the policy's logits at the selected positions from its hidden states: checked per
    micro-batch against KL(proxy || policy) of the unfused model's softcapped logits (test_lp_reg_grpo's spy)."""
    from test_lp_reg_grpo import FullKLSpy, digit_count_reward, grpo_args

    from llmreg.data import build_char_tokenizer, make_builtin_dataset

    spy = FullKLSpy(rho=0.9, minp_kappa=0.6)
    trainer = llmreg.RegGRPOTrainer(
        model=_model("gemma2"),
        args=grpo_args(tmp_path, max_steps=2, bf16=False),
        processing_class=build_char_tokenizer(),
        reward_funcs=digit_count_reward,
        train_dataset=make_builtin_dataset(format="prompt_only", num_examples=16),
        regularizers=[spy],
    )
    trainer.train()
    assert spy.checked > 0
