"""l2_sp: the gradient edit is the gradient of lam/2 * ||theta - theta_0||^2, and it behaves like one."""

from __future__ import annotations

import torch
from conftest import edited_and_autograd_grads, losses, make_hf_trainer, max_rel_diff, weights
from transformers import Trainer

from llmreg.core.shards import ShardAccess
from llmreg.regularizers import L2SP, l2_sp_grad, l2_sp_penalty


def test_grad_formula_matches_autograd():
    torch.manual_seed(0)
    theta = torch.randn(5, 3, requires_grad=True)
    anchor = torch.randn(5, 3)
    (auto,) = torch.autograd.grad(l2_sp_penalty(theta, anchor, 0.7), theta)
    assert torch.allclose(l2_sp_grad(theta.detach(), anchor, 0.7), auto)
    assert torch.isclose(l2_sp_penalty(theta, anchor, 0.7), 0.35 * ((theta - anchor) ** 2).sum())


def test_pre_step_edit_equals_explicit_penalty_gradient(tok):
    from llmreg.data import tiny_llama

    model = tiny_llama(vocab_size=len(tok), seed=0)
    shards = ShardAccess.from_model(model)
    reg = L2SP(lam=0.3)
    reg.setup(model, trainer=None)
    reg.on_prepared(model, shards)
    start = weights(model)
    with torch.no_grad():  # move away from the anchor so the penalty is not zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    edited, reference, _ = edited_and_autograd_grads(
        model, tok, reg, shards, lambda m: sum(0.5 * 0.3 * (p - start[n]).pow(2).sum() for n, p in m.named_parameters())
    )
    assert reference.keys() == dict(model.named_parameters()).keys()
    for n in reference:
        assert torch.allclose(edited[n], reference[n], atol=1e-6, rtol=1e-5), n
    assert reg.metrics()["penalty"] > 0


class ExplicitPenaltyTrainer(Trainer):
    """The reference: the penalty as a loss term, differentiated by autograd (once per optimizer step)."""

    def __init__(self, *a, lam, **kw):
        super().__init__(*a, **kw)
        self.lam, self.start = lam, weights(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        penalty = sum(0.5 * self.lam * (p - self.start[n]).pow(2).sum() for n, p in model.named_parameters())
        # the data loss is already divided over accumulation steps; the penalty counts once per step
        return loss + penalty / self.current_gradient_accumulation_steps


def test_training_with_edit_matches_training_with_explicit_penalty(tok, tmp_path):
    kw = dict(max_steps=3, max_grad_norm=1.0, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    edited = make_hf_trainer(tok, tmp_path / "a", regularizers=[L2SP(lam=5.0)], **kw)
    edited.train()
    from conftest import hf_args, lm_dataset
    from transformers import DataCollatorForLanguageModeling

    from llmreg.data import tiny_llama

    explicit = ExplicitPenaltyTrainer(
        model=tiny_llama(vocab_size=len(tok), seed=0),
        args=hf_args(tmp_path / "b", **kw),
        train_dataset=lm_dataset(tok),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        lam=5.0,
    )
    explicit.train()
    assert max_rel_diff(weights(edited.model), weights(explicit.model)) < 1e-5


def test_lam_zero_equals_plain_training(tok, tmp_path):
    reg = make_hf_trainer(tok, tmp_path / "a", regularizers=[L2SP(lam=0.0)], max_steps=5)
    reg.train()
    plain = make_hf_trainer(tok, tmp_path / "b", trainer_cls=Trainer, max_steps=5)
    plain.train()
    assert losses(reg) == losses(plain)
    assert all(torch.equal(a, b) for a, b in zip(weights(reg.model).values(), weights(plain.model).values()))


def test_huge_lam_keeps_weights_at_start(tok, tmp_path):
    kw = dict(max_steps=20, learning_rate=1e-3, optim="sgd", max_grad_norm=0.0)
    pinned = make_hf_trainer(tok, tmp_path / "a", regularizers=[L2SP(lam=1e3)], **kw)
    start = weights(pinned.model)
    pinned.train()
    free = make_hf_trainer(tok, tmp_path / "b", regularizers=[], **kw)
    free.train()
    drift = lambda m: max((p.detach() - start[n]).abs().max().item() for n, p in m.named_parameters())  # noqa: E731
    assert drift(free.model) > 1e-3  # without the pull the weights do move further than the bound
    assert drift(pinned.model) < 1e-3
