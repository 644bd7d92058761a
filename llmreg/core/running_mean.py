"""`RunningMean`: named values averaged between two metric reads (what a regularizer logs once per logging step
although it computes a value every micro-batch)."""

from __future__ import annotations


class RunningMean:
    """Add named values, read their means since the last read, and start over."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
            self._counts[key] = self._counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        """The mean of each key since the last `pop` (empty when nothing was added); resets."""
        out = {key: total / self._counts[key] for key, total in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return out

    def __bool__(self) -> bool:
        return bool(self._sums)
