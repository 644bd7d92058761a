"""Scaling-law fits of arXiv 2509.14786 (plotting.py): L(x) = A / x^alpha + E with A, alpha, E >= 0.

Used for L(N) across model sizes (ParamLaw), L(K) across ensemble sizes (EnsembleLaw) and L(D) across token
budgets (DataLaw). The asymptote E is the point: the loss the recipe approaches as x grows.

Method (departure: the paper calls scipy.optimize.curve_fit with bounds; this keeps the package free of
scipy and gives the global least-squares optimum over the bounds): for a fixed alpha the model is linear
in (A, E), so the best non-negative (A, E) has a closed form (unconstrained least squares, else the best of
the two one-parameter fits on the boundary); alpha is found by a log-spaced scan followed by golden-section
refinement of the scan's best bracket. Residuals are in loss units, unweighted, as curve_fit's default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class PowerLaw:
    A: float
    alpha: float
    E: float
    rss: float  # residual sum of squares

    def __call__(self, x) -> np.ndarray:
        return self.A / np.power(np.asarray(x, dtype=float), self.alpha) + self.E

    def inverse(self, loss: float) -> float:
        """x at which the law reaches `loss` (DataLaw's back_out_data); inf at or below the asymptote."""
        if loss <= self.E or self.A == 0:
            return math.inf
        return (self.A / (loss - self.E)) ** (1.0 / self.alpha)

    def as_dict(self) -> dict:
        return {"A": self.A, "alpha": self.alpha, "E": self.E, "rss": self.rss}


def _nonneg_linear(u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """min ||A*u + E - y||^2 over A, E >= 0 -> (A, E, rss)."""
    candidates = []
    m = np.stack([u, np.ones_like(u)], axis=1)
    (a, e), *_ = np.linalg.lstsq(m, y, rcond=None)
    if a >= 0 and e >= 0:
        candidates.append((float(a), float(e)))
    uu = float(u @ u)
    candidates.append((max(0.0, float(u @ y) / uu) if uu > 0 else 0.0, 0.0))  # E = 0
    candidates.append((0.0, max(0.0, float(y.mean()))))  # A = 0
    best = min(candidates, key=lambda c: float(((c[0] * u + c[1] - y) ** 2).sum()))
    return best[0], best[1], float(((best[0] * u + best[1] - y) ** 2).sum())


def fit_power_law(
    x: Sequence[float], y: Sequence[float], alpha_range: tuple[float, float] = (1e-3, 5.0), scan: int = 400
) -> PowerLaw:
    """Least-squares L(x) = A / x^alpha + E with A, alpha, E >= 0 (at least 3 points)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("fit_power_law: x and y must be 1-D of the same length")
    if len(x) < 3:
        raise ValueError(f"fit_power_law: 3 parameters need at least 3 points, got {len(x)}")
    if (x <= 0).any() or not np.isfinite(y).all():
        raise ValueError("fit_power_law: x must be > 0 and y finite")
    scale = x.min()  # fit on x / min(x) for conditioning; A is mapped back below

    def rss(alpha: float) -> float:
        return _nonneg_linear((x / scale) ** -alpha, y)[2]

    grid = np.geomspace(alpha_range[0], alpha_range[1], scan)
    values = [rss(a) for a in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    c, d = hi - golden * (hi - lo), lo + golden * (hi - lo)
    for _ in range(80):
        if rss(c) < rss(d):
            hi = d
        else:
            lo = c
        c, d = hi - golden * (hi - lo), lo + golden * (hi - lo)
    alpha = min((lo + hi) / 2, grid[i], key=rss)
    a, e, r = _nonneg_linear((x / scale) ** -alpha, y)
    return PowerLaw(A=a * scale**alpha, alpha=float(alpha), E=e, rss=r)


def data_efficiency(baseline_data_law: PowerLaw, recipe_loss: float, budget: float) -> float:
    """How many times more data the baseline recipe needs to reach `recipe_loss` than `budget` (the paper's
    data efficiency of a recipe at budget D0: D_baseline(loss) / D0, with D_baseline the baseline's data law
    L(D) = A / D^gamma + E inverted; inf when the loss is at or below the baseline's asymptote)."""
    return baseline_data_law.inverse(recipe_loss) / budget


def joint_asymptote(ensemble_losses: dict[float, tuple[Sequence[float], Sequence[float]]]) -> dict:
    """The paper's joint fit: L(K) = A / K^beta + E_N for each model size N ({N: (K values, losses)}), then
    E_N = A' / N^alpha' + E*; returns the per-size laws, the law of E_N and the joint asymptote E*."""
    per_size = {n: fit_power_law(k, loss) for n, (k, loss) in ensemble_losses.items()}
    sizes = sorted(per_size)
    law = fit_power_law(sizes, [per_size[n].E for n in sizes])
    return {"per_size": {n: per_size[n].as_dict() for n in sizes}, "size_law": law.as_dict(), "E_star": law.E}
