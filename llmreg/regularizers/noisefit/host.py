"""What NoiseFiT takes from the host trainer and model: the settings it refuses before training, the model
inputs of a batch, and that batch stacked three times (clean; noisy 1; noisy 2) for the one packed forward."""

from __future__ import annotations

from typing import Any

import torch

from llmreg.core.anatomy import unwrap
from llmreg.core.options import ConfigError

# model config fields that transform the logits after the LM head (the chunked head does not reproduce them)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


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


def check_plain_logits(model: torch.nn.Module) -> None:
    """Refuse models whose logits are scaled or soft-capped after the LM head (Gemma 2, Cohere)."""
    config = getattr(unwrap(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scaled = [k for k in LOGIT_TRANSFORMS if getattr(text, k, None) not in (None, 1, 1.0)]
    if scaled:
        raise ConfigError(
            f"noisefit: {type(unwrap(model)).__name__} transforms its logits after the LM "
            f"head ({', '.join(scaled)}); the chunked LM head does not reproduce that"
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
