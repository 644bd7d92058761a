"""Crash-safe checkpoints: a checkpoint counts only once every piece of it is written.

The Trainer writes a checkpoint in several files (model, optimizer, scheduler, RNG, trainer state; llmreg adds
`llmreg_regularizers/rank<k>.pt` per rank), so a run killed while saving leaves a directory that looks like a
checkpoint but is not one (a truncated model.safetensors, a missing rank file). The mixin writes
COMPLETE_MARKER last, after every rank has written its pieces (a barrier), by a rename so the marker itself is
never half-written; `--resume` (llmreg.recipe.run.resume_checkpoint) takes the newest checkpoint that has it.
"""

from __future__ import annotations

import json
import os

import llmreg.core.dist as dist

COMPLETE_MARKER = "llmreg_complete.json"


def mark_complete(checkpoint_dir: str, step: int, is_writer: bool) -> None:
    """Wait for every rank's pieces, then (on the writing process) write the marker by an atomic rename."""
    if dist.is_distributed():
        import torch.distributed as torch_dist

        torch_dist.barrier()
    if not is_writer:
        return
    tmp = os.path.join(checkpoint_dir, f".{COMPLETE_MARKER}.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "world_size": dist.world_size()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(checkpoint_dir, COMPLETE_MARKER))


def is_complete(checkpoint_dir: str) -> bool:
    """The checkpoint's marker exists (written only after all of the checkpoint, see module docstring)."""
    return os.path.isfile(os.path.join(checkpoint_dir, COMPLETE_MARKER))
