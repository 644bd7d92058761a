"""What NoiseFiT takes from the host trainer and model: the settings it refuses before training, the model
inputs of a batch, that batch stacked three times (clean; noisy 1; noisy 2) for the one packed forward, and the
clean branch's router logits of a MoE model."""

from __future__ import annotations

from typing import Any

import torch

from llmreg.core.options import ConfigError


def check_trainer(trainer: Any) -> None:
    """What the replaced loss cannot honour, refused before training."""
    args = trainer.args
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ConfigError("noisefit replaces the training loss; it cannot be combined with compute_loss_func")
    if getattr(args, "label_smoothing_factor", 0.0):
        raise ConfigError("noisefit: label_smoothing_factor must be 0 (its CE is the plain token-mean NLL)")
    if getattr(args, "loss_type", "nll") != "nll":
        raise ConfigError(f"noisefit: loss_type={args.loss_type!r} is not supported; use 'nll'")
    if getattr(args, "padding_free", False):
        raise ConfigError(
            "noisefit stacks the batch three times along the batch dimension; padding_free is not supported"
        )


def model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch without what only the loss uses."""
    return {k: v for k, v in inputs.items() if k not in ("labels", "use_cache", "num_items_in_batch")}


def repeat3(value: Any, rows: int) -> Any:
    """A model input stacked three times along the batch (a [1, ...] input broadcasts and stays as it is)."""
    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == rows:
        return torch.cat([value, value, value], dim=0)
    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == 1 and rows > 1:
        return value  # broadcast along the batch (e.g. shared position_ids)
    raise ConfigError(
        f"noisefit: cannot stack model input of shape {tuple(getattr(value, 'shape', ()))} for {rows} rows"
    )


def clean_router_logits(router_logits: Any, tokens: int) -> tuple[torch.Tensor, ...]:
    """The clean branch's rows of every MoE layer's router logits [rows * T, experts]: the first `tokens` =
    rows * T (the branches are stacked along the batch, clean first; a shared-prefix layer ran on the clean rows
    only)."""
    if not router_logits:
        raise RuntimeError("noisefit: the MoE model's decoder body returned no router logits for its router loss")
    for layer in router_logits:
        if layer.shape[0] not in (tokens, 3 * tokens):
            raise RuntimeError(
                f"noisefit: router logits of {layer.shape[0]} rows, expected {tokens} (clean) or 3 x {tokens}"
            )
    return tuple(layer[:tokens] for layer in router_logits)
