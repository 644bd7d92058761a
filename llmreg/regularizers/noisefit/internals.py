"""Version-sensitive access to transformers / TRL internals, kept in one place (pinned by tests/test_noisefit.py).

- `calibration_batch`: the Trainer's private column filtering (`_remove_unused_columns`,
  `_get_collator_with_removed_columns`) and `_prepare_inputs`, so the SNR batch looks like a training batch.
- `decoder_layers`, `backbone`: where HF causal LMs keep their decoder layers and their body.
- `accepts_logits_to_keep`: whether the model's forward can skip the full-vocabulary logits.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch

from llmreg.core import ConfigError

# a ModuleList of decoder layers: Llama/Mistral/Qwen `layers.N`, GPT-2 `h.N`, MPT `blocks.N`
LAYER_MODULE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)$")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain HF model under DeepSpeed / DDP (`.module`) and PEFT (`get_base_model`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every decoder layer, in depth order."""
    found = [(name, m) for name, m in unwrap(model).named_modules() if LAYER_MODULE.search(name)]
    if not found:
        raise ConfigError("noisefit: the model has no decoder layers (no module named like 'layers.<i>')")
    parents = {name.rsplit(".", 1)[0] if "." in name else "" for name, _ in found}
    if len(parents) > 1:
        raise ConfigError(f"noisefit: decoder layers found in several containers {sorted(parents)}; "
                          "restrict them with `layers` (a regex on the layer module names)")
    return sorted(found, key=lambda item: int(LAYER_MODULE.search(item[0]).group(1)))


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The model body whose output is the final (normed) hidden state."""
    plain = unwrap(model)
    body = plain.get_decoder() if hasattr(plain, "get_decoder") else None
    if body is None:
        body = getattr(plain, getattr(plain, "base_model_prefix", "model"), None)
    if not isinstance(body, torch.nn.Module) or body is plain:
        raise ConfigError(f"noisefit: cannot find the body (decoder) of {type(plain).__name__}")
    return body


def final_hidden(output: Any) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(type(unwrap(model)).forward).parameters


def calibration_batch(trainer: Any, size: int, generator: torch.Generator) -> dict[str, Any]:
    """A seeded draw of `size` training rows, collated and moved to the device like a training batch."""
    import datasets

    dataset = trainer.train_dataset
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise ConfigError("noisefit: the SNR layer selection needs a sized, non-empty train_dataset")
    collator = trainer.data_collator
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="training")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="training")
    index = torch.randperm(len(dataset), generator=generator)[: min(size, len(dataset))].tolist()
    return trainer._prepare_inputs(collator([dataset[i] for i in index]))
