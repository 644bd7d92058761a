"""`forgetting_penalty`: the hierarchical layer-wise + element-wise quadratic penalty (and EWC, L2-SP).

Paper: Song et al., arXiv 2501.13669 (spec: shared/methods/forgetting.md). In fine-tuning,

    R = lam * sum_l a_l * sum_{i in layer l} Omega_i * (theta_i - theta*_i)^2

with Omega from an importance artifact (`llmreg importance`: SI path integral or EWC Fisher; uniform 1
for L2-SP, which needs none), theta* the weights the run starts from, and a_l = softmax_l(c * ||Omega_l||)
(paper), 1/L or 1. Under PEFT LoRA theta is the dense product dW = s * B @ A of each adapted tensor, formed in
that tensor's own layout (`targets.lora_delta`: GPT-2 Conv1D [in, out], MoE expert stacks [E, out, in] and
routers wrapped by PEFT's ParamWrapper), its gradients in A and B by autograd on fp32 copies of A and B.

Hooks: `setup` checks the artifact against the model (architecture, names, shapes, and that the run
starts from the artifact's anchor weights) and fixes a_l; `on_prepared` keeps theta* and Omega as each
rank's local fp32 shards (LoRA: A*, B* and the dense Omega of each module); `pre_step` adds
dR/dtheta to the local gradient between backward and clipping, once per optimizer step; `loss_terms`
adds R to the loss instead when `apply="loss"` (no DeepSpeed; for checking the edit).

Departures from the paper: the penalty is a gradient edit rather than a loss term (the same gradient,
without gathering weights under ZeRO-3); full fine-tuning is offered beside LoRA (the paper works on
LoRA); theta* is always the weights the run starts from, and `anchor` states which weights of the
importance run those must be (its end, the paper, or its start, the "pretrained" variant); `importance_scale:
mean` or `rms` (not in the paper) divides Omega by its mean |Omega| or its RMS over the covered weights, so lam
transfers across models (mean: lam pulls the average weight as l2_sp's lam / 2; see benchmarks/RESULTS.md). Under
ZeRO-3 with LoRA, A and B are gathered read-only per module and Omega is kept whole on every rank
(the spec's row sharding of Omega is not done).
"""

from __future__ import annotations

import math

import torch

import llmreg.regularizers.forgetting.artifact as art
from llmreg.core.anatomy import is_peft
from llmreg.core.dist import all_reduce_sum_
from llmreg.core.options import ConfigError
from llmreg.core.registry import register
from llmreg.core.regularizer import Order, Regularizer
from llmreg.core.shards import ShardAccess, zero3_unpadded
from llmreg.regularizers.forgetting.formulas import importance_mean_abs, importance_rms, layer_coefficients
from llmreg.regularizers.forgetting.options import DEFAULT_LAMBDA, ForgettingPenaltyOptions, PenaltyConfig
from llmreg.regularizers.forgetting.targets import (
    LoraTarget,
    base_name,
    default_selector,
    full_shape,
    layer_of,
    lora_delta,
    lora_targets,
    select_parameters,
)


@register("forgetting_penalty")
class ForgettingPenalty(Regularizer):
    """lam * sum_l a_l * sum_i Omega_i (theta_i - theta*_i)^2 as a gradient edit on local shards.

    Example (phase 2, with the artifact `llmreg importance RECIPE` wrote)::

        RegSFTTrainer(..., regularizers=[{"name": "forgetting_penalty", "artifact": "runs/imp/importance"}])

    In a recipe: ``regularizers: [{name: forgetting_penalty, importance: si, artifact: runs/imp/importance}]``.
    """

    options_cls = ForgettingPenaltyOptions
    order = Order.GRADIENT_EDIT

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.cfg = self.config()
        self.meta = self._read_artifact_meta()
        self.anchors: dict[str, torch.Tensor] = {}  # local fp32 shards; LoRA: "<name>:A" / "<name>:B" whole
        self.importance: dict[str, torch.Tensor] = {}  # local fp32 shards (LoRA: dense, whole); empty for l2sp
        self.coefficients: dict[str, torch.Tensor] = {}  # layer key -> a_l (0-d tensors)
        self._params: dict[str, torch.nn.Parameter] = {}
        self._lora: list[LoraTarget] = []
        self._penalty: torch.Tensor | float = 0.0
        self._device = torch.device("cpu")
        self._omega_divisor = 1.0  # importance_scale rms / mean: the RMS or mean |Omega| over the covered weights

    def config(self) -> PenaltyConfig:
        o = self.options
        weighting = o.layer_weighting or ("softmax" if o.importance == "si" else "none")
        lam = DEFAULT_LAMBDA[o.importance] if o.lam is None else o.lam
        return PenaltyConfig(
            importance=o.importance,
            lam=lam,
            weighting=weighting,
            temperature=o.layer_temperature,
            selector=default_selector(o.targets, o.exclude),
            anchor=o.anchor,
            apply=o.apply,
            artifact=o.artifact,
            importance_scale=o.importance_scale,
        )

    def _read_artifact_meta(self) -> dict | None:
        cfg = self.cfg
        if cfg.importance == "l2sp":
            if cfg.artifact:
                raise ConfigError(f"{self.name}: importance=l2sp uses Omega = 1 and takes no artifact")
            return None
        if not cfg.artifact:
            raise ConfigError(
                f"{self.name}: importance={cfg.importance} needs `artifact`, the directory written by "
                f"`llmreg importance RECIPE`"
            )
        meta = art.read_meta(cfg.artifact)
        if meta.get("method") != cfg.importance:
            raise ConfigError(
                f"{self.name}: artifact {cfg.artifact} holds {meta.get('method')!r} importance, "
                f"but importance={cfg.importance!r}"
            )
        return meta

    # -- setup: what is regularised, checks against the artifact, layer coefficients ----------------
    @property
    def is_lora(self) -> bool:
        return bool(self._lora)

    def setup(self, model, trainer) -> None:
        cfg = self.cfg
        if is_peft(model):
            self._lora = lora_targets(model, cfg.selector)
            # dW is laid out like the base tensor (Conv1D [in, out], experts [E, out, in]): so is Omega
            shapes = {t.name: t.shape for t in self._lora}
            if not shapes:
                raise ConfigError(
                    f"{self.name}: no LoRA-adapted module matches targets {list(cfg.selector.include or [])}"
                )
        else:
            named = {n: p for n, p in _base_named_parameters(model)}
            names = select_parameters(named.items(), cfg.selector)
            shapes = {n: tuple(full_shape(named[n])) for n in names}
            if not shapes:
                raise ConfigError(
                    f"{self.name}: no trainable weight matches targets {list(cfg.selector.include or [])}"
                )
        if cfg.apply == "loss" and getattr(trainer, "is_deepspeed_enabled", False):
            raise ConfigError(
                f"{self.name}: apply=loss needs whole weights on every rank; use apply=grad_edit under DeepSpeed"
            )
        if self.meta is not None:
            art.check_against_model(self.meta, cfg.artifact, art.architecture(model), shapes)
            base = dict(_base_named_parameters(model, trainable_only=False))
            sum_sq = _weights_sum_sq([base[n] for n in shapes])
            # under LoRA the base weights are frozen: they must be the importance run's start or end weights
            anchors = ("phase1_end", "pretrained") if self.is_lora else (cfg.anchor,)
            errors = []
            for anchor in anchors:
                try:
                    art.check_anchor(self.meta, cfg.artifact, sum_sq, shapes, anchor)
                    break
                except ConfigError as err:
                    errors.append(err)
            else:
                raise errors[0]
        self._shapes = shapes
        if cfg.importance_scale != "raw" and self.meta:  # from the artifact's metadata: the same on every rank
            self._omega_divisor = self._importance_divisor(cfg.importance_scale, shapes)
        self.coefficients = self._layer_coefficients(shapes)

    def _importance_divisor(self, scale: str, shapes: dict[str, tuple[int, ...]]) -> float:
        if scale == "rms":
            divisor = importance_rms(self.meta.get("importance_sum_sq", {}), shapes)
        else:
            if "importance_sum_abs" not in self.meta:  # artifacts written before importance_scale=mean existed
                raise ConfigError(
                    f"{self.name}: importance_scale=mean needs the artifact's importance_sum_abs, which "
                    f"{self.cfg.artifact} predates: recompute it (llmreg importance) or use importance_scale=rms"
                )
            divisor = importance_mean_abs(self.meta["importance_sum_abs"], shapes)
        if divisor <= 0:
            raise ConfigError(f"{self.name}: importance_scale={scale}: the importance is 0 on every target")
        return divisor

    def _layer_coefficients(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        layers = sorted({layer_of(n) for n in shapes}, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        sums = self.meta.get("importance_sum_sq", {}) if self.meta else {}
        norms = []
        for layer in layers:
            members = [n for n in shapes if layer_of(n) == layer]
            # uniform importance 1: ||Omega_l||^2 is the element count
            norms.append(math.sqrt(sum(sums[n] if self.meta else math.prod(shapes[n]) for n in members)))
        norms = [x / self._omega_divisor for x in norms]  # ||Omega_l / divisor|| under importance_scale rms / mean
        coefs = layer_coefficients(torch.tensor(norms, dtype=torch.float64), self.cfg.weighting, self.cfg.temperature)
        return {layer: coefs[i].float() for i, layer in enumerate(layers)}

    # -- local state ---------------------------------------------------------------------------
    def on_prepared(self, model, shards: ShardAccess) -> None:
        if self.anchors:  # a second train() call keeps the original anchor
            return
        self._device = next(model.parameters()).device
        if self.is_lora:
            self._prepare_lora(shards)
            return
        wanted = set(self._shapes)
        self._params = {}
        for name, p in shards.named_parameters():
            key = base_name(name)
            if key not in wanted:
                continue
            self._params[key] = p
            self.anchors[key] = shards.local_param(p).detach().clone().float()
            if self.meta:  # one whole tensor in memory at a time; only the local slice is kept
                full = art.load_importance(self.cfg.artifact, [key])[key]
                self.importance[key] = shards.local_slice(p, full).float() / self._omega_divisor

    @torch.no_grad()
    def _prepare_lora(self, shards: ShardAccess) -> None:
        full = art.load_importance(self.cfg.artifact, self._shapes) if self.meta else {}
        for target in self._lora:
            a, b = _lora_values(target, shards)
            self.anchors[target.name + ":A"] = a.clone()
            self.anchors[target.name + ":B"] = b.clone()
            if self.meta:
                self.importance[target.name] = full[target.name] / self._omega_divisor

    # -- the edit ------------------------------------------------------------------------------
    def _coef(self, name: str) -> float:
        return self.cfg.lam * float(self.coefficients[layer_of(name)])

    @torch.no_grad()
    def pre_step(self, shards: ShardAccess) -> None:
        if self.cfg.apply != "grad_edit":
            return
        if self.is_lora:
            self._penalty = self._lora_edit(shards)
            return
        penalty = None
        for name, p in self._params.items():
            theta = shards.local_param(p)
            diff = theta - self.anchors[name].to(theta.device)
            omega = self.importance.get(name)
            weighted = diff if omega is None else omega.to(theta.device) * diff  # = dR/dtheta / (2 * coef)
            coef = self._coef(name)
            term = coef * torch.dot(weighted, diff)
            penalty = term if penalty is None else penalty + term  # a device tensor: no sync per tensor
            if coef != 0.0:
                shards.add_to_grad(p, weighted, alpha=2.0 * coef)
        if penalty is None:  # a ZeRO-2 rank may own no fragment; it still joins the reduction
            penalty = torch.zeros((), device=self._device)
        self._penalty = shards.all_reduce_sum(penalty)

    def _lora_edit(self, shards: ShardAccess) -> torch.Tensor:
        penalty = torch.zeros((), device=self._device)
        for target in self._lora:
            a, b = _lora_values(target, shards)
            anchor = lora_delta(target, self.anchors[target.name + ":A"], self.anchors[target.name + ":B"])
            omega = self.importance.get(target.name, 1.0)
            coef = self._coef(target.name)
            # autograd on fp32 copies of A and B (not DeepSpeed's parameters, trap 9): one code path for every
            # layout of dW (linear, Conv1D, 3-D experts)
            a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
            with torch.enable_grad():
                term = coef * (omega * (lora_delta(target, a, b) - anchor).pow(2)).sum()
            penalty = penalty + term.detach()  # on the device: no sync per module
            if coef == 0.0:
                continue
            grad_a, grad_b = torch.autograd.grad(term, (a, b))
            for p, full in ((target.lora_a, grad_a), (target.lora_b, grad_b)):
                if shards.owns(p):
                    shards.add_to_grad(p, shards.local_slice(p, full))
        return penalty  # every rank computed the whole sum: no reduction

    # -- the loss-term variant (tests, single process / DDP) ----------------------------------------
    def loss_terms(self, ctx) -> dict[str, torch.Tensor]:
        if self.cfg.apply != "loss":
            return {}
        terms = []
        if self.is_lora:
            for target in self._lora:
                a, b = target.lora_a.float(), target.lora_b.float()
                anchor = lora_delta(target, self.anchors[target.name + ":A"], self.anchors[target.name + ":B"])
                omega = self.importance.get(target.name, 1.0)
                terms.append(self._coef(target.name) * (omega * (lora_delta(target, a, b) - anchor).pow(2)).sum())
        else:
            for name, p in self._params.items():
                anchor = self.anchors[name].view(p.shape)
                omega = self.importance.get(name)
                sq = (p.float() - anchor).pow(2)
                terms.append(self._coef(name) * (sq if omega is None else omega.view(p.shape) * sq).sum())
        penalty = torch.stack(terms).sum()
        self._penalty = penalty.detach()
        return {"penalty": penalty}

    # -- logging and checkpoints ---------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        out = {"penalty": float(self._penalty)}
        if self.cfg.weighting != "none":
            out.update({f"layer_coef/{layer}": float(a) for layer, a in self.coefficients.items()})
        return out

    def state_dict(self) -> dict:
        return {
            "anchors": {k: v.cpu() for k, v in self.anchors.items()},
            "importance": {k: v.cpu() for k, v in self.importance.items()},
            "coefficients": {k: v.cpu() for k, v in self.coefficients.items()},
            "omega_divisor": self._omega_divisor,
        }

    def load_state_dict(self, state: dict) -> None:
        saved_divisor = float(state.get("omega_divisor", 1.0))
        if not math.isclose(saved_divisor, self._omega_divisor, rel_tol=1e-9):
            raise ValueError(
                f"{self.name}: the checkpoint's importance was divided by {saved_divisor:g}, this run's by "
                f"{self._omega_divisor:g}: resume with the importance_scale (and artifact) it was saved with"
            )
        for key in ("anchors", "importance", "coefficients"):
            mine, saved = getattr(self, key), state[key]
            if mine and set(mine) != set(saved):
                raise ValueError(f"{self.name}: saved {key} cover other tensors than this run's")
            for name, value in saved.items():
                if name in mine and mine[name].shape != value.shape:
                    raise ValueError(
                        f"{self.name}: saved {key} for {name} has shape {tuple(value.shape)}, expected "
                        f"{tuple(mine[name].shape)} (another number of processes?)"
                    )
            setattr(self, key, {k: v.float() for k, v in saved.items()})


# -- helpers ---------------------------------------------------------------------------------------


def _base_named_parameters(model, trainable_only: bool = True):
    return [(base_name(n), p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]


def _lora_values(target: LoraTarget, shards: ShardAccess) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies of the whole A and B (gathered read-only under ZeRO-3)."""
    if shards.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([target.lora_a, target.lora_b]):
            return target.lora_a.detach().float().clone(), target.lora_b.detach().float().clone()
    return target.lora_a.detach().float(), target.lora_b.detach().float()


def _weights_sum_sq(params: list[torch.nn.Parameter]) -> float:
    """sum of theta^2 over whole parameters, from local partitions (all-reduced) when ZeRO-3 partitioned them."""
    total, partitioned, device = torch.zeros((), dtype=torch.float64), False, None
    for p in params:
        if hasattr(p, "ds_tensor"):
            partitioned, device = True, p.ds_tensor.device
            local = zero3_unpadded(p, p.ds_tensor.reshape(-1))  # the last partition's padding is junk
        else:
            local = p.detach().reshape(-1)
        total += local.double().pow(2).sum().cpu()
    if partitioned:
        total = all_reduce_sum_(total.to(device))
    return float(total)
