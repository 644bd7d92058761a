"""Phase 1 of the forgetting penalty: write the importance artifact of a trained (si) or given (ewc) model.

Python API (any trainer built by llmreg):

    recorder = SIImportance()                       # si: train with it in the stack
    trainer = RegSFTTrainer(..., regularizers=[recorder]); trainer.train()
    write_si_artifact(trainer, recorder, "runs/imp/importance", model="...", data="...")

    write_ewc_artifact(trainer, "runs/imp/importance", num_samples=5000)   # ewc: no training

`llmreg importance RECIPE` does the same from a recipe with an `importance:` section
(llmreg.recipe.importance.run_importance). The artifact records which model and data it came from, and where
the model at the end of phase 1 was saved (`final_model`), which is the model phase 2 must start from for si.
"""

from __future__ import annotations

from typing import Any

import llmreg.regularizers.forgetting.artifact as art
from llmreg.core.options import ConfigError
from llmreg.regularizers.forgetting.ewc import fisher_importance
from llmreg.regularizers.forgetting.si import SIImportance
from llmreg.regularizers.forgetting.targets import base_name, default_selector, full_shape


def write_si_artifact(trainer: Any, recorder: SIImportance, directory: str, **meta: Any) -> dict[str, Any]:
    """After `trainer.train()`: fold the recorder's path integral and write the artifact (every rank calls)."""
    if recorder.steps == 0:
        raise ValueError("si importance: the run made no optimizer step, so there is no path integral")
    info = {"architecture": art.architecture(trainer.model), **meta}
    return recorder.save_artifact(directory, info, is_main=trainer.is_world_process_zero())


def write_ewc_artifact(
    trainer: Any,
    directory: str,
    num_samples: int = 5000,
    targets: list[str] | None = None,
    exclude: list[str] | None = None,
    **meta: Any,
) -> dict[str, Any]:
    """The diagonal Fisher of `trainer.model` over `num_samples` single examples of its train dataset."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ConfigError(
            "ewc importance needs per-example gradients and runs without DeepSpeed; drop "
            "trainer.deepspeed for the importance run (the model must fit on one device)"
        )
    model = trainer.model
    selector = default_selector(targets or [], exclude or [])
    names = [n for n, p in model.named_parameters() if p.requires_grad and selector(base_name(n), full_shape(p))]
    if not names:
        raise ConfigError(f"ewc importance: no trainable weight matches targets {targets or 'default'}")
    trainer._train_batch_size = 1  # the Fisher needs per-example gradients: one example per batch
    loader = trainer.get_train_dataloader()
    fisher, count = fisher_importance(
        model, loader, num_samples, names, loss_fn=lambda m, batch: trainer.compute_loss(m, batch)
    )
    fisher = {base_name(n): f.cpu() for n, f in fisher.items()}
    sum_sq = {
        base_name(n): float(p.detach().double().pow(2).sum()) for n, p in model.named_parameters() if n in set(names)
    }
    info = {
        "method": "ewc",
        "architecture": art.architecture(model),
        "steps": 0,
        "examples": count,
        "options": {"num_samples": num_samples, "targets": targets or [], "exclude": exclude or []},
        "anchor_sum_sq": {"start": sum_sq, "end": sum_sq},  # no training: the anchor is the model as it is
        **art.importance_stats(fisher),
        **meta,
    }
    if trainer.is_world_process_zero():
        art.save_artifact(directory, fisher, info)
    return info
