"""L2-SP: a quadratic pull toward the starting weights.

Paper: Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning
with Convolutional Networks", ICML 2018 (arXiv 1802.01483). The penalty is
`lam / 2 * ||theta - theta_0||^2` over the trainable parameters, theta_0 the
weights when training starts.

Hooks: `on_prepared` stores theta_0 as each rank's local fp32 shard;
`pre_step` adds `lam * (theta - theta_0)` to the local gradient shard, between
backward and the optimizer step (so it is clipped with the data gradient, as
an autograd penalty would be). Under ZeRO-3 no weight is gathered.

Departures from the paper: the paper penalises only the transferred layers and
adds a plain L2 term on the new head; here every trainable parameter is pulled
toward its start (freeze or exclude a head by name with `exclude`). The
penalty is a gradient edit, not a loss term, so it is added once per optimizer
step, which matches `loss + penalty` with the loss averaged over accumulation.
"""

from __future__ import annotations

import re

import torch

from dataclasses import dataclass

from llmreg.core import Order, Regularizer, ShardAccess, option, register
from llmreg.regularizers.forgetting import quadratic_penalty, quadratic_penalty_grad


def l2_sp_penalty(theta: torch.Tensor, anchor: torch.Tensor, lam: float) -> torch.Tensor:
    """lam / 2 * ||theta - anchor||^2: the forgetting penalty with uniform importance 1 and coefficient lam / 2."""
    return quadratic_penalty(theta, anchor, 1.0, 0.5 * lam)


def l2_sp_grad(theta: torch.Tensor, anchor: torch.Tensor, lam: float) -> torch.Tensor:
    """Gradient of `l2_sp_penalty` with respect to theta: lam * (theta - anchor)."""
    return quadratic_penalty_grad(theta, anchor, 1.0, 0.5 * lam)


@dataclass
class L2SPOptions:
    lam: float = option(0.01, "strength of the pull toward the start: penalty lam/2 * ||theta - theta_0||^2")
    exclude: list[str] = option([], "regexes of parameter names that are not pulled (e.g. a new head)")


@register("l2_sp")
class L2SP(Regularizer):
    """Pull every trainable weight toward its value at the start of training: lam/2 * ||theta - theta_0||^2."""

    options_cls = L2SPOptions
    order = Order.GRADIENT_EDIT

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.anchors: dict[str, torch.Tensor] = {}
        self._penalty = 0.0

    def _selected(self, name: str) -> bool:
        return not any(re.search(pattern, name) for pattern in self.options.exclude)

    def on_prepared(self, model, shards: ShardAccess) -> None:
        if self.anchors:  # already set (a second train() call keeps the original start)
            return
        self.anchors = {
            name: shards.local_param(p).detach().clone().float()
            for name, p in shards.named_parameters()
            if self._selected(name)
        }

    @torch.no_grad()
    def pre_step(self, shards: ShardAccess) -> None:
        # one temporary per tensor: diff serves both the penalty and the in-place gradient update
        lam = self.options.lam
        penalty = None
        for name, p in shards.named_parameters():
            anchor = self.anchors.get(name)
            if anchor is None:
                continue
            theta = shards.local_param(p)
            diff = theta - anchor.to(theta.device)
            sq = torch.dot(diff, diff)
            penalty = sq if penalty is None else penalty + sq
            if lam != 0.0:
                shards.add_to_grad(p, diff, alpha=lam)  # = l2_sp_grad(theta, anchor, lam)
        if penalty is not None:
            # kept as a tensor: converting here would force a device sync every step
            self._penalty = shards.all_reduce_sum(0.5 * lam * penalty)

    def metrics(self) -> dict[str, float]:
        return {"penalty": float(self._penalty)}

    def state_dict(self) -> dict:
        return {"anchors": {k: v.cpu() for k, v in self.anchors.items()}}

    def load_state_dict(self, state: dict) -> None:
        anchors = state["anchors"]
        if self.anchors and set(anchors) != set(self.anchors):
            raise ValueError("l2_sp: saved anchors cover other parameters than this model's")
        for name, value in anchors.items():
            if name in self.anchors and self.anchors[name].shape != value.shape:
                raise ValueError(f"l2_sp: saved anchor for {name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(self.anchors[name].shape)} (another world size?)")
        self.anchors = {k: v.float() for k, v in anchors.items()}
