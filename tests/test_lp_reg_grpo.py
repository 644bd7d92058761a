"""Lp-Reg inside RegGRPOTrainer: equivalence at beta = 0, the proxy pass against explicit logits (on- and
off-policy), gradient-accumulation invariance, and the proxy's memory bound."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import trl
from conftest import losses, weights
from test_lp_reg_math import ref_proxy
from torch.utils._python_dispatch import TorchDispatchMode

import llmreg
from llmreg.data import build_char_tokenizer, make_builtin_dataset, tiny_llama
from llmreg.integrations import trl as trl_compat
from llmreg.regularizers.lp_reg import LpReg, hidden_proxy_stats, minp_proxy_stats


def digit_count_reward(completions, **_):
    return [float(sum(ch.isdigit() for ch in text)) for text in completions]


def grpo_args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        beta=0.0,
        max_steps=3,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        epsilon=1.0,
        epsilon_high=9.0,
        loss_type="dapo",
    )
    base.update(kw)
    return trl.GRPOConfig(**base)


def make(cls, out, regs=None, **kw):
    tok = build_char_tokenizer()
    extra = {} if regs is None else {"regularizers": regs}
    return cls(
        model=tiny_llama(vocab_size=len(tok)),
        args=grpo_args(out, **kw),
        processing_class=tok,
        reward_funcs=digit_count_reward,
        train_dataset=make_builtin_dataset(format="prompt_only", num_examples=32),
        **extra,
    )


def reg_metric(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["on", "off"])
def test_beta_zero_trains_exactly_like_grpo(policy, tmp_path):
    kw = {} if policy == "on" else dict(steps_per_generation=2)  # off: TRL's own old-logp pass carries the proxy
    parent = make(trl.GRPOTrainer, tmp_path / "parent", **kw)
    parent.train()
    ours = make(llmreg.RegGRPOTrainer, tmp_path / "ours", [{"name": "lp_reg", "beta": 0.0, "rho": 0.5}], **kw)
    ours.train()
    assert len(losses(parent)) == 3 and losses(ours) == losses(parent)
    w_parent, w_ours = weights(parent.model), weights(ours.model)
    assert all(torch.equal(w_parent[n], w_ours[n]) for n in w_parent)
    assert max(reg_metric(ours, "reg/lp_reg/selected_share")) > 0  # tokens were selected; beta = 0 made them inert


@pytest.mark.slow
def test_beta_one_changes_training(tmp_path):
    parent = make(trl.GRPOTrainer, tmp_path / "parent")
    parent.train()
    ours = make(llmreg.RegGRPOTrainer, tmp_path / "ours", [{"name": "lp_reg", "rho": 0.5}])
    ours.train()
    assert max(reg_metric(ours, "reg/lp_reg/penalty")) > 0
    w_parent, w_ours = weights(parent.model), weights(ours.model)
    assert any(not torch.equal(w_parent[n], w_ours[n]) for n in w_parent)
    for key in ("reg/lp_reg/selected_share", "reg/lp_reg/entropy", "reg/lp_reg/threshold_prob"):
        assert reg_metric(ours, key), key


class Spy(LpReg):
    """Records each generation batch with an explicit-logit reference, and each loss term with its inputs."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batches, self.terms = [], []

    def on_generation_batch(self, batch, trainer):
        parts = sorted(self._parts, key=lambda item: item[0])
        old_logp = torch.cat([p.logp for _, p in parts])
        super().on_generation_batch(batch, trainer)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        k = batch["completion_ids"].size(1)
        with torch.no_grad():  # the unfused forward: full logits, as a user would compute them
            logits = trl_compat.causal_lm(trainer.model)(input_ids=ids, attention_mask=am).logits[:, -k - 1 : -1]
        self.batches.append(dict(batch=dict(batch), old_logp=old_logp, logits=logits.clone(), T=trainer.temperature))

    def loss_terms(self, ctx):
        out = super().loss_terms(ctx)
        self.terms.append(
            dict(
                term=out["penalty"].detach(),
                logp=ctx.extras["per_token_logps"].detach(),
                inputs=dict(ctx.inputs),
                ga=ctx.trainer.current_gradient_accumulation_steps,
            )
        )
        return out


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["on", "off"])
def test_proxy_pass_matches_explicit_logits(policy, tmp_path):
    kw = dict(temperature=0.8, max_steps=4, bf16=False)  # TRL turns bf16 autocast on, also on CPU
    if policy == "off":
        kw["steps_per_generation"] = 2
    kappa = 0.7  # the untrained model is nearly uniform: only a large kappa filters anything
    rho = 0.9  # the lowest tokens are the filtered ones at this kappa
    spy = Spy(rho=rho, minp_kappa=kappa)
    trainer = make(llmreg.RegGRPOTrainer, tmp_path, [spy], **kw)
    assert trl_compat.old_logps_computed_by_trl(trainer) == (policy == "off")
    trainer.train()
    assert spy.batches and spy.terms
    for rec in spy.batches:
        batch, mask = rec["batch"], trl_compat.response_mask(rec["batch"]).bool()
        assert ("old_per_token_logps" in batch) == (policy == "off")  # pins trl_compat.old_logps_computed_by_trl
        logp, proxy, kept = ref_proxy(rec["logits"], batch["completion_ids"], kappa, rec["T"])
        assert torch.allclose(rec["old_logp"][mask], logp[mask].float(), atol=1e-4)
        assert torch.equal(batch["lp_reg_kept"][mask], kept[mask]) and not kept[mask].all()
        fin = mask & kept
        assert torch.allclose(batch["lp_reg_proxy_logp"][fin], proxy[fin].float(), atol=1e-4)
        if policy == "off":  # the proxy rode on TRL's own pass: same log-probs as TRL's old_per_token_logps
            assert torch.allclose(rec["old_logp"][mask], batch["old_per_token_logps"][mask], atol=1e-4)
        # global threshold: the rho-quantile of the old log-probs of the negative-advantage tokens
        neg = mask & (batch["advantages"][:, None] < 0)
        if neg.any():
            assert math.isclose(
                batch["lp_reg_threshold"][0].item(), torch.quantile(rec["old_logp"][neg], rho).item(), rel_tol=1e-5
            )
    # each loss term is TRL's dapo normalisation of the explicit k3 penalty
    for rec in spy.terms:
        inp = rec["inputs"]
        mask = trl_compat.response_mask(inp)
        thr = inp["lp_reg_threshold"][0]
        lp, proxy = rec["logp"], inp["lp_reg_proxy_logp"]
        sel = mask.bool() & (inp["advantages"][:, None] < 0) & (lp <= thr) & inp["lp_reg_kept"] & (lp < proxy)
        rr = torch.exp(torch.where(sel, proxy - lp, torch.zeros_like(lp)))
        pen = torch.where(sel, (rr - rr.log() - 1).clamp(max=10.0), torch.zeros_like(lp))
        spg = trainer.args.steps_per_generation
        expected = (pen * mask).sum() / (inp["num_items_in_batch"] / spg)
        assert torch.allclose(rec["term"], expected, atol=1e-6)
    assert any(r["term"] > 0 for r in spy.terms)


@pytest.mark.slow
def test_gradient_accumulation_invariance(tmp_path):
    """docs/architecture.md, trap 7: GA=1 x batch 8 and GA=4 x batch 2 make the same update (same generation
    batch of 8)."""
    regs = [{"name": "lp_reg", "rho": 0.9, "minp_kappa": 0.7}]  # a penalty that is not negligible here
    common = dict(max_steps=1, optim="sgd", learning_rate=1.0, bf16=False)  # SGD: Adam's first step is sign-like
    one = make(llmreg.RegGRPOTrainer, tmp_path / "one", regs, per_device_train_batch_size=8, **common)
    one.train()
    four = make(
        llmreg.RegGRPOTrainer,
        tmp_path / "four",
        regs,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        **common,
    )
    four.train()
    assert reg_metric(one, "reg/lp_reg/penalty")[0] > 1e-3
    w1, w4 = weights(one.model), weights(four.model)
    assert max((w1[n] - w4[n]).abs().max().item() for n in w1) < 1e-5
    init = weights(tiny_llama(vocab_size=len(build_char_tokenizer())))
    assert any(not torch.equal(init[n], w1[n]) for n in init)


def test_bad_options_fail_early():
    with pytest.raises(llmreg.ConfigError, match="rho"):
        llmreg.build_regularizer({"name": "lp_reg", "rho": 2.0})
    with pytest.raises(llmreg.ConfigError, match="minp_kappa"):
        llmreg.build_regularizer({"name": "lp_reg", "minp_kapa": 0.1})
    with pytest.raises(llmreg.ConfigError, match="does not support trainer kind 'sft'"):
        llmreg.core.RegularizerStack([{"name": "lp_reg"}], trainer_kind="sft")


# -- memory -------------------------------------------------------------------------------------------------


class VocabMemory(TorchDispatchMode):
    """Peak bytes of live storages with at least `vocab` elements allocated under the mode (views and in-place
    results share their input's storage and are not allocations)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.live, self.peak, self.largest = vocab, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {a.untyped_storage().data_ptr() for a in flat_in if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.vocab:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in inputs:
                    self.live[key] = storage.nbytes()
                    weakref.finalize(t, self.live.pop, key, None)
                    self.largest = max(self.largest, storage.nbytes())
        self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [16, 256])
def test_proxy_materialises_one_chunk(dtype, rows):
    vocab, chunk, width = 20000, 8, 16
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=g).to(dtype)
    weight = (torch.randn(vocab, width, generator=g) * 0.5).to(dtype)
    ids = torch.randint(0, vocab, (rows,), generator=g)
    one_chunk = chunk * vocab * 4  # fp32 logits of one chunk
    with VocabMemory(vocab) as mem:
        stats = hidden_proxy_stats(hidden, weight, None, ids, chunk_size=chunk)
    # one fp32 chunk, plus its boolean filter (1/4) or, for bf16, the bf16 projection it was cast from (1/2)
    assert mem.peak <= 1.5 * one_chunk, (mem.peak, one_chunk)
    assert mem.largest <= one_chunk
    assert stats.logp.shape == (rows,)
    logits = (hidden.float() @ weight.float().T).to(dtype)
    with VocabMemory(vocab) as mem:
        minp_proxy_stats(logits, ids, chunk_size=chunk)
    assert mem.peak <= 1.5 * one_chunk, (mem.peak, one_chunk)


class FullKLSpy(LpReg):
    """Checks each micro-batch's full-KL term against KL(proxy || policy) from the unfused model's logits."""

    def __init__(self, **kw):
        super().__init__(estimator="full_kl", **kw)
        self.checked = 0

    def loss_terms(self, ctx):
        out = super().loss_terms(ctx)
        inp, trainer = ctx.inputs, ctx.trainer
        ids = torch.cat([inp["prompt_ids"], inp["completion_ids"]], 1)
        am = torch.cat([inp["prompt_mask"], inp["completion_mask"]], 1)
        k = inp["completion_ids"].size(1)
        with torch.no_grad():
            logits = trl_compat.causal_lm(trainer.model)(input_ids=ids, attention_mask=am).logits[:, -k - 1 : -1]
        mask = trl_compat.response_mask(inp)
        lp, proxy = ctx.extras["per_token_logps"].detach(), inp["lp_reg_proxy_logp"]
        sel = (
            mask.bool()
            & (inp["advantages"][:, None] < 0)
            & (lp <= inp["lp_reg_threshold"][0])
            & inp["lp_reg_kept"]
            & (lp < proxy)
        )
        pen = torch.zeros_like(lp)
        for b, t in sel.nonzero().tolist():
            z = logits[b, t].double() / trainer.temperature
            p = torch.softmax(z, -1)
            keep = p >= self.options.minp_kappa * p.max()
            q = torch.where(keep, p, torch.zeros_like(p)) / p[keep].sum()
            log_pi = torch.log_softmax(z, -1)
            pen[b, t] = float((q[keep] * (q[keep].log() - log_pi[keep])).sum())
        expected = (pen * mask).sum() / (inp["num_items_in_batch"] / trainer.args.steps_per_generation)
        assert torch.allclose(out["penalty"].detach().double(), expected.double(), atol=1e-5), (out, expected)
        self.checked += int(sel.any())
        return out


@pytest.mark.slow
def test_full_forward_kl_estimator_in_the_trainer(tmp_path):
    spy = FullKLSpy(rho=0.9, minp_kappa=0.7)
    trainer = make(llmreg.RegGRPOTrainer, tmp_path, [spy], max_steps=4, bf16=False)
    trainer.train()
    assert spy.checked > 0 and max(reg_metric(trainer, "reg/lp_reg/penalty")) > 0


def test_full_forward_kl_refuses_off_policy(tmp_path):
    with pytest.raises(llmreg.ConfigError, match="on-policy only"):
        make(llmreg.RegGRPOTrainer, tmp_path, [{"name": "lp_reg", "estimator": "full_kl"}], steps_per_generation=2)
