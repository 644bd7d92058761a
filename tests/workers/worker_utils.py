"""Shared by the two-process test workers (imported from their own folder, which is on sys.path)."""

from __future__ import annotations

import os
import sys

import torch


def gathered_weights(model: torch.nn.Module, zero: int) -> dict[str, torch.Tensor]:
    """Full copies of every parameter; under ZeRO-3 the partitions are gathered first (collective: all ranks call)."""
    if zero == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def leave(world: int) -> None:
    """Meet the other ranks, then exit without the interpreter's teardown, where DeepSpeed's CPU shared-memory
    comm threads now and then abort a rank ("terminate called without an active exception", exit -6) after a
    run that finished correctly. Call after the results are written."""
    if world > 1:  # leave together: a rank exiting while another still writes can abort the gloo/shm teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
