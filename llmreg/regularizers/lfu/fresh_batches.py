"""LfU's `ascent_batch: fresh`: the ascent gradient from an independent random batch of the training set (the
official code's choice), drawn from a stream that a resumed run continues exactly."""

from __future__ import annotations

import math
from typing import Any

import torch

import llmreg.core.dist as dist
from llmreg.core.options import ConfigError


class FreshBatches:
    """This rank's stream of ascent batches: epoch e of the stream is a permutation of the training set drawn
    from (seed, rank, e), so the number of batches drawn (`drawn`, checkpointed) is all a resume needs."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.drawn = 0  # batches drawn so far on this rank
        self._data = None  # the train dataset, columns filtered like the trainer's

    def next(self, trainer: Any) -> dict[str, Any]:
        """Batch number `drawn` of the stream, collated (not yet moved to the device)."""
        if self._data is None:
            dataset = trainer.train_dataset
            if getattr(trainer.args, "remove_unused_columns", False) and hasattr(dataset, "column_names"):
                dataset = trainer._remove_unused_columns(dataset, description="lfu fresh batches")
            if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
                raise ConfigError("lfu: ascent_batch 'fresh' needs a sized, non-empty train_dataset")
            self._data = dataset
        dataset, size = self._data, trainer.args.per_device_train_batch_size
        per_epoch = math.ceil(len(dataset) / size)
        epoch, index = divmod(self.drawn, per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + dist.rank() * 1009 + epoch + 1)
        order = torch.randperm(len(dataset), generator=gen)[index * size : (index + 1) * size].tolist()
        self.drawn += 1
        return trainer.data_collator([dataset[i] for i in order])
