"""Version-sensitive access to transformers internals that regularizers need, pinned by tests (test_noisefit.py
for the calibration batch, test_lfu.py for the checkpoint-hook rule).

transformers itself is imported inside the functions: regularizer modules import this one, and `import llmreg`
(hence `llmreg list`) should not pay for transformers.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch

from llmreg.core.anatomy import unwrap
from llmreg.core.options import ConfigError


def calibration_batch(
    trainer: Any, size: int, generator: torch.Generator, purpose: str = "the layer calibration"
) -> dict[str, Any]:
    """A seeded draw of `size` training rows, collated and moved to the device like a training batch.

    Uses the Trainer's private column filtering (`_remove_unused_columns`, `_get_collator_with_removed_columns`)
    and `_prepare_inputs`, so the batch looks exactly like one the training loop would see."""
    import datasets

    dataset = trainer.train_dataset
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise ConfigError(f"{purpose} needs a sized, non-empty train_dataset")
    collator = trainer.data_collator
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="training")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="training")
    index = torch.randperm(len(dataset), generator=generator)[: min(size, len(dataset))].tolist()
    return trainer._prepare_inputs(collator([dataset[i] for i in index]))


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward can skip the full-vocabulary logits (`logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(type(unwrap(model)).forward).parameters


def hooks_outside_checkpoint(layer: torch.nn.Module) -> bool:
    """transformers 5 checkpoints a GradientCheckpointingLayer's `forward`, so hooks on the layer itself are not
    re-run by the recompute (hooks on modules inside it are)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover
        return False
    import transformers

    return isinstance(layer, GradientCheckpointingLayer) and int(transformers.__version__.split(".")[0]) >= 5


@contextlib.contextmanager
def zero3_init_off():
    """Build whole models on this process although a ZeRO-3 TrainingArguments exists: transformers builds every
    model inside `deepspeed.zero.Init` (collective calls) while its global DeepSpeed config says ZeRO-3, which
    hangs when one rank builds a model that the others wait for (the GGUF conversion, llmreg.recipe.gguf)."""
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
