"""The `LpReg` regularizer: Lp-Reg's GRPO hooks (see the package docstring for the method and its options).

Hooks: `setup` (refuses what the proxy cannot handle), the GRPO protocol of `llmreg.integrations.trl`
(`on_rollout_hidden`, `on_generation_batch`), `loss_terms`, `metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from llmreg.core.options import ConfigError, check_fields_in_range
from llmreg.core.output_head import LogitTransform, logit_transform
from llmreg.core.registry import register
from llmreg.core.regularizer import Order, Regularizer, Requirements, option
from llmreg.integrations import trl as trl_internals
from llmreg.integrations.trl import GRPOHookRegularizer, RolloutHidden
from llmreg.regularizers.lp_reg.formulas import (
    DEFAULT_CHUNK_ROWS,
    ProxyStats,
    full_forward_kl,
    hidden_proxy_stats,
    lowp_threshold,
    lp_reg_penalty,
)


@dataclass
class LpRegOptions:
    minp_kappa: float = option(0.02, "min-p ratio kappa: the proxy keeps tokens with p >= kappa * p_max", gt=0, lt=1)
    rho: float = option(
        0.01, "share of the negative-advantage tokens, lowest probability first, that can be regularised", ge=0, le=1
    )
    beta: float = option(1.0, "penalty coefficient", ge=0, warn_above=1e6)
    estimator: Literal["k3", "full_kl"] = option(
        "k3",
        "k3: per-token estimate at the sampled token (the code); full_kl: KL(proxy || policy) over "
        "the vocabulary at the selected positions (package option, on-policy, not ZeRO-3)",
    )
    k3_clamp: float | None = option(10.0, "clamp of the k3 value (the code's 10); null: no clamp", gt=0)
    scope: Literal["global", "micro_batch"] = option(
        "global", "global: threshold over the whole generation batch (paper); micro_batch: the code's k-lowest rule"
    )
    threshold_type: Literal["minp", "fixed"] = option("minp", "minp: p >= kappa * p_max; fixed: p >= kappa")
    filter_before_temperature: bool = option(False, "filter the raw logits before dividing by T (the code)")
    minp_inclusive: bool = option(True, "keep p >= kappa * p_max (the code); False: p > kappa * p_max (the paper)")
    soft_fill: bool = option(False, "minp_soft: filtered logits set to the row minimum instead of removed")
    rho_pos: float = option(
        0.0, "also regularise this share of the lowest-probability positive-advantage tokens", ge=0, le=1
    )
    reverse_kl: bool = option(False, "k3 of KL(policy || proxy) instead (the paper's worse Fig. 10 ablation)")
    chunk_size: int = option(
        DEFAULT_CHUNK_ROWS, "rows of [rows x vocab] fp32 logits formed at a time in the proxy pass", ge=1
    )

    def __post_init__(self) -> None:
        check_fields_in_range(self)  # the declared ranges, also when the options are built directly


@register("lp_reg")
class LpReg(GRPOHookRegularizer, Regularizer):
    """Lp-Reg (arXiv 2510.03222): k3 pull of the lowest-probability negative-advantage tokens toward a min-p proxy.

    Example::

        RegGRPOTrainer(model=..., args=GRPOConfig(beta=0.0, loss_type="dapo"), reward_funcs=[...],
                       train_dataset=ds, regularizers=[{"name": "lp_reg", "rho": 0.01, "minp_kappa": 0.02}])
        # recipe: regularizers: [{name: lp_reg, rho: 0.01}]   (recipes/rlvr/lp_reg.yaml)
    """

    options_cls = LpRegOptions
    order = Order.OBJECTIVE
    requires = Requirements(trainers=("grpo",))
    needs_rollout_hidden = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # full_kl forms the policy's logits at the selected positions from its hidden states (with grad)
        self.needs_step_hidden = self.options.estimator == "full_kl"
        self._parts: list[tuple[int, ProxyStats]] = []
        self._transform = LogitTransform()  # the model's own logit scaling / softcapping, read in setup
        self._reset_metrics()

    def _reset_metrics(self) -> None:
        self._n_selected = 0.0
        self._n_valid = 0.0
        self._entropy_sum = 0.0
        self._thresholds: list[float] = []

    def setup(self, model: torch.nn.Module, trainer: Any) -> None:
        reason = trl_internals.check_plain_lm_head(model)
        if reason:
            raise ConfigError(f"lp_reg: {reason} (the proxy is formed as hidden @ lm_head.T)")
        self._transform = logit_transform(trl_internals.causal_lm(model).config)
        reason = trl_internals.unsupported_loss_type(trainer)
        if reason:
            raise ConfigError(f"lp_reg: {reason}")
        if self.options.estimator == "full_kl":
            from transformers.integrations import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                raise ConfigError("lp_reg: estimator 'full_kl' is not supported under ZeRO-3; use 'k3'")
            if trl_internals.old_logps_computed_by_trl(trainer):
                raise ConfigError(
                    "lp_reg: estimator 'full_kl' is on-policy only (steps_per_generation <= "
                    "gradient_accumulation_steps, num_iterations = 1, no vLLM); use 'k3'"
                )

    # -- once per generation batch ----------------------------------------------------------------------
    def _proxy_options(self) -> dict[str, Any]:
        o = self.options
        return dict(
            threshold_type=o.threshold_type,
            inclusive=o.minp_inclusive,
            filter_before_temperature=o.filter_before_temperature,
            soft_fill=o.soft_fill,
        )

    def on_rollout_hidden(self, chunk: RolloutHidden) -> None:
        stats = hidden_proxy_stats(
            chunk.hidden,
            chunk.weight,
            chunk.bias,
            chunk.targets,
            kappa=self.options.minp_kappa,
            temperature=chunk.temperature,
            chunk_size=self.options.chunk_size,
            transform=None if self._transform.is_identity else self._transform,
            **self._proxy_options(),
        )
        self._parts.append((chunk.rows.start, stats))

    def on_generation_batch(self, batch: dict[str, Any], trainer: Any) -> None:
        parts = [stats for _, stats in sorted(self._parts, key=lambda item: item[0])]
        self._parts = []
        n = batch["completion_ids"].size(0)
        if sum(p.logp.size(0) for p in parts) != n:
            raise RuntimeError(f"lp_reg: the proxy pass covered {sum(p.logp.size(0) for p in parts)} rows of {n}")
        old_logp, proxy, kept = (torch.cat([p[i] for p in parts]) for i in range(3))
        mask = trl_internals.response_mask(batch).bool()
        adv = batch["advantages"]
        adv = adv if adv.dim() == 2 else adv[:, None]
        batch["lp_reg_proxy_logp"] = proxy
        batch["lp_reg_kept"] = kept
        for key, rho, side in (
            ("lp_reg_threshold", self.options.rho, adv < 0),
            ("lp_reg_threshold_pos", self.options.rho_pos, adv > 0),
        ):
            thr = None
            if self.options.scope == "global" and rho > 0:
                thr = lowp_threshold(trl_internals.gather_values(trainer, old_logp[mask & side].float()), rho)
            value = -math.inf if thr is None else float(thr)
            batch[key] = torch.full((n,), value, dtype=torch.float32, device=old_logp.device)
            if key == "lp_reg_threshold" and thr is not None:
                self._thresholds.append(math.exp(value))

    # -- per micro-batch ---------------------------------------------------------------------------------
    def loss_terms(self, ctx: Any) -> dict[str, torch.Tensor]:
        inputs, extras = ctx.inputs, ctx.extras
        logp = extras["per_token_logps"]
        mask = trl_internals.response_mask(inputs)
        o = self.options
        thr = thr_pos = None
        if o.scope == "global":
            thr, thr_pos = inputs["lp_reg_threshold"][:1].squeeze(0), inputs["lp_reg_threshold_pos"][:1].squeeze(0)
        penalty, selected = lp_reg_penalty(
            logp,
            inputs["lp_reg_proxy_logp"],
            inputs["advantages"],
            mask,
            rho=o.rho,
            beta=o.beta,
            scope=o.scope,
            threshold=thr,
            kept=None if o.soft_fill else inputs["lp_reg_kept"],
            k3_clamp=o.k3_clamp,
            rho_pos=o.rho_pos,
            threshold_pos=thr_pos,
            reverse_kl=o.reverse_kl,
        )
        if o.estimator == "full_kl":
            penalty = self._full_kl(extras, selected, penalty)
        entropies = extras.get("entropies")
        valid = mask.bool()
        self._n_selected += float(selected.sum())
        self._n_valid += float(valid.sum())
        if entropies is not None:
            self._entropy_sum += float(entropies.detach()[valid].float().sum())
        return {"penalty": trl_internals.aggregate_like_loss(ctx.trainer, penalty, mask, inputs)}

    def _full_kl(self, extras: dict[str, Any], selected: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        hidden, lm_head = extras["hidden_states"], extras["lm_head"]
        full = torch.zeros_like(penalty)
        if bool(selected.any()):
            logits = self._transform(lm_head(hidden[selected]).float())
            kl = full_forward_kl(
                logits,
                kappa=self.options.minp_kappa,
                temperature=self._temperature(extras),
                beta=self.options.beta,
                inclusive=self.options.minp_inclusive,
            )
            full = full.masked_scatter(selected, kl.to(full.dtype))
        return full

    def _temperature(self, extras: dict[str, Any]) -> float:
        return float(extras.get("temperature", 1.0))

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._n_valid:
            out["selected_share"] = self._n_selected / self._n_valid
            out["entropy"] = self._entropy_sum / self._n_valid
        if self._thresholds:
            out["threshold_prob"] = sum(self._thresholds) / len(self._thresholds)
        self._reset_metrics()
        return out
