"""NoiseFiT's hybrid loss from the final hidden states of the three branches (pure functions).

    CE     token-mean NLL of the clean branch
    soft   0.5 * [KL(p0 || q1) + KL(p0 || q2)]   p0 = softmax(z0 / T), q_b = softmax(z_b)
    cons   KL(q2 || q1)
    loss = alpha * CE + (1 - alpha) * soft + lam * cons

The logits are built in chunks of positions from the hidden states and the LM head, only where a term needs
them, and with `checkpoint` each chunk's logits are recomputed in backward instead of kept, so the vocabulary-
sized tensors of one chunk are alive at a time (docs/architecture.md, trap 6: TRL's fused head gives no logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

IGNORE = -100


@dataclass
class Positions:
    """Flat positions (row, t) of the logits a term needs, with the next-token target and which terms use them."""

    rows: torch.Tensor
    cols: torch.Tensor
    target: torch.Tensor  # next token, IGNORE where the position is not a CE position
    ce: torch.Tensor  # bool
    kl: torch.Tensor  # bool


def positions(labels: torch.Tensor, shift_mask: bool = True) -> Positions:
    """CE positions t: labels[t + 1] != -100 (logits at t predict token t + 1). KL positions: the same
    (`shift_mask`), or v1's unshifted `labels[t] != -100`, one position off."""
    ce = torch.zeros_like(labels, dtype=torch.bool)
    ce[:, :-1] = labels[:, 1:] != IGNORE
    kl = ce if shift_mask else labels != IGNORE
    rows, cols = torch.nonzero(ce | kl, as_tuple=True)
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    return Positions(rows, cols, target[rows, cols], ce[rows, cols], kl[rows, cols])


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, summed over the vocabulary, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def chunk_sums(h0, h1, h2, target, ce_w, kl_w, lm_head: Callable, temperature: float, detach_teacher: bool):
    """(NLL sum, soft sum, consistency sum) over one chunk of positions; weights select the positions per term.

    soft = 0.5 * [KL(p0 || q1) + KL(p0 || q2)] is evaluated as sum_v p0 * (log p0 - (log q1 + log q2) / 2), one
    pass over the vocabulary instead of two."""
    z0, z1, z2 = lm_head(torch.cat([h0, h1, h2])).float().split(h0.shape[0])  # one head call per chunk
    log_c = F.log_softmax(z0, -1)
    nll = -log_c.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll_sum = (nll * ce_w).sum()
    if detach_teacher:  # v2: T on every side, a detached teacher and consistency target, soft term times T^2
        log_p0 = (log_c if temperature == 1.0 else F.log_softmax(z0 / temperature, -1)).detach()
        log_q1, log_q2 = F.log_softmax(z1 / temperature, -1), F.log_softmax(z2 / temperature, -1)
        soft = (log_p0.exp() * (log_p0 - 0.5 * (log_q1 + log_q2))).sum(-1) * temperature**2
        cons = kl(log_q2.detach(), log_q1)
    else:  # v1: only the teacher is tempered; nothing detached
        log_p0 = log_c if temperature == 1.0 else F.log_softmax(z0 / temperature, -1)
        log_q1, log_q2 = F.log_softmax(z1, -1), F.log_softmax(z2, -1)
        soft = (log_p0.exp() * (log_p0 - 0.5 * (log_q1 + log_q2))).sum(-1)
        cons = kl(log_q2, log_q1)
    return nll_sum, (soft * kl_w).sum(), (cons * kl_w).sum()


def hybrid_sums(
    hidden: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    pos: Positions,
    lm_head: Callable,
    temperature: float = 1.0,
    detach_teacher: bool = False,
    chunk_size: int = 256,
    checkpoint: bool = True,
) -> dict[str, torch.Tensor]:
    """Sums and counts of the three terms over `pos`, for the branches' final hidden states [B, T, d] each."""
    picked = [h[pos.rows, pos.cols] for h in hidden]
    ce_w, kl_w = pos.ce.to(picked[0].dtype), pos.kl.to(picked[0].dtype)
    zero = picked[0].new_zeros((), dtype=torch.float32)
    nll = soft = cons = zero
    n = picked[0].shape[0]
    for start in range(0, n, max(chunk_size, 1)):
        sl = slice(start, start + chunk_size)
        args = (picked[0][sl], picked[1][sl], picked[2][sl], pos.target[sl], ce_w[sl], kl_w[sl])
        if checkpoint and torch.is_grad_enabled():
            sums = _checkpoint(chunk_sums, *args, lm_head, temperature, detach_teacher, use_reentrant=False)
        else:
            sums = chunk_sums(*args, lm_head, temperature, detach_teacher)
        nll, soft, cons = nll + sums[0], soft + sums[1], cons + sums[2]
    return {"nll_sum": nll, "soft_sum": soft, "cons_sum": cons, "ce_count": pos.ce.sum(), "kl_count": pos.kl.sum()}


def hybrid_loss(
    sums: dict[str, torch.Tensor], alpha: float, lam: float, token_mean: Callable | None = None, ga_divisor: int = 1
) -> dict[str, torch.Tensor]:
    """The hybrid loss from `hybrid_sums`. CE is normalised by `token_mean(sum, count)` (the host trainer's rule,
    default: this batch's token mean); soft and consistency are means over this batch's positions, divided by
    `ga_divisor` to be averaged over accumulation like the host's CE."""
    token_mean = token_mean or (lambda total, count: total / count.clamp(min=1))
    ce = token_mean(sums["nll_sum"], sums["ce_count"])
    kl_count = sums["kl_count"].clamp(min=1)
    soft, cons = sums["soft_sum"] / kl_count, sums["cons_sum"] / kl_count
    loss = alpha * ce + ((1 - alpha) * soft + lam * cons) / ga_divisor
    return {"loss": loss, "ce": ce, "soft": soft, "consistency": cons}
