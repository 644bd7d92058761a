"""Which tensors the forgetting penalty covers, and which decoder layer each belongs to.

Full fine-tuning regularises parameters; LoRA regularises the dense product dW = s * B @ A of each
adapted module, never A or B alone. Both are keyed by the name of the *base* weight
(`model.layers.0.self_attn.q_proj.weight`), so an importance artifact recorded on the plain model
applies to a PEFT-wrapped one too, whatever names PEFT gives its adapter tensors.

dW is formed in the base tensor's own layout (`lora_delta`), as PEFT adds it to that tensor: [out, in] for
nn.Linear and routers, [in, out] for GPT-2's Conv1D (PEFT's fan_in_fan_out), [experts, out, in] (or
[experts, in, out]) for the 3-D expert tensors PEFT wraps with `ParamWrapper` (Mixtral, Qwen3-MoE), so Omega
and the anchor line up element for element with the weight an artifact was recorded on.
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
    """One LoRA-adapted tensor: the penalty covers dW = scale * B @ A, laid out like the base tensor."""

    name: str  # base tensor name, e.g. model.layers.0.self_attn.q_proj.weight, model.layers.0.mlp.experts.down_proj
    lora_a: torch.nn.Parameter  # (r * experts) x in
    lora_b: torch.nn.Parameter  # out x (r * experts)
    scale: float
    layout: str = "out_in"  # out_in | in_out (Conv1D) | experts_out_in | experts_in_out
    num_experts: int = 1
    shape: tuple[int, ...] = ()  # the base tensor's full shape


def lora_delta(target: LoraTarget, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """scale * B @ A in the base tensor's layout: PEFT's `get_delta_weight` for these A, B (pinned by a test)."""
    if target.layout == "out_in":
        return target.scale * (b @ a)
    if target.layout == "in_out":
        return target.scale * (b @ a).T
    experts = target.num_experts
    a3 = a.reshape(experts, -1, a.shape[-1])  # experts x r x in
    b3 = b.reshape(b.shape[0], -1, experts)  # out x r x experts
    pattern = "ore,eri->eoi" if target.layout == "experts_out_in" else "ore,eri->eio"
    return target.scale * torch.einsum(pattern, b3, a3)


def lora_targets(model: torch.nn.Module, selector: Selector) -> list[LoraTarget]:
    """The active adapter's (A, B, scale) of every LoRA layer whose base tensor the selector takes: linear
    layers, Conv1D, and the tensors PEFT wraps with `ParamWrapper` (MoE expert stacks and routers)."""
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
        name, layout, tensor = adapted_tensor(module_name, module)
        if not selector(name, full_shape(tensor)):
            continue
        found.append(
            LoraTarget(
                name=name,
                lora_a=module.lora_A[adapter].weight,
                lora_b=module.lora_B[adapter].weight,
                scale=float(module.scaling[adapter]),
                layout=layout,
                num_experts=int(getattr(module, "num_experts", 1) or 1),
                shape=tuple(full_shape(tensor)),
            )
        )
    return found


def adapted_tensor(module_name: str, module: Any) -> tuple[str, str, torch.Tensor]:
    """(base name, layout, tensor) of what a LoRA layer adapts, with PEFT's own flags deciding the layout."""
    parameter = getattr(module, "parameter_name", None)
    if parameter is not None:  # ParamWrapper: one (possibly 3-D) parameter of the base module
        tensor = module.get_param()
        if len(full_shape(tensor)) == 3:
            transposed = getattr(module.get_base_layer(), "is_transposed", False)
            layout = "experts_in_out" if transposed else "experts_out_in"
        else:
            layout = "out_in"
        return base_name(f"{module_name}.{parameter}"), layout, tensor
    layout = "in_out" if getattr(module, "fan_in_fan_out", False) else "out_in"
    return base_name(module_name + ".weight"), layout, module.get_base_layer().weight


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
    "adapted_tensor",
    "lora_delta",
    "lora_targets",
    "select_parameters",
]
