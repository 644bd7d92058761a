"""Which tensors the forgetting penalty covers, and which decoder layer each belongs to.

Full fine-tuning regularises parameters; LoRA regularises the dense product dW = s * B @ A of each
adapted module, never A or B alone. Both are keyed by the name of the *base* weight
(`model.layers.0.self_attn.q_proj.weight`), so an importance artifact recorded on the plain model
applies to a PEFT-wrapped one too, whatever names PEFT gives its adapter tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

# re-exported for the forgetting modules: where a tensor sits in the model is llmreg.core.anatomy's question
from llmreg.core.anatomy import LAYER_PATTERN, OUTSIDE_LAYERS, base_name, full_shape
from llmreg.core.anatomy import layer_key as layer_of  # the decoder-layer index as a string key, or "other"

DECODER_LAYERS = [LAYER_PATTERN.pattern]


@dataclass(frozen=True)
class Selector:
    """include: regexes of which at least one must match (None: every tensor); exclude: none may match."""

    include: tuple[str, ...] | None
    exclude: tuple[str, ...] = ()
    min_ndim: int = 0

    def __call__(self, name: str, shape: Iterable[int]) -> bool:
        if len(tuple(shape)) < self.min_ndim:
            return False
        if self.include is not None and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)


def default_selector(targets: list[str], exclude: list[str]) -> Selector:
    """The user's `targets` as given, or the paper's default: the 2-D weights inside the decoder layers."""
    if targets:
        return Selector(include=tuple(targets), exclude=tuple(exclude))
    return Selector(include=tuple(DECODER_LAYERS), exclude=tuple(exclude), min_ndim=2)


def select_parameters(named_params: Iterable[tuple[str, torch.nn.Parameter]], selector: Selector) -> list[str]:
    """Names (base names) of the trainable parameters the selector takes, in model order."""
    return [base_name(n) for n, p in named_params if p.requires_grad and selector(base_name(n), full_shape(p))]


@dataclass
class LoraTarget:
    """One LoRA-adapted module: the penalty covers dW = scale * B @ A."""

    name: str  # base weight name, e.g. model.layers.0.self_attn.q_proj.weight
    lora_a: torch.nn.Parameter  # r x in
    lora_b: torch.nn.Parameter  # out x r
    scale: float


def lora_targets(model: torch.nn.Module, selector: Selector) -> list[LoraTarget]:
    """The active adapter's (A, B, scale) of every LoRA layer whose base weight the selector takes."""
    from peft.tuners.lora import LoraLayer

    found = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in _active_adapters(module) if a in module.lora_A]
        if len(adapters) != 1:
            raise ValueError(
                f"{module_name}: the forgetting penalty needs exactly one active LoRA adapter, found {adapters}"
            )
        adapter = adapters[0]
        name = base_name(module_name + ".weight")
        weight = module.get_base_layer().weight
        if not selector(name, full_shape(weight)):
            continue
        found.append(
            LoraTarget(
                name=name,
                lora_a=module.lora_A[adapter].weight,
                lora_b=module.lora_B[adapter].weight,
                scale=float(module.scaling[adapter]),
            )
        )
    return found


def _active_adapters(module: Any) -> list[str]:
    active = module.active_adapter
    return [active] if isinstance(active, str) else list(active)


__all__ = [
    "DECODER_LAYERS",
    "LAYER_PATTERN",
    "OUTSIDE_LAYERS",
    "LoraTarget",
    "Selector",
    "base_name",
    "default_selector",
    "full_shape",
    "layer_of",
    "lora_targets",
    "select_parameters",
]
