"""weight_decay: the optimizer's parameter groups are exactly what the policy says."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_trainer

from llmreg.regularizers import WeightDecayPolicy, split_by_decay


def _groups(optimizer, model):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return sorted(
        (g["weight_decay"], tuple(sorted(name_of[id(p)] for p in g["params"]))) for g in optimizer.param_groups
    )


def test_split_rule_on_names_and_shapes():
    named = [
        ("model.embed_tokens.weight", torch.zeros(4, 2)),
        ("layers.0.q_proj.weight", torch.zeros(2, 2)),
        ("layers.0.q_proj.bias", torch.zeros(2)),
        ("layers.0.input_layernorm.weight", torch.zeros(2)),
        ("lm_head.weight", torch.zeros(4, 2)),
        ("scale", torch.zeros(1)),
    ]
    decay, no_decay = split_by_decay(named, [], WeightDecayPolicy.options_cls().no_decay)
    assert decay == ["layers.0.q_proj.weight", "lm_head.weight"]
    assert set(no_decay) == {
        "model.embed_tokens.weight",
        "layers.0.q_proj.bias",
        "layers.0.input_layernorm.weight",
        "scale",
    }
    decay, _ = split_by_decay(named, [r"embed"], [r"lm_head"])
    assert decay == ["model.embed_tokens.weight", "layers.0.q_proj.weight"]


@pytest.mark.parametrize(
    "options, trainer_wd",
    [
        ({}, 0.3),
        ({"weight_decay": 1.6, "no_decay": ["norm", "bias"]}, 0.1),
        ({"weight_decay": 0.5, "decay": ["norm"]}, 0.0),
    ],
)
def test_hf_optimizer_groups_are_the_policy(tok, tmp_path, options, trainer_wd):
    policy = WeightDecayPolicy(**options)
    trainer = make_hf_trainer(tok, tmp_path, regularizers=[policy], weight_decay=trainer_wd, max_steps=1)
    trainer.train()
    wd = options.get("weight_decay", trainer_wd)
    decay, no_decay = split_by_decay(
        list(trainer.model.named_parameters()), policy.options.decay, policy.options.no_decay
    )
    assert decay and no_decay
    assert _groups(trainer.optimizer, trainer.model) == sorted(
        [(0.0, tuple(sorted(no_decay))), (wd, tuple(sorted(decay)))]
    )


def test_decay_is_decoupled_and_scaled_by_lr(tok, tmp_path):
    """AdamW: one step with decay differs from one without by exactly lr * wd * theta_0 on decayed tensors only."""
    from conftest import weights

    lr, wd = 1e-2, 0.5
    with_wd = make_hf_trainer(
        tok, tmp_path / "a", regularizers=[WeightDecayPolicy(weight_decay=wd)], max_steps=1, learning_rate=lr
    )
    start = weights(with_wd.model)
    with_wd.train()
    without = make_hf_trainer(
        tok, tmp_path / "b", regularizers=[WeightDecayPolicy(weight_decay=0.0)], max_steps=1, learning_rate=lr
    )
    without.train()
    decay, _ = split_by_decay(
        list(with_wd.model.named_parameters()), [], with_wd.reg_stack.regularizers[0].options.no_decay
    )
    after_a, after_b = weights(with_wd.model), weights(without.model)
    for name in start:
        expected = -lr * wd * start[name] if name in decay else torch.zeros_like(start[name])
        assert torch.allclose(after_a[name] - after_b[name], expected, atol=1e-7), name
