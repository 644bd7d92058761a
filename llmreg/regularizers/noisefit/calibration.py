"""v2 ("Auto NoiseFiT") calibration: layers and per-layer noise scales from the KL response (pure functions).

For every candidate layer l and scale s_j = f_j / sqrt(d) (f in {0.25, 0.5, 1, 1.5, 2}), one no-grad forward with
noise of base s_j on layer l only gives the mean symmetric KL between clean and noisy next-token distributions on
the loss positions and the CE increase max(CE_noisy - CE_clean, 0). Over the calibration batches (sums
all-reduced over ranks):

    ratio[l, j] = mean dCE / |mean clean CE|
    score[l, j] = KL[l, j] / (1 + ratio[l, j]) / (1 + prior * log2(f_j)^2),   -inf where ratio > max_ce_ratio
                  (a layer whose every scale is rejected keeps its unfiltered scores)
    best[l]     = max_j score[l, j]
    candidates  = {l : best[l] >= median(best) + MAD(best), best[l] > 0}  (lower medians, MAD >= 1e-12)
    selected    = at most ceil(sqrt(L)) candidates: the best of each of `bands` depth bands (quota
                  ceil(max / bands) each), filled up globally by score; the single best layer if none passes
    target      = target_frac * median over the selected of KL at their best valid scale
    scale[l]    = the smallest valid scale with KL >= target; else the valid scale closest to it in log KL;
                  else the best one
"""

from __future__ import annotations

import math

import torch


def symmetric_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """0.5 * (KL(P || Q) + KL(Q || P)) per row."""
    return 0.5 * ((log_p.exp() * (log_p - log_q)).sum(-1) + (log_q.exp() * (log_q - log_p)).sum(-1))


def _lower_median(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x.flatten()).values[(x.numel() - 1) // 2]


def score_grid(
    kl: torch.Tensor, ce_delta: torch.Tensor, clean_ce: float, factors: list[float], max_ce_ratio: float, prior: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score [L, S] with rejected scales at -inf, valid [L, S])."""
    ratio = ce_delta / max(abs(clean_ce), 1e-8)
    penalty = 1.0 + prior * torch.log2(torch.tensor(factors, dtype=torch.float64)).abs() ** 2
    raw = kl.double() / (1.0 + ratio.double()) / penalty
    valid = ratio <= max_ce_ratio
    score = torch.where(valid, raw, torch.full_like(raw, -math.inf))
    none_valid = ~valid.any(dim=1)
    score[none_valid] = raw[none_valid]
    return score, valid


def select_by_depth(best: torch.Tensor, candidates: list[int], max_layers: int, bands: int) -> list[int]:
    if not candidates:
        return [int(torch.argmax(best))]
    ranked = sorted(candidates, key=lambda i: -float(best[i]))
    if bands <= 1 or max_layers <= 1:
        return sorted(ranked[:max_layers])
    num_layers = best.numel()
    bands = min(bands, num_layers)
    quota = math.ceil(max_layers / bands)
    picked: list[int] = []
    for band in range(bands):
        lo, hi = math.floor(band * num_layers / bands), math.floor((band + 1) * num_layers / bands)
        picked += [i for i in ranked if lo <= i < hi][:quota]
    picked += [i for i in ranked if i not in picked]
    return sorted(picked[:max_layers])


def v2_policy(
    kl: torch.Tensor,
    ce_delta: torch.Tensor,
    clean_ce: float,
    factors: list[float],
    hidden_size: int,
    layers: list[int],
    max_ce_ratio: float = 0.02,
    prior: float = 0.05,
    target_frac: float = 0.75,
    bands: int = 3,
    num_layers: int | None = None,
) -> dict:
    """The layers and scales from the mean KL and dCE grids [len(layers), S] of the candidate `layers` (positions
    among all `num_layers` decoder layers, which sets the cap ceil(sqrt(L)) and the depth bands)."""
    num_layers = num_layers or len(layers)
    scales = [f / math.sqrt(hidden_size) for f in factors]
    score, valid = score_grid(kl, ce_delta, clean_ce, factors, max_ce_ratio, prior)
    best_local, best_pos = score.max(dim=1)
    best = torch.full((num_layers,), -math.inf, dtype=torch.float64)
    best[layers] = best_local
    med = _lower_median(best_local)
    mad = _lower_median((best_local - med).abs()).clamp_min(1e-12)
    candidates = [layers[r] for r in range(len(layers)) if best_local[r] >= med + mad and best_local[r] > 0]
    selected = select_by_depth(best, candidates, max(1, math.ceil(math.sqrt(num_layers))), bands)
    row = {layer: r for r, layer in enumerate(layers)}
    finite = torch.isfinite(score)
    best_valid_kl = kl[torch.arange(len(layers)), torch.argmax(torch.where(finite, score, -math.inf), dim=1)]
    target = max(float(_lower_median(best_valid_kl[[row[i] for i in selected]])) * target_frac, 1e-12)
    chosen = {}
    for layer in selected:
        r = row[layer]
        usable = valid[r] & finite[r]
        reach = torch.nonzero(usable & (kl[r] >= target)).flatten()
        if reach.numel():
            pos = int(reach[0])
        elif usable.any():
            options = torch.nonzero(usable).flatten()
            gap = (torch.log(kl[r, options].double().clamp_min(1e-12)) - math.log(target)).abs()
            pos = int(options[torch.argmin(gap)])
        else:
            pos = int(best_pos[r])
        chosen[layer] = scales[pos]
    return {
        "selected": selected,
        "scales": chosen,
        "target_kl": target,
        "candidates": candidates,
        "best_score": {layers[r]: float(best_local[r]) for r in range(len(layers))},
        "candidate_scales": scales,
    }
