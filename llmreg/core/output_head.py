"""The model's own transform of its logits after the LM head, for code that forms logits from hidden states.

TRL's fused LM head gives no logits (docs/architecture.md, trap 6), so NoiseFiT, Lp-Reg and KL-to-base form
them as `lm_head(hidden)` themselves. Several families transform that product before anything reads it; the
model's `forward` does it, a bare `lm_head` call does not. `logit_transform(config)` reads the transform from the
config (what each family's `forward` does in transformers 5.24):

    logits = lm_head(h) * scale                     then, with a softcap c:   c * tanh(logits / c)

- scale: `logit_scale` (Cohere, Cohere 2, Cohere 2 MoE), `output_multiplier` (Muse Glimmer / Spark, applied
  before their softcap), `lm_head_multiplier` (Falcon-H1), `1 / logits_scaling` (Granite, GraniteMoE and their
  variants; MiniCPM3 divides the hidden states before a bias-free head, the same product), `logits_scaling`
  itself for HyperCLOVA X (which multiplies);
- softcap: `final_logit_softcapping` (Gemma 2 / 3 / 3n / 4, VaultGemma, NanoChat, Mistral Large 4, Muse, ...),
  `logits_soft_cap` (RecurrentGemma).

The first scale key present wins, in the order above (as TRL's fused head reads them, so the two agree). The
explicit table is only where the config cannot say it: HyperCLOVA X's opposite reading of `logits_scaling`,
and MPT, whose config has a `logit_scale` that transformers' MPT model never applies (llmreg follows the model
there; TRL's fused head multiplies by a numeric MPT `logit_scale`, so the two disagree on such a config).
OLMo / OLMo 2, Llama, Qwen, Phi-3, GPT-2, GPT-NeoX and Falcon apply nothing after the head.

The transform runs on fp32 logits here (callers cast first); Gemma 2 applies it in the head's dtype, so under
bf16 the two differ by rounding only. torch and the standard library only: the config is read by attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SCALE_KEYS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap")
# model types whose forward multiplies by `logits_scaling` (the others divide by it)
MULTIPLY_BY_LOGITS_SCALING = frozenset({"hyperclovax"})
# (model type, key): config fields the model's forward does not apply
IGNORED = frozenset({("mpt", "logit_scale")})


@dataclass(frozen=True)
class LogitTransform:
    """`softcap * tanh(scale * z / softcap)` (no tanh when `softcap` is None); the identity by default."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def describe(self) -> str:
        parts = ([f"x {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"softcap {self.softcap:g}"] if self.softcap is not None else []
        )
        return ", ".join(parts) or "none"


def text_config(config: Any) -> Any:
    """The language model's config (a multimodal config's text part; the config itself otherwise)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(config: Any) -> LogitTransform:
    """The transform the model of `config` applies to `lm_head(hidden)` in its forward (see the module docstring)."""
    text = text_config(config)
    if text is None:
        return LogitTransform()
    model_type = getattr(text, "model_type", "")
    scale = 1.0
    for key in SCALE_KEYS:
        value = getattr(text, key, None)
        if value is None or (model_type, key) in IGNORED:
            continue
        value = float(value)
        if key == "logits_scaling" and model_type not in MULTIPLY_BY_LOGITS_SCALING:
            value = 1.0 / value
        scale = value
        break
    softcap = next((float(v) for k in SOFTCAP_KEYS if (v := getattr(text, k, None)) is not None), None)
    return LogitTransform(scale=scale, softcap=softcap)


class TransformedHead:
    """`transform(head(hidden).float())`: the model's logits from final hidden states, in fp32."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], transform: LogitTransform) -> None:
        self.head = head
        self.transform = transform

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.head(hidden).float())


def with_transform(head: Callable[[torch.Tensor], torch.Tensor], transform: LogitTransform) -> Callable:
    """`head` itself when the transform is the identity (callers cast to fp32 themselves), else a
    `TransformedHead` that returns the model's fp32 logits."""
    return head if transform.is_identity else TransformedHead(head, transform)
