"""`si_importance`: records the Synaptic-Intelligence path integral during a run on general data.

Phase 1 of the forgetting penalty (spec shared/methods/forgetting.md section 2; SI: Zenke et al.,
arXiv 1703.04200). At every optimizer step, with g the accumulated gradient before the step and delta
the step's movement of the fp32 master weights,

    omega <- omega - g * delta          (per element, local shards)

and at the end Omega = max(omega, 0) / ((theta_end - theta_start)^2 + xi). `save_artifact` gathers the
shards and writes the artifact `forgetting_penalty` reads.

Hooks: `on_prepared` keeps theta_start (local fp32 shard); `pre_step` copies g and theta before the
step (g before clipping: the edit point is before the clip); `post_step` accumulates omega;
`state_dict` carries omega, theta_start and the step count so an interrupted phase 1 resumes exactly.

Departures from the paper / code: the true gradient of the regularised weights (the code's LoRA run uses
an SGD closed form of the product's gradient; full fine-tuning has no product, and LoRA phase 1 is not
offered here); clamp at the fold (`omega_clamp="fold"`; the code clamps every step, `"step"`; canonical
SI, `"none"`). `fold="epoch"` folds at every epoch end like the code, Omega += omega / (theta_now -
theta_start)^2 + xi), omega <- 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

import llmreg.regularizers.forgetting.artifact as art
from llmreg.core.registry import register
from llmreg.core.regularizer import Order, Regularizer, Requirements, option
from llmreg.core.shards import ShardAccess
from llmreg.regularizers.forgetting.formulas import si_accumulate, si_fold
from llmreg.regularizers.forgetting.targets import base_name, default_selector, full_shape


@dataclass
class SIImportanceOptions:
    targets: list[str] = option([], "regexes of weight names to record; default: the 2-D weights of the decoder layers")
    exclude: list[str] = option([], "regexes of weight names left out")
    xi: float = option(
        1e-9, "damping in the fold Omega = omega / (Delta^2 + xi) (code 1e-9; SI papers 1e-3 or 0.1)", ge=0
    )
    fold: Literal["end", "epoch"] = option("end", "fold once at the end | at every epoch end (code)")
    omega_clamp: Literal["fold", "step", "none"] = option(
        "fold", "clamp omega at 0 when folding | after every step (code) | never (canonical SI)"
    )


def _epoch_fold_callback(recorder: SIImportance):
    """A TrainerCallback that folds at each epoch end (fold='epoch')."""
    from transformers import TrainerCallback

    class EpochFold(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            recorder.fold_epoch()

    return EpochFold()


@register("si_importance")
class SIImportance(Regularizer):
    """Phase 1: accumulate omega = -sum_t g_t * delta_t per weight element; `save_artifact` folds and writes.

    Example (a run on general data; then `save_artifact` or `record.write_si_artifact`)::

        RegSFTTrainer(..., regularizers=[{"name": "si_importance"}])

    In a recipe, phase 1 is the `importance:` section (``importance: {method: si}``), run by `llmreg importance`.
    """

    options_cls = SIImportanceOptions
    order = Order.GRADIENT_EDIT + 5  # record the gradient the optimizer will use, after any other edit
    requires = Requirements(supports_peft=False)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.selector = default_selector(self.options.targets, self.options.exclude)
        self.omega: dict[str, torch.Tensor] = {}
        self.theta_start: dict[str, torch.Tensor] = {}
        self.folded: dict[str, torch.Tensor] = {}  # fold='epoch': Omega so far
        self.steps = 0
        self._grad: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}

    def setup(self, model, trainer) -> None:
        names = [
            base_name(n)
            for n, p in model.named_parameters()
            if p.requires_grad and self.selector(base_name(n), full_shape(p))
        ]
        if not names:
            raise ValueError(f"{self.name}: no trainable weight matches targets {self.options.targets or 'default'}")
        self.names = names
        if self.options.fold == "epoch":
            trainer.add_callback(_epoch_fold_callback(self))

    def on_prepared(self, model, shards: ShardAccess) -> None:
        self._shards = shards
        wanted = set(self.names)
        self._params = {base_name(n): p for n, p in shards.named_parameters() if base_name(n) in wanted}
        if self.theta_start:  # resumed or a second train() call: keep recording from the original start
            return
        for name, p in self._params.items():
            theta = shards.local_param(p)
            self.theta_start[name] = theta.detach().clone().float()
            self.omega[name] = torch.zeros_like(self.theta_start[name])
        self.start_sum_sq = self._sum_sq(lambda name, p: self.theta_start.get(name))

    @torch.no_grad()
    def pre_step(self, shards: ShardAccess) -> None:
        for name, p in self._params.items():
            grad = shards.local_grad(p)
            theta = shards.local_param(p)
            self._grad[name] = torch.zeros_like(theta) if grad is None else grad.detach().clone().float()
            self._before[name] = theta.detach().clone()

    @torch.no_grad()
    def post_step(self, shards: ShardAccess) -> None:
        clamp = self.options.omega_clamp == "step"
        for name, p in self._params.items():
            delta = shards.local_param(p) - self._before.pop(name)
            self.omega[name] = si_accumulate(self.omega[name], self._grad.pop(name), delta, clamp=clamp)
        self.steps += 1

    @torch.no_grad()
    def fold_epoch(self) -> None:
        for name, p in self._params.items():
            total = self._shards.local_param(p) - self.theta_start[name]
            part = si_fold(self.omega[name], total, self.options.xi, clamp=self.options.omega_clamp != "none")
            self.folded[name] = part if name not in self.folded else self.folded[name] + part
            self.omega[name].zero_()

    @torch.no_grad()
    def local_importance(self) -> dict[str, torch.Tensor]:
        """This rank's shards of the final Omega."""
        if self.options.fold == "epoch":
            if any(bool(o.any()) for o in self.omega.values()):  # steps after the last epoch end
                self.fold_epoch()
            return {n: self.folded.get(n, torch.zeros_like(self.omega[n])) for n in self._params}
        clamp = self.options.omega_clamp != "none"
        return {
            name: si_fold(
                self.omega[name], self._shards.local_param(p) - self.theta_start[name], self.options.xi, clamp=clamp
            )
            for name, p in self._params.items()
        }

    def _sum_sq(self, local_of) -> dict[str, float]:
        """Per recorded weight, the sum of squares over all ranks' shards (every rank must call it)."""
        device = next(iter(self._params.values())).device if self._params else torch.device("cpu")
        sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        for i, name in enumerate(self.names):
            p = self._params.get(name)
            local = None if p is None else local_of(name, p)
            if local is not None:
                sums[i] = self._shards.without_padding(p, local).double().pow(2).sum()
        sums = self._shards.all_reduce_sum(sums).cpu()
        return {name: float(v) for name, v in zip(self.names, sums)}

    def save_artifact(self, directory: str, meta: dict[str, Any] | None = None, is_main: bool = True) -> dict[str, Any]:
        """Fold, gather the shards and (on the main process) write the artifact. Every rank must call it."""
        shards = self._shards
        local = self.local_importance()
        full = {}
        for name, p in shards.trainable_parameters():
            if base_name(name) in self.names:
                full[base_name(name)] = shards.gather_full(p, local.get(base_name(name))).float().cpu()
        end_sum_sq = self._sum_sq(lambda name, p: shards.local_param(p))
        info = {
            "method": "si",
            "steps": self.steps,
            "options": {k: getattr(self.options, k) for k in ("xi", "fold", "omega_clamp", "targets", "exclude")},
            "anchor_sum_sq": {"start": self.start_sum_sq, "end": end_sum_sq},
            **art.importance_stats(full),
            **(meta or {}),
        }
        if is_main:
            art.save_artifact(directory, full, info)
        return info

    def state_dict(self) -> dict:
        return {
            "omega": {k: v.cpu() for k, v in self.omega.items()},
            "theta_start": {k: v.cpu() for k, v in self.theta_start.items()},
            "folded": {k: v.cpu() for k, v in self.folded.items()},
            "steps": self.steps,
            "start_sum_sq": getattr(self, "start_sum_sq", None),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.omega and set(state["omega"]) != set(self.omega):
            raise ValueError(f"{self.name}: saved path integral covers other weights than this run's")
        self.omega = {k: v.float() for k, v in state["omega"].items()}
        self.theta_start = {k: v.float() for k, v in state["theta_start"].items()}
        self.folded = {k: v.float() for k, v in state["folded"].items()}
        self.steps = state["steps"]
        self.start_sum_sq = state["start_sum_sq"]
