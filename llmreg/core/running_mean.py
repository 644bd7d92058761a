"""`RunningMean`: named values averaged between two metric reads (what a regularizer logs once per logging step
although it computes a value every micro-batch)."""

from __future__ import annotations

from typing import Any

import torch


class RunningMean:
    """Add named values, read their means since the last read, and start over.

    Tensors are summed where they live (detached), so adding a GPU value costs no device-to-host sync; the sync
    happens once, in `pop`, when the metrics are logged."""

    def __init__(self) -> None:
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, int] = {}

    def add(self, **values: Any) -> None:
        for key, value in values.items():
            value = value.detach() if torch.is_tensor(value) else float(value)
            self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._counts[key] = self._counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        """The mean of each key since the last `pop` (empty when nothing was added); resets."""
        out = {key: float(total) / self._counts[key] for key, total in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return out

    def __bool__(self) -> bool:
        return bool(self._sums)
