"""L2-SP: a quadratic pull toward the starting weights, the forgetting penalty with uniform importance.

Paper: Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks", ICML 2018 (arXiv 1802.01483). The penalty is `lam / 2 * ||theta - theta_0||^2` over the
trainable parameters, theta_0 the weights when training starts.

This is a preset of `forgetting_penalty` (forgetting/penalty.py) with importance 1, no layer weighting
and lambda = lam / 2: one implementation of the gradient edit, hooks as documented there (anchors as
local fp32 shards in `on_prepared`, the edit on local gradient shards in `pre_step`, no gathering
under ZeRO-3). Under PEFT LoRA the pull is on the dense product s * B @ A, as the spec prescribes.

Departures from the paper: the paper penalises only the transferred layers and adds a plain L2 term on
the new head; here every trainable parameter is pulled toward its start (freeze or exclude a head by
name with `exclude`). The penalty is a gradient edit, not a loss term, so it is added once per optimizer
step, which matches `loss + penalty` with the loss averaged over accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmreg.core.registry import register
from llmreg.core.regularizer import option
from llmreg.regularizers.forgetting.formulas import quadratic_penalty, quadratic_penalty_grad
from llmreg.regularizers.forgetting.penalty import ForgettingPenalty, PenaltyConfig
from llmreg.regularizers.forgetting.targets import Selector


def l2_sp_penalty(theta: torch.Tensor, anchor: torch.Tensor, lam: float) -> torch.Tensor:
    """lam / 2 * ||theta - anchor||^2: the forgetting penalty with uniform importance 1 and coefficient lam / 2."""
    return quadratic_penalty(theta, anchor, 1.0, 0.5 * lam)


def l2_sp_grad(theta: torch.Tensor, anchor: torch.Tensor, lam: float) -> torch.Tensor:
    """Gradient of `l2_sp_penalty` with respect to theta: lam * (theta - anchor)."""
    return quadratic_penalty_grad(theta, anchor, 1.0, 0.5 * lam)


@dataclass
class L2SPOptions:
    lam: float = option(
        0.01, "strength of the pull toward the start: penalty lam/2 * ||theta - theta_0||^2", ge=0, warn_above=1e6
    )
    exclude: list[str] = option([], "regexes of parameter names that are not pulled (e.g. a new head)")


@register("l2_sp")
class L2SP(ForgettingPenalty):
    """Pull every trainable weight toward its value at the start of training: lam/2 * ||theta - theta_0||^2.

    Example::

        RegSFTTrainer(..., regularizers=[{"name": "l2_sp", "lam": 0.01}])

    In a recipe: ``regularizers: [{name: l2_sp, lam: 0.01}]``.
    """

    options_cls = L2SPOptions

    def config(self) -> PenaltyConfig:
        return PenaltyConfig(
            importance="l2sp",
            lam=0.5 * self.options.lam,
            weighting="none",
            temperature=0.0,
            selector=Selector(include=None, exclude=tuple(self.options.exclude)),
            anchor=None,
            apply="grad_edit",
            artifact=None,
        )
