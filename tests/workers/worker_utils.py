"""Shared by the two-process test workers (imported from their own folder, which is on sys.path)."""

from __future__ import annotations

import torch


def gathered_weights(model: torch.nn.Module, zero: int) -> dict[str, torch.Tensor]:
    """Full copies of every parameter; under ZeRO-3 the partitions are gathered first (collective: all ranks call)."""
    if zero == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}
