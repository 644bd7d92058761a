"""The forgetting penalty's functional core against explicit formulas and autograd."""

from __future__ import annotations

import torch

from llmreg.regularizers.forgetting import (
    fisher_diagonal,
    layer_coefficients,
    lora_product_penalty_grads,
    quadratic_penalty,
    quadratic_penalty_grad,
    si_accumulate,
    si_fold,
)


def test_quadratic_grad_is_autograd_of_penalty():
    torch.manual_seed(0)
    theta = torch.randn(4, 3, requires_grad=True)
    anchor, omega = torch.randn(4, 3), torch.rand(4, 3)
    (auto,) = torch.autograd.grad(quadratic_penalty(theta, anchor, omega, 0.3), theta)
    assert torch.allclose(quadratic_penalty_grad(theta.detach(), anchor, omega, 0.3), auto)


def test_lora_product_grads_are_autograd_of_dense_penalty():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    a0, b0, omega, s = torch.randn(2, 5), torch.randn(4, 2), torch.rand(4, 5), 4.0
    penalty = quadratic_penalty(s * b @ a, s * b0 @ a0, omega, 0.7)
    grad_a, grad_b = torch.autograd.grad(penalty, (a, b))
    mine_a, mine_b = lora_product_penalty_grads(a.detach(), b.detach(), a0, b0, omega, 0.7, s)
    assert torch.allclose(mine_a, grad_a, rtol=1e-5, atol=1e-5)
    assert torch.allclose(mine_b, grad_b, rtol=1e-5, atol=1e-5)


def test_si_path_integral_by_hand():
    # three steps of one 2-element tensor; g is the gradient before each step, d the step's move
    g = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, -1.0]), torch.tensor([-0.5, 1.0])]
    d = [torch.tensor([-0.1, 0.2]), torch.tensor([-0.1, 0.1]), torch.tensor([0.05, 0.1])]
    omega = torch.zeros(2)
    for gi, di in zip(g, d):
        omega = si_accumulate(omega, gi, di)
    # by hand: -(1*-0.1 + 0.5*-0.1 + -0.5*0.05) = 0.175 ; -(-2*0.2 + -1*0.1 + 1*0.1) = 0.4
    assert torch.allclose(omega, torch.tensor([0.175, 0.4]))
    total = sum(d)  # [-0.15, 0.4]
    importance = si_fold(omega, total, xi=0.01)
    assert torch.allclose(importance, torch.tensor([0.175 / (0.0225 + 0.01), 0.4 / (0.16 + 0.01)]))
    # a negative path integral is clamped at the fold, or at each step in the code's variant
    assert si_fold(torch.tensor([-1.0]), torch.tensor([1.0])).item() == 0.0
    assert si_accumulate(torch.zeros(1), torch.ones(1), torch.ones(1), clamp=True).item() == 0.0


def test_layer_coefficients():
    norms = torch.tensor([1.0, 2.0, 3.0])
    soft = layer_coefficients(norms, "softmax", temperature=1.0)
    expected = torch.exp(norms) / torch.exp(norms).sum()
    assert torch.allclose(soft, expected)
    assert torch.allclose(layer_coefficients(norms, "uniform"), torch.full((3,), 1 / 3))
    assert torch.equal(layer_coefficients(norms, "none"), torch.ones(3))
    # the paper's tiny temperature keeps huge norms from overflowing: nearly uniform
    assert torch.allclose(
        layer_coefficients(torch.tensor([1e6, 2e6]), "softmax", 1e-8), torch.full((2,), 0.5), atol=1e-2
    )


def test_fisher_is_mean_of_squared_per_example_grads():
    grads = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 1.0])]
    assert torch.allclose(fisher_diagonal(grads), torch.tensor([11 / 3, 5 / 3]))
