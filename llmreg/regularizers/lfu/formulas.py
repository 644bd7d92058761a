"""LfU's pure math: the normalised ascent step, the response-token mask, the consistency term, the choice of
layers, and the seeded A factors of the full fine-tuning LoRA perturbation."""

from __future__ import annotations

import math
from typing import Any

import torch

from llmreg.core.anatomy import IGNORE_INDEX
from llmreg.core.options import ConfigError


def ascent_delta(grads: list[torch.Tensor], alpha: float, eps: float = 1e-12) -> tuple[list[torch.Tensor], float]:
    """delta_j = alpha * g_j / (||g|| + eps), with ||g|| the norm of all tensors together, in fp32."""
    if not grads:
        return [], 0.0
    norm = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().sqrt()
    scale = alpha / (float(norm) + eps)
    return [(g.detach().float() * scale).to(g.dtype) for g in grads], float(norm)


def response_mask(inputs: dict[str, Any]) -> torch.Tensor | None:
    """[B, T] bool: positions whose own token is a response token (labels != -100); attention mask or None
    (every position) without labels."""
    labels = inputs.get("labels")
    if torch.is_tensor(labels) and labels.dim() == 2:
        return labels != IGNORE_INDEX
    mask = inputs.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2:
        return mask.bool()
    return None


def consistency(
    targets: list[torch.Tensor],
    perturbed: list[torch.Tensor],
    mask: torch.Tensor | None,
    distance: str = "mse_mean",
    count: float | None = None,
) -> torch.Tensor:
    """mean over layers of the squared error on the masked positions, in fp32.

    mse_mean: per element (sum / (tokens * d)); sq_l2_sum: summed over the hidden size, mean over tokens.
    `count` replaces the local number of masked tokens (a global count for data parallelism).
    """
    terms = []
    for t, p in zip(targets, perturbed, strict=True):
        if mask is not None:
            t, p = t[mask], p[mask]
        else:
            t, p = t.reshape(-1, t.shape[-1]), p.reshape(-1, p.shape[-1])
        tokens = float(t.shape[0]) if count is None else float(count)
        sq = (p.float() - t.detach().float()).pow(2).sum()
        denom = tokens * (t.shape[-1] if distance == "mse_mean" else 1)
        terms.append(sq / max(denom, 1.0))
    return torch.stack(terms).mean()


def select_layers(requested: list[int], n_layers: int, include_embeddings: bool) -> list[int]:
    """Indices into the captured outputs: -1 is the embedding output, 0..L-1 the decoder layers."""
    if requested:
        bad = [i for i in requested if not -n_layers <= i < n_layers]
        if bad:
            raise ConfigError(
                f"lfu: layers {bad} match no decoder layer (the model has {n_layers}: "
                f"0..{n_layers - 1}, or negative from the end)"
            )
        chosen = sorted({i % n_layers for i in requested})
    else:
        chosen = list(range(n_layers))
    return ([-1] if include_embeddings else []) + chosen


def kaiming_uniform(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's LoRA A init (kaiming_uniform_ with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
