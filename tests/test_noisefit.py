"""NoiseFiT (arXiv 2504.03302): the noise operator, the SNR ranking and the hybrid loss against explicit formulas
written here independently; noise only in training; errors; version-sensitive internals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import trl
from conftest import hf_args, lm_dataset, losses, max_rel_diff, sft_args, weights

import llmreg
from llmreg.core import ConfigError, anatomy
from llmreg.data import make_builtin_dataset, tiny_llama
from llmreg.integrations import hf_access as hf_integration
from llmreg.regularizers.noisefit.noise import standard_normal, training_noise_key

# -- explicit reference formulas ------------------------------------------------------------------------------------


def lower_median(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x).values[(x.numel() - 1) // 2]


def explicit_ani(h, eps, base, beta=0.1, clip=5.0):
    """Token by token: h + base * mad * w * nf * eps, nf from the token's variance over the branch's mean variance."""
    rows, length, _ = h.shape
    var = torch.stack([torch.stack([h[i, t].var() for t in range(length)]) for i in range(rows)])
    mean_var = var.mean()
    out = []
    for i in range(rows):
        for t in range(length):
            x = h[i, t]
            med = lower_median(x)
            dev = (x - med).abs()
            mad = torch.maximum(lower_median(dev), 1e-6 * x.norm())
            w = torch.exp(-beta * dev / (mad + 1e-6))
            nf = torch.clamp(torch.exp(var[i, t] / (mean_var + 1e-6)), max=clip)
            out.append(x + base * mad * w * nf * eps[i, t])
    return torch.stack(out).view_as(h)


def batch_with_prompt_mask(tok, rows=3):
    texts = ["What is 1 + 2? Answer: 3", "What is 10 - 4? Answer: 6", "Say hi: hi"][:rows]
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[:, :8] = -100  # a prompt: no loss on the first tokens
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def fake_trainer(step=5, rank=0, world=1):
    return SimpleNamespace(
        state=SimpleNamespace(global_step=step), args=SimpleNamespace(world_size=world, process_index=rank)
    )


def prepared(model, selected, **opts):
    reg = llmreg.build_regularizer({"name": "noisefit", **opts})
    reg.setup(model, None)
    reg.load_state_dict({"selected": selected})
    reg.on_prepared(model, None)
    return reg


# -- the noise operator and the SNR ranking -------------------------------------------------------------------------


def test_adaptive_noise_equals_token_by_token_formula():
    from llmreg.regularizers.noisefit.noise import adaptive_noise, branch_base

    torch.manual_seed(0)
    h = torch.randn(2, 5, 16) * torch.linspace(0.2, 3.0, 16)
    h[1, 2] *= 20  # one token with a large variance: its nf hits the clip
    eps = torch.randn_like(h)
    base = branch_base(h, 0.1)
    assert base.item() == pytest.approx(0.1 * h.flatten().std().item(), rel=1e-6)  # std over the whole branch
    got = adaptive_noise(h, eps, base)
    want = explicit_ani(h, eps, base)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, h)
    # double sigma: the base is sigma^2 * std
    assert branch_base(h, 0.1, double_sigma=True).item() == pytest.approx(0.01 * h.flatten().std().item(), rel=1e-6)


def test_snr_ranking_equals_explicit_computation(tok):
    model = tiny_llama(vocab_size=len(tok), seed=0, num_hidden_layers=5)
    batch = batch_with_prompt_mask(tok)
    captured = {}
    handles = [
        layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out.detach()))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    sigma, draws, seed = 0.3, 4, 7
    snr = []
    for i in range(5):
        h = captured[i]
        base = sigma * h.flatten().std()
        noise = (
            sum(
                (explicit_ani(h, standard_normal(h.shape, h.device, "snr", seed, i, k), base) - h).abs().mean()
                for k in range(draws)
            )
            / draws
        )
        snr.append((h.abs().mean() / (noise + 1e-6)).item())
    order = sorted(range(5), key=lambda i: -snr[i])
    for select, want in (("high", sorted(order[:2])), ("low", sorted(order[-2:]))):
        reg = llmreg.build_regularizer(
            {
                "name": "noisefit",
                "num_layers": 2,
                "select": select,
                "noise_std": sigma,
                "snr_draws": draws,
                "seed": seed,
            }
        )
        reg.setup(model, None)
        assert reg.select(model, batch) == want
        assert reg.snr == pytest.approx(snr, rel=1e-4)
    assert len(set(round(s, 3) for s in snr)) == 5  # a real ranking, no ties
    # v1 quirk: the last layer scored after the final norm
    with torch.no_grad():
        normed = model.model.norm(captured[4])
    base = sigma * normed.flatten().std()
    noise = (
        sum(
            (explicit_ani(normed, standard_normal(normed.shape, normed.device, "snr", seed, 4, k), base) - normed)
            .abs()
            .mean()
            for k in range(draws)
        )
        / draws
    )
    reg = llmreg.build_regularizer(
        {
            "name": "noisefit",
            "num_layers": 2,
            "noise_std": sigma,
            "snr_draws": draws,
            "seed": seed,
            "last_layer_post_norm": True,
        }
    )
    reg.setup(model, None)
    reg.select(model, batch)
    assert reg.snr[:4] == pytest.approx(snr[:4], rel=1e-4)
    assert reg.snr[4] == pytest.approx((normed.abs().mean() / (noise + 1e-6)).item(), rel=1e-4) != snr[4]


# -- the hybrid loss --------------------------------------------------------------------------------------------------


def explicit_loss(model, batch, selected, step, shard, opts):
    """Three separate forwards (clean, noisy 1, noisy 2) with the explicit operator, then the hybrid formula."""
    sigma = opts.get("noise_std", 0.1) * (opts.get("noise_std", 0.1) if opts.get("double_sigma") else 1.0)
    beta, seed, T = 0.1, opts.get("seed", 0), opts.get("temperature", 1.0)
    detach_teacher, detach_scale = opts.get("detach_teacher", False), opts.get("detach_noise_scale", False)
    logits = []
    for branch in (0, 1, 2):
        handles = []
        if branch:
            for layer in selected:

                def hook(m, a, out, layer=layer, branch=branch):
                    eps = standard_normal(out.shape, out.device, *training_noise_key(seed, step, shard, layer, branch))
                    base = sigma * out.detach().flatten().std()
                    noisy = explicit_ani(out, eps, base, beta)
                    return out + (noisy - out).detach() if detach_scale else noisy

                handles.append(model.model.layers[layer].register_forward_hook(hook))
        logits.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float())
        for handle in handles:
            handle.remove()
    z0, z1, z2 = logits
    labels = batch["labels"]
    ce = F.cross_entropy(z0[:, :-1].reshape(-1, z0.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    if opts.get("shift_mask", True):
        mask = labels[:, 1:] != -100
        z0, z1, z2 = z0[:, :-1], z1[:, :-1], z2[:, :-1]
    else:
        mask = labels != -100
    mask = mask.float()

    def masked_mean(x):
        return (x * mask).sum() / mask.sum()

    if detach_teacher:
        p0 = F.softmax(z0.detach() / T, -1)
        soft = (
            0.5
            * (
                F.kl_div(F.log_softmax(z1 / T, -1), p0, reduction="none").sum(-1)
                + F.kl_div(F.log_softmax(z2 / T, -1), p0, reduction="none").sum(-1)
            )
            * T
            * T
        )
        cons = F.kl_div(F.log_softmax(z1 / T, -1), F.softmax(z2 / T, -1).detach(), reduction="none").sum(-1)
    else:
        p0 = F.softmax(z0 / T, -1)
        soft = 0.5 * (
            F.kl_div(F.log_softmax(z1, -1), p0, reduction="none").sum(-1)
            + F.kl_div(F.log_softmax(z2, -1), p0, reduction="none").sum(-1)
        )
        cons = F.kl_div(F.log_softmax(z1, -1), F.softmax(z2, -1), reduction="none").sum(-1)
    alpha, lam = opts.get("alpha", 0.5), opts.get("lam", 0.1)
    return alpha * ce + (1 - alpha) * masked_mean(soft) + lam * masked_mean(cons), masked_mean(soft)


OPTION_SETS = {
    "default": {},
    "v1_quirks": {"noise_std": 0.8, "double_sigma": True, "shift_mask": False, "alpha": 0.3, "lam": 0.5},
    "v2_detached": {
        "detach_teacher": True,
        "detach_noise_scale": True,
        "temperature": 2.0,
        "chunk_size": 5,
        "recompute_logits": "always",
    },
    "recomputed_chunks": {"recompute_logits": "always", "chunk_size": 4, "noise_std": 0.8},
}


@pytest.mark.parametrize("which", sorted(OPTION_SETS))
def test_loss_and_gradient_equal_explicit_hybrid_formula_on_seeded_noise(tok, which):
    opts = {"noise_std": 0.5, "seed": 3, **OPTION_SETS[which]}
    model = tiny_llama(vocab_size=len(tok), seed=0, num_hidden_layers=4)
    batch = batch_with_prompt_mask(tok)
    selected = [1, 3]
    reg = prepared(model, selected, num_layers=2, **opts)
    model.train()
    ctx = llmreg.LossContext(model=model, inputs=batch, loss=None, outputs=None, trainer=fake_trainer(step=5))
    loss = reg.training_loss(ctx)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.post_step(None)  # disarmed: the explicit forwards below run on the clean model plus the test's own hooks
    model.zero_grad()
    want, soft = explicit_loss(model, batch, selected, step=5, shard=0, opts=opts)
    want.backward()
    assert soft.item() > 1e-6  # the noise changed the predictions, so the soft term is in play
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    ref = {n: p.grad for n, p in model.named_parameters()}
    assert max_rel_diff(ref, got) < 1e-4


def test_three_separate_forwards_equal_the_stacked_one(tok, tmp_path):
    batch = batch_with_prompt_mask(tok)
    results = {}
    for pack in ("auto", "never"):
        model = tiny_llama(vocab_size=len(tok), seed=0, num_hidden_layers=3)
        reg = prepared(model, [0, 2], num_layers=2, noise_std=0.8, pack_branches=pack)
        model.train()
        loss = reg.training_loss(
            llmreg.LossContext(model=model, inputs=batch, loss=None, outputs=None, trainer=fake_trainer())
        )
        loss.backward()
        results[pack] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert results["never"][0] == pytest.approx(results["auto"][0], rel=1e-6)
    assert max_rel_diff(results["auto"][1], results["never"][1]) < 1e-5
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        llmreg.RegTrainer(
            model=tiny_llama(vocab_size=len(tok)),
            train_dataset=lm_dataset(tok, n=8),
            args=hf_args(tmp_path, gradient_checkpointing=True),
            regularizers=[{"name": "noisefit", "num_layers": 1, "pack_branches": "never"}],
        )


def test_prefix_sharing_runs_the_prefix_once_with_the_same_loss_and_gradients(tok):
    batch = batch_with_prompt_mask(tok)
    rows = batch["input_ids"].shape[0]
    results = {}
    for share in (True, False):
        model = tiny_llama(vocab_size=len(tok), seed=0, num_hidden_layers=4)
        reg = prepared(model, [1, 3], num_layers=2, noise_std=0.8, prefix_sharing=share)
        seen = {}
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_hook(lambda m, a, out, i=i, seen=seen: seen.__setitem__(i, out.shape[0]))
        model.train()
        loss = reg.training_loss(
            llmreg.LossContext(model=model, inputs=batch, loss=None, outputs=None, trainer=fake_trainer())
        )
        loss.backward()
        results[share] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, seen)
    assert results[True][2] == {0: rows, 1: 3 * rows, 2: 3 * rows, 3: 3 * rows}  # layer 1's output is noised
    assert results[False][2] == {0: 3 * rows, 1: 3 * rows, 2: 3 * rows, 3: 3 * rows}
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    assert max_rel_diff(results[False][1], results[True][1]) < 1e-5


def test_prefix_sharing_is_off_by_default_when_the_prefix_has_dropout(tok, caplog):
    assert prepared(tiny_llama(vocab_size=len(tok), num_hidden_layers=3), [1], num_layers=1)._share_prefix
    dropped = tiny_llama(vocab_size=len(tok), num_hidden_layers=3, attention_dropout=0.1)
    assert not prepared(dropped, [1], num_layers=1)._share_prefix
    assert not prepared(
        tiny_llama(vocab_size=len(tok), num_hidden_layers=3), [1], num_layers=1, pack_branches="never"
    )._share_prefix
    with caplog.at_level("WARNING"):
        assert prepared(dropped, [1], num_layers=1, prefix_sharing=True)._share_prefix
    assert "dropout" in caplog.text


def test_noise_key_follows_step_and_shard(tok):
    model = tiny_llama(vocab_size=len(tok), seed=0, num_hidden_layers=3)
    batch = batch_with_prompt_mask(tok)
    reg = prepared(model, [1], num_layers=1, noise_std=3.0)
    model.train()
    values = {}
    for step, rank, world in ((5, 0, 1), (5, 1, 2), (6, 0, 1)):
        reg._micro = (-1, -1)  # each as the first micro-batch of its step
        ctx = llmreg.LossContext(
            model=model, inputs=batch, loss=None, outputs=None, trainer=fake_trainer(step, rank, world)
        )
        values[(step, rank)] = reg.training_loss(ctx).item()
        assert reg._key == (step, rank)
    reg.post_step(None)
    assert explicit_loss(model, batch, [1], 5, 1, {"noise_std": 3.0})[0].item() == pytest.approx(
        values[(5, 1)], rel=1e-5
    )
    assert len(set(values.values())) == 3
    # a second micro-batch of the same step is the next shard: micro * world + rank
    reg._micro = (-1, -1)
    trainer = fake_trainer(7, 1, 2)
    for expected in (1, 3, 5):
        reg.training_loss(llmreg.LossContext(model=model, inputs=batch, loss=None, outputs=None, trainer=trainer))
        assert reg._key == (7, expected)


def test_hybrid_loss_accumulation_units():
    from llmreg.regularizers.noisefit.loss import hybrid_loss

    sums = {
        "nll_sum": torch.tensor(12.0),
        "soft_sum": torch.tensor(3.0),
        "cons_sum": torch.tensor(6.0),
        "ce_count": torch.tensor(4),
        "kl_count": torch.tensor(3),
    }
    plain = hybrid_loss(sums, 0.5, 0.1)
    assert plain["loss"].item() == pytest.approx(0.5 * 3.0 + 0.5 * 1.0 + 0.1 * 2.0)
    scaled = hybrid_loss(sums, 0.5, 0.1, token_mean=lambda total, count: total / 16, ga_divisor=4)
    assert scaled["loss"].item() == pytest.approx(0.5 * 12 / 16 + (0.5 * 1.0 + 0.1 * 2.0) / 4)


# -- noise only in training -------------------------------------------------------------------------------------------


def test_eval_and_generate_see_the_clean_model(tok, tmp_path):
    batch = batch_with_prompt_mask(tok, rows=2)
    clean = tiny_llama(vocab_size=len(tok), seed=0, num_hidden_layers=3)
    model = tiny_llama(vocab_size=len(tok), seed=0, num_hidden_layers=3)
    reg = prepared(model, [0, 2], num_layers=2, noise_std=1.0)
    model.train()
    ctx = llmreg.LossContext(model=model, inputs=batch, loss=None, outputs=None, trainer=fake_trainer())
    reg.training_loss(ctx)  # armed, as between the forward and the optimizer step
    stacked = {k: torch.cat([v] * 3) for k, v in batch.items() if k != "labels"}
    noisy = model(**stacked).logits
    assert not torch.allclose(noisy[:2], noisy[2:4])  # armed and training: the noisy rows differ
    assert torch.allclose(noisy[:2], clean(**{k: v for k, v in stacked.items()}).logits[:2], atol=1e-6)
    inputs = {k: v for k, v in stacked.items()}
    plain = {k: v for k, v in batch.items() if k != "labels"}  # armed, training, grad: another forward's rows
    assert torch.equal(model(**plain).logits, clean(**plain).logits)
    with torch.no_grad():  # training mode but no grad: a generate() or an eval loop in train mode
        assert torch.equal(model(**inputs).logits, clean(**inputs).logits)
    model.eval()
    clean.eval()
    with torch.enable_grad():
        assert torch.equal(model(**inputs).logits, clean(**inputs).logits)
    prompt = tok(["What is 1 + 2?"], return_tensors="pt")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**prompt, **kw), clean.generate(**prompt, **kw))
    model.train()
    reg.post_step(None)  # after the step: quiet also in training mode with grad
    assert torch.equal(model(**inputs).logits, clean.train()(**inputs).logits)


def test_trainer_evaluate_is_unchanged_by_noisefit(tok, tmp_path):
    from transformers import DataCollatorForLanguageModeling

    data = lm_dataset(tok, n=16)
    metrics = []
    for regs in ([], [{"name": "noisefit", "num_layers": 1, "noise_std": 1.0}]):
        trainer = llmreg.RegTrainer(
            model=tiny_llama(vocab_size=len(tok), seed=0),
            args=hf_args(tmp_path, max_steps=1),
            train_dataset=data,
            eval_dataset=data,
            regularizers=regs,
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        )
        metrics.append(trainer.evaluate()["eval_loss"])
        if regs:
            trainer.reg_stack.regularizers[0]._rows = 4  # even armed, evaluation runs in eval mode under no_grad
            metrics.append(trainer.evaluate()["eval_loss"])
    assert metrics[0] == metrics[1] == metrics[2]


# -- training through the trainers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["", r"layers\.0$"], ids=["snr-choice", "first-layer-then-stacked-inputs"])
def test_gradient_checkpointing_replays_the_same_noise(tok, tmp_path, layers):
    """Also with the noise on layer 0, where prefix sharing stacks the later layer's mask / positions."""
    from transformers import DataCollatorForLanguageModeling

    results = []
    for gc in (False, True):
        trainer = llmreg.RegTrainer(
            model=tiny_llama(vocab_size=len(tok), seed=0),
            train_dataset=lm_dataset(tok, n=16),
            args=hf_args(tmp_path / str(gc), max_steps=2, gradient_checkpointing=gc),
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            regularizers=[{"name": "noisefit", "num_layers": 1, "noise_std": 1.0, "layers": layers}],
        )
        trainer.train()
        reg = trainer.reg_stack.regularizers[0]
        assert reg._share_prefix and (reg.selected == [0] if layers else True)
        results.append(
            (
                losses(trainer),
                weights(trainer.model),
                [h["reg/noisefit/soft"] for h in trainer.state.log_history if "loss" in h],
            )
        )
    assert results[0][2][0] > 1e-5  # the noise is doing something
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert max_rel_diff(results[0][1], results[1][1]) < 1e-5


@pytest.mark.parametrize("batch, ga", [(4, 1), (2, 2)])
def test_sft_trains_on_completion_tokens_and_differs_from_plain_sft(tok, tmp_path, batch, ga):
    """alpha = 1, lambda = 0 leaves TRL's completion-only CE, normalised like SFT's own (also over an accumulation
    window: num_items_in_batch)."""
    out = {}
    for regs in (
        [],
        [{"name": "noisefit", "num_layers": 1, "noise_std": 1.0, "alpha": 1.0, "lam": 0.0}],
        [{"name": "noisefit", "num_layers": 1, "noise_std": 1.0}],
    ):
        args = sft_args(
            tmp_path,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga,
            lr_scheduler_type="constant",
            optim="sgd",
            max_grad_norm=0.0,
            activation_checkpointing=True,  # SFTConfig's default, as this test was written
        )
        trainer = llmreg.RegSFTTrainer(
            model=tiny_llama(vocab_size=len(tok), seed=0),
            args=args,
            processing_class=tok,
            regularizers=regs,
            train_dataset=make_builtin_dataset(format="prompt_completion", num_examples=16),
        )
        trainer.train()
        out[len(regs) and (regs[0].get("alpha"),)] = (losses(trainer), weights(trainer.model))
    plain, ce_only, hybrid = out[0], out[(1.0,)], out[(None,)]
    # alpha = 1, lambda = 0 is plain SFT's completion-only CE: the same losses and updates as TRL's fused head
    assert ce_only[0] == pytest.approx(plain[0], rel=1e-4)
    assert max_rel_diff(plain[1], ce_only[1]) < 1e-4
    # the hybrid loss moves the weights elsewhere
    assert max_rel_diff(plain[1], hybrid[1]) > 1e-4


# -- errors and internals ---------------------------------------------------------------------------------------------


def test_clear_errors(tok, tmp_path):
    model = tiny_llama(vocab_size=len(tok), seed=0)  # 2 decoder layers
    with pytest.raises(ConfigError, match="num_layers=3 but only 2"):
        llmreg.build_regularizer("noisefit").setup(model, None)
    with pytest.raises(ConfigError, match="matches none of the 2 decoder layers"):
        llmreg.build_regularizer({"name": "noisefit", "num_layers": 1, "layers": r"layers\.7$"}).setup(model, None)
    with pytest.raises(ConfigError, match="num_layers=2 but only 1"):
        llmreg.build_regularizer({"name": "noisefit", "num_layers": 2, "layers": r"layers\.1$"}).setup(model, None)
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        llmreg.build_regularizer({"name": "noisefit", "num_layer": 2})
    with pytest.raises(ConfigError, match="alpha must be in"):
        llmreg.build_regularizer({"name": "noisefit", "alpha": 1.5})
    for kind in ("dpo", "grpo"):
        with pytest.raises(ConfigError, match=f"'noisefit' does not support trainer kind '{kind}'"):
            llmreg.RegularizerStack(["noisefit"], trainer_kind=kind)


def test_only_one_regularizer_may_replace_the_loss():
    from llmreg.core import Regularizer, Requirements

    class Owner(Regularizer):
        def training_loss(self, ctx):
            return None

    class NeedsOutputs(Regularizer):
        requires = Requirements(needs_outputs=True)

    with pytest.raises(ConfigError, match="each replace the training loss"):
        llmreg.RegularizerStack(["noisefit", Owner()])
    with pytest.raises(ConfigError, match="cannot be combined"):
        llmreg.RegularizerStack(["noisefit", NeedsOutputs()])
    assert llmreg.RegularizerStack(["noisefit", "l2_sp"]).loss_owner.name == "noisefit"


def test_label_smoothing_is_refused(tok, tmp_path):
    with pytest.raises(ConfigError, match="label_smoothing_factor"):
        llmreg.RegTrainer(
            model=tiny_llama(vocab_size=len(tok)),
            train_dataset=lm_dataset(tok, n=8),
            args=hf_args(tmp_path, label_smoothing_factor=0.1),
            regularizers=[{"name": "noisefit", "num_layers": 1}],
        )


def test_hf_calibration_batch_is_a_seeded_training_batch(tok, tmp_path):
    """Pins the Trainer internals the SNR batch uses (`_remove_unused_columns`, `_prepare_inputs`)."""
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=48, report_to=[], use_cpu=True, max_steps=1)
    trainer = llmreg.RegSFTTrainer(
        model=tiny_llama(vocab_size=len(tok)),
        args=args,
        processing_class=tok,
        train_dataset=make_builtin_dataset(format="prompt_completion", num_examples=16),
    )
    one = hf_integration.calibration_batch(trainer, 4, torch.Generator().manual_seed(1))
    two = hf_integration.calibration_batch(trainer, 4, torch.Generator().manual_seed(1))
    assert {"input_ids", "labels"} <= set(one) and one["input_ids"].shape[0] == 4
    assert torch.equal(one["input_ids"], two["input_ids"])
    assert (one["labels"] == -100).any() and (one["labels"] != -100).any()  # prompt masked, completion kept
    assert hf_integration.accepts_logits_to_keep(trainer.model)
    assert [n for n, _ in anatomy.decoder_layers(trainer.model)] == ["model.layers.0", "model.layers.1"]


def test_shipped_recipe_validates_and_bad_options_fail():
    import os

    import yaml
    from conftest import REPO

    from llmreg.recipe.validate import validate_recipe

    path = os.path.join(REPO, "recipes", "noisefit", "testbed.yaml")
    raw = yaml.safe_load(open(path))
    recipe = validate_recipe(raw, path)
    assert recipe.regularizers == [{"name": "noisefit"}] and recipe.trainer.kind == "sft"
    assert "llmreg train recipes/noisefit/testbed.yaml" in open(path).read()  # the header gives the command
    raw["regularizers"] = [{"name": "noisefit", "select": "largest"}]
    with pytest.raises(ConfigError, match="select: expected one of"):
        validate_recipe(raw, path)
    raw["regularizers"] = [{"name": "noisefit"}]
    raw["trainer"] = {"kind": "dpo", "max_steps": 2}
    with pytest.raises(ConfigError, match="does not support trainer kind 'dpo'"):
        validate_recipe(raw, path)


# -- v2 calibration ---------------------------------------------------------------------------------------------------


def explicit_policy(kl, dce, clean_ce, factors, hidden, max_ratio, prior, frac, bands):
    import math

    num_layers, num_scales = len(kl), len(factors)
    score, valid = [], []
    for l in range(num_layers):
        raw = [
            kl[l][j] / (1 + dce[l][j] / abs(clean_ce)) / (1 + prior * math.log2(factors[j]) ** 2)
            for j in range(num_scales)
        ]
        ok = [dce[l][j] / abs(clean_ce) <= max_ratio for j in range(num_scales)]
        score.append([raw[j] if ok[j] else -math.inf for j in range(num_scales)] if any(ok) else raw)
        valid.append(ok)
    best = [max(row) for row in score]
    med = sorted(best)[(num_layers - 1) // 2]
    mad = max(sorted(abs(b - med) for b in best)[(num_layers - 1) // 2], 1e-12)
    cand = [l for l in range(num_layers) if best[l] >= med + mad and best[l] > 0]
    cap = math.ceil(math.sqrt(num_layers))
    if not cand:
        selected = [max(range(num_layers), key=lambda l: best[l])]
    else:
        by_score = sorted(cand, key=lambda l: -best[l])
        picked = []
        for band in range(bands):
            lo, hi = math.floor(band * num_layers / bands), math.floor((band + 1) * num_layers / bands)
            picked += [l for l in by_score if lo <= l < hi][: math.ceil(cap / bands)]
        picked += [l for l in by_score if l not in picked]
        selected = sorted(picked[:cap])
    best_kl = [kl[l][max(range(num_scales), key=lambda j: score[l][j])] for l in selected]
    target = max(sorted(best_kl)[(len(best_kl) - 1) // 2] * frac, 1e-12)
    scales = {}
    for l in selected:
        usable = [j for j in range(num_scales) if valid[l][j] and score[l][j] > -math.inf]
        reach = [j for j in usable if kl[l][j] >= target]
        if reach:
            j = reach[0]
        elif usable:
            j = min(usable, key=lambda j: abs(math.log(max(kl[l][j], 1e-12)) - math.log(target)))
        else:
            j = max(range(num_scales), key=lambda j: score[l][j])
        scales[l] = factors[j] / math.sqrt(hidden)
    return selected, scales


@pytest.mark.parametrize("seed", range(6))
def test_v2_policy_equals_explicit_rules(seed):
    from llmreg.regularizers.noisefit.calibration import v2_policy

    gen = torch.Generator().manual_seed(seed)
    num_layers, factors = 10, [0.25, 0.5, 1.0, 1.5, 2.0]
    kl = (torch.rand(num_layers, 5, generator=gen) * torch.tensor(factors)).double()  # grows with the scale
    dce = torch.rand(num_layers, 5, generator=gen).double() * 0.04 * torch.tensor(factors).double()
    dce[3] = 1.0  # every scale of layer 3 is rejected: its unfiltered scores are kept
    got = v2_policy(kl, dce, 2.0, factors, 64, list(range(num_layers)), 0.02, 0.05, 0.75, 3 if seed % 2 else 1)
    want = explicit_policy(kl.tolist(), dce.tolist(), 2.0, factors, 64, 0.02, 0.05, 0.75, 3 if seed % 2 else 1)
    assert got["selected"] == want[0]
    assert got["scales"] == pytest.approx(want[1])
    assert len(got["selected"]) <= 4  # ceil(sqrt(10))


def test_v2_calibration_grid_equals_explicit_kl_and_ce(tok, tmp_path):
    model = tiny_llama(vocab_size=len(tok), seed=0, num_hidden_layers=4)
    batch = batch_with_prompt_mask(tok)
    reg = llmreg.build_regularizer({"name": "noisefit", "version": "v2", "scale_factors": [0.5, 4.0, 16.0]})
    reg.setup(model, None)
    reg.calibrate(model, [batch])
    model.eval()
    labels = batch["labels"]
    mask = labels[:, 1:] != -100
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        clean = model(**inputs).logits[:, :-1].float()
        clean_ce = F.cross_entropy(clean[mask], labels[:, 1:][mask])
        for layer in (0, 2):
            for j, factor in enumerate((0.5, 4.0, 16.0)):

                def hook(m, a, out, layer=layer, j=j, factor=factor):
                    eps = standard_normal(out.shape, out.device, "probe", 0, 0, layer, j)
                    return explicit_ani(out, eps, factor / 64**0.5)

                handle = model.model.layers[layer].register_forward_hook(hook)
                noisy = model(**inputs).logits[:, :-1].float()
                handle.remove()
                lp, lq = F.log_softmax(clean[mask], -1), F.log_softmax(noisy[mask], -1)
                sym = (
                    0.5
                    * (
                        F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
                        + F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
                    ).mean()
                )
                dce = (F.cross_entropy(noisy[mask], labels[:, 1:][mask]) - clean_ce).clamp(min=0)
                assert reg.policy["kl"][layer][j] == pytest.approx(sym.item(), rel=1e-4, abs=1e-9)
                assert reg.policy["ce_delta"][layer][j] == pytest.approx(dce.item(), rel=1e-3, abs=1e-6)
    assert reg.policy["kl"][0][2] > reg.policy["kl"][0][0] > 0  # more noise, larger response
    assert reg.scales and set(reg.scales) == set(reg.selected)
    assert set(reg.scales.values()) <= {f / 8 for f in (0.5, 4.0, 16.0)}


def test_v2_trains_writes_its_policy_and_resumes_with_it(tok, tmp_path):
    import json

    from conftest import make_hf_trainer

    model = tiny_llama(vocab_size=len(tok), seed=0, num_hidden_layers=4)
    trainer = make_hf_trainer(
        tok, tmp_path, regularizers=[{"name": "noisefit", "version": "v2"}], model=model, max_steps=2
    )
    trainer.train()
    reg = trainer.reg_stack.regularizers[0]
    policy = json.load(open(tmp_path / "auto_noise_policy.json"))
    assert policy["selected"] == reg.selected and len(reg.selected) <= 2  # ceil(sqrt(4))
    assert reg.options.lam == 0.05 and reg.options.detach_teacher and reg.options.detach_noise_scale
    fresh = llmreg.build_regularizer({"name": "noisefit", "version": "v2"})
    fresh.load_state_dict(reg.state_dict())
    assert fresh.scales == reg.scales and fresh.selected == reg.selected
    with pytest.raises(ValueError, match="no noise scale"):
        fresh.load_state_dict({"selected": reg.selected, "snr": []})


def test_core_training_loss_hook_in_host_units_reproduces_the_host(tok, tmp_path):
    """The core `training_loss` hook: a regularizer that recomputes the plain causal-LM loss with `ctx.token_mean`
    trains exactly like the host Trainer, also with gradient accumulation (num_items_in_batch)."""
    from transformers import DataCollatorForLanguageModeling

    from llmreg.core import Regularizer

    class PlainCE(Regularizer):
        def training_loss(self, ctx):
            logits = ctx.model(**{k: v for k, v in ctx.inputs.items() if k != "labels"}).logits.float()
            labels = ctx.inputs["labels"][:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            return ctx.token_mean(nll, (labels != -100).sum())

    results = {}
    for name, regs in (("host", []), ("hook", [PlainCE()])):
        trainer = llmreg.RegTrainer(
            model=tiny_llama(vocab_size=len(tok), seed=0),
            train_dataset=lm_dataset(tok, n=16),
            args=hf_args(
                tmp_path / name,
                max_steps=2,
                per_device_train_batch_size=2,
                gradient_accumulation_steps=2,
                optim="sgd",
                max_grad_norm=0.0,
            ),
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            regularizers=regs,
        )
        trainer.train()
        results[name] = (losses(trainer), weights(trainer.model))
    assert results["hook"][0] == pytest.approx(results["host"][0], rel=1e-5)
    assert max_rel_diff(results["host"][1], results["hook"][1]) < 1e-5
