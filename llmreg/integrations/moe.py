"""The MoE router load-balancing loss as the host trainer adds it, for regularizers that replace the host's loss
(NoiseFiT). Version-sensitive transformers internals, pinned by tests/test_moe_router_loss.py:

- a MoE causal LM (Mixtral, Qwen3-MoE, ...) has `output_router_logits` in its (text) config; its forward computes
  `aux_loss = load_balancing_loss_func(outputs.router_logits, num_experts, num_experts_per_tok, attention_mask)`
  and, with labels, adds `router_aux_loss_coef * aux_loss` to its loss;
- the decoder body records the router logits (one [rows * T, experts] tensor per MoE layer) when it is called
  with `output_router_logits=True`, whatever the top model was called with; the top model computes the aux loss
  only when its own `output_router_logits` is true.

Which host adds what (the replaced loss must add the same):
- transformers' Trainer: the model's own loss, so `router_aux_loss_coef * aux` when the config's
  `output_router_logits` is true (off by default), per micro-batch, not divided over an accumulation window;
- TRL's SFTTrainer: `router_aux_loss_coef * aux / steps` (averaged over the accumulation window) when its
  `aux_loss_enabled` (on for MoE models unless `router_aux_loss_coef=0`); read by `integrations.trl.sft_router_aux`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmreg.core.anatomy import unwrap
from llmreg.core.output_head import text_config


def is_moe(model: torch.nn.Module) -> bool:
    """Whether the model can return router logits (a MoE causal LM of transformers)."""
    return hasattr(text_config(getattr(unwrap(model), "config", None)), "output_router_logits")


@dataclass
class RouterAux:
    """`coef * loss_fn(router_logits, num_experts, top_k, attention_mask)`, weighted like the host does."""

    coef: float
    per_window: bool  # divided by the accumulation steps like a per-micro-batch mean (TRL SFT), or not (Trainer)
    num_experts: int
    top_k: int
    loss_fn: Callable

    def loss(self, router_logits: tuple[torch.Tensor, ...], attention_mask: Any) -> torch.Tensor:
        return self.loss_fn(tuple(router_logits), self.num_experts, self.top_k, attention_mask)

    def weight(self, ga_divisor: int) -> float:
        return self.coef / ga_divisor if self.per_window else self.coef

    @staticmethod
    def record_router_logits(module: torch.nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook (with kwargs) for the decoder body: record the router logits in its output."""
        return args, {**kwargs, "output_router_logits": True}


def _load_balancing_loss(plain: torch.nn.Module) -> Callable:
    """The family's own `load_balancing_loss_func` (Mixtral's, which every MoE family copies, when absent)."""
    fn = getattr(sys.modules.get(type(plain).__module__), "load_balancing_loss_func", None)
    if fn is None:
        fn = importlib.import_module("transformers.models.mixtral.modeling_mixtral").load_balancing_loss_func
    return fn


def router_aux(model: torch.nn.Module, trainer: Any) -> RouterAux | None:
    """The router auxiliary term the host's loss includes for this model, or None (dense model, or off)."""
    from llmreg.integrations.trl import sft_router_aux

    plain = unwrap(model)
    text = text_config(plain.config)
    if not hasattr(text, "output_router_logits"):
        return None
    sft = sft_router_aux(trainer)
    if sft is not None:
        enabled, coef, per_window = *sft, True
    else:
        coef = getattr(plain, "router_aux_loss_coef", getattr(text, "router_aux_loss_coef", 0.0))
        enabled, per_window = bool(text.output_router_logits), False
    if not enabled or not coef:
        return None
    num_experts = getattr(plain, "num_experts", None) or getattr(text, "num_experts", None)
    top_k = getattr(plain, "num_experts_per_tok", None) or getattr(text, "num_experts_per_tok", None)
    if not num_experts or not top_k:
        raise RuntimeError(f"{type(plain).__name__}: cannot read num_experts / num_experts_per_tok for the router loss")
    return RouterAux(float(coef), per_window, int(num_experts), int(top_k), _load_balancing_loss(plain))
