"""Continual-learning summary metrics from a stage-by-task score matrix.

R[i][j] is the score on task j after training stage i (n stages, n tasks, stage i trains task i).
Definitions follow Lopez-Paz & Ranzato (GEM, 2017):

    op  = mean_j R[n-1][j]                          (overall performance after the last stage)
    bwt = mean_{j<n-1} (R[n-1][j] - R[j][j])        (backward transfer; negative = forgetting)
    fwt = mean_{j>0} (R[j-1][j] - baseline[j])      (forward transfer; needs the untrained scores)

Scores are taken as higher-is-better; pass negated perplexities if that is what you measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmreg.core.options import ConfigError


def _as_matrix(R: Any) -> list[list[float]]:
    """A square list of float rows; `R` may be nested lists or a 2-D array (anything with len and rows)."""
    try:
        rows = [[float(x) for x in row] for row in R]
    except TypeError:
        raise ConfigError(f"continual_metrics: R must be a square matrix (list of rows), got {R!r}") from None
    n = len(rows)
    if n == 0:
        raise ConfigError("continual_metrics: R is empty; need at least one stage")
    for i, row in enumerate(rows):
        if len(row) != n:
            raise ConfigError(f"continual_metrics: R must be square ({n} x {n}); row {i} has {len(row)} scores")
    return rows


def continual_metrics(R: Any, baseline: Sequence[float] | None = None) -> dict[str, float | None]:
    """{op, bwt, fwt} for score matrix `R`; `fwt` is None without `baseline` (one score per task).

    With one stage there is nothing to transfer to or from: bwt and fwt are None."""
    rows = _as_matrix(R)
    n = len(rows)
    last = rows[-1]
    op = sum(last) / n
    bwt = sum(last[j] - rows[j][j] for j in range(n - 1)) / (n - 1) if n > 1 else None
    fwt = None
    if baseline is not None:
        base = [float(b) for b in baseline]
        if len(base) != n:
            raise ConfigError(f"continual_metrics: baseline has {len(base)} scores; R has {n} tasks")
        fwt = sum(rows[j - 1][j] - base[j] for j in range(1, n)) / (n - 1) if n > 1 else None
    return {"op": op, "bwt": bwt, "fwt": fwt}
