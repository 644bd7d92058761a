"""Hierarchical layer-wise + element-wise forgetting penalty: the functional core.

Paper: Song et al., "How to Alleviate Catastrophic Forgetting in LLMs Finetuning? Hierarchical Layer-Wise
and Element-Wise Regularization", arXiv 2501.13669 (spec: shared/methods/forgetting.md). Importance from
the Synaptic-Intelligence path integral (Zenke et al., arXiv 1703.04200); EWC (arXiv 1612.00796) and
L2-SP (arXiv 1802.01483) are the same penalty under other importances.

    R = lam * sum_l a_l * sum_{i in layer l} Omega_i * (theta_i - theta*_i)^2
    a_l = softmax_l(c * ||Omega_l||_F)      (or uniform 1/L, or 1)

This module holds the pure math, tested against explicit formulas and autograd; `penalty.py`, `si.py`
and `ewc.py` apply it to each rank's local shards. Departure from the paper kept here: the fold clamps
the accumulated path integral at zero (`clamp=True`), since a negative importance would reward drifting
away from the anchor; the official code clamps at every step instead (`si_accumulate(..., clamp=True)`).
"""

from __future__ import annotations

import math

import torch


def si_accumulate(omega: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor, clamp: bool = False) -> torch.Tensor:
    """One optimizer step of the SI path integral: omega - grad * delta (grad before the step, delta its move)."""
    out = omega - grad * delta
    return out.clamp_min(0.0) if clamp else out


def si_fold(omega: torch.Tensor, total_delta: torch.Tensor, xi: float = 1e-9, clamp: bool = True) -> torch.Tensor:
    """Importance at the end of the phase: max(omega, 0) / (total_delta^2 + xi)."""
    if clamp:
        omega = omega.clamp_min(0.0)
    return omega / (total_delta.pow(2) + xi)


def layer_coefficients(norms: torch.Tensor, weighting: str = "softmax", temperature: float = 1e-8) -> torch.Tensor:
    """a_l per decoder layer from the layers' importance norms ||Omega_l||_F."""
    if weighting == "softmax":
        return torch.softmax(temperature * norms.double(), dim=0).to(norms.dtype)
    if weighting == "uniform":
        return torch.full_like(norms, 1.0 / norms.numel())
    if weighting == "none":
        return torch.ones_like(norms)
    raise ValueError(f"layer weighting must be softmax, uniform or none, got {weighting!r}")


def importance_rms(sum_sq: dict[str, float], shapes: dict[str, tuple[int, ...]]) -> float:
    """sqrt(sum Omega^2 / count) over the tensors in `shapes`, from per-tensor sums of squares (an artifact's
    metadata): importance_scale=rms divides Omega by it, so lam means the same across importance magnitudes."""
    return math.sqrt(sum(sum_sq[n] for n in shapes) / sum(math.prod(shapes[n]) for n in shapes))


def importance_mean_abs(sum_abs: dict[str, float], shapes: dict[str, tuple[int, ...]]) -> float:
    """sum |Omega| / count over the tensors in `shapes`: importance_scale=mean divides Omega by it, so the mean
    Omega is 1 and lam pulls the average weight as l2_sp's lam / 2 does. Unlike the RMS, it is not dominated by
    the few largest entries of a heavy-tailed importance (a diagonal Fisher's mean is ~1 % of its RMS)."""
    return sum(sum_abs[n] for n in shapes) / sum(math.prod(shapes[n]) for n in shapes)


def quadratic_penalty(
    theta: torch.Tensor, anchor: torch.Tensor, omega: torch.Tensor | float, coef: float
) -> torch.Tensor:
    """coef * sum omega * (theta - anchor)^2 (coef = lam * a_l for one tensor of layer l)."""
    return coef * (omega * (theta - anchor).pow(2)).sum()


def quadratic_penalty_grad(
    theta: torch.Tensor, anchor: torch.Tensor, omega: torch.Tensor | float, coef: float
) -> torch.Tensor:
    """Gradient of `quadratic_penalty` with respect to theta: 2 * coef * omega * (theta - anchor)."""
    return 2.0 * coef * omega * (theta - anchor)


def lora_product_penalty_grads(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    anchor_a: torch.Tensor,
    anchor_b: torch.Tensor,
    omega: torch.Tensor | float,
    coef: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (A, B) of coef * sum omega * (s*B@A - s*B*@A*)^2, the penalty on the dense LoRA product.

    P = 2 * coef * omega * (dW - dW*) (out x in); dR/dB = s * P @ A^T; dR/dA = s * B^T @ P.
    """
    diff = scale * lora_b @ lora_a - scale * anchor_b @ anchor_a
    return lora_grads_from_product_diff(lora_a, lora_b, diff, omega, coef, scale)


def lora_grads_from_product_diff(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    diff: torch.Tensor,
    omega: torch.Tensor | float,
    coef: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lora_product_penalty_grads` given diff = s*B@A - s*B*@A* already formed (it is the costly product)."""
    p = 2.0 * coef * omega * diff  # = quadratic_penalty_grad at dW - dW* = diff
    return scale * lora_b.T @ p, scale * p @ lora_a.T


def fisher_diagonal(per_example_grads: list[torch.Tensor]) -> torch.Tensor:
    """Diagonal empirical Fisher: the mean over examples of the squared per-example gradient."""
    if not per_example_grads:
        raise ValueError("the Fisher needs at least one per-example gradient")
    total = torch.zeros_like(per_example_grads[0], dtype=torch.float32)
    for grad in per_example_grads:
        total.add_(grad.float().pow(2))
    return total / len(per_example_grads)
