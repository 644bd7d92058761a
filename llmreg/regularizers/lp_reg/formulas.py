"""Lp-Reg's pure functions (arXiv 2510.03222): the min-p proxy of a next-token distribution, the low-probability
threshold, the k3 penalty with its token selection, and the package's full-vocabulary KL option. See the package
docstring (`llmreg/regularizers/lp_reg/__init__.py`) for the method and where it departs from the paper."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_ROWS = 1024


class ProxyStats(NamedTuple):
    """Per sampled token: its log-probability under the full distribution, under the min-p proxy (-inf when
    the filter removed it, unless `soft_fill`), and whether it survived the filter."""

    logp: torch.Tensor
    proxy_logp: torch.Tensor
    kept: torch.Tensor


def _check(kappa: float, temperature: float, threshold_type: str) -> None:
    if not 0.0 < kappa < 1.0:
        raise ValueError(f"kappa must be in (0, 1), got {kappa}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if threshold_type not in ("minp", "fixed"):
        raise ValueError(f"threshold_type must be 'minp' or 'fixed', got {threshold_type!r}")


def _stats_of_chunk(
    z: torch.Tensor,
    targets: torch.Tensor,
    kappa: float,
    temperature: float,
    threshold_type: str,
    inclusive: bool,
    filter_before_temperature: bool,
    soft_fill: bool,
) -> ProxyStats:
    """`z`: an fp32 [rows, V] buffer of raw logits that this function owns and overwrites in place."""
    z.sub_(z.amax(dim=-1, keepdim=True))  # shifted logits, max 0
    drop = None
    if filter_before_temperature and temperature != 1.0:
        # the official code filters the raw logits, before dividing by T (identical at T = 1)
        if threshold_type == "minp":
            drop = z < math.log(kappa) if inclusive else z <= math.log(kappa)
        else:  # needs the raw normaliser: one transient buffer more in this combination only
            lp = z - torch.logsumexp(z, dim=-1, keepdim=True)
            drop = lp < math.log(kappa) if inclusive else lp <= math.log(kappa)
            del lp
        z.div_(temperature)
    elif temperature != 1.0:
        z.div_(temperature)
    z_t = z.gather(1, targets[:, None]).squeeze(1)
    z_min = z.amin(dim=-1) if soft_fill else None
    z.exp_()  # e_v = p_v / p_max, in (0, 1]
    total = z.sum(dim=-1)
    logp = z_t - total.log()
    if drop is None:
        cut = kappa if threshold_type == "minp" else kappa * total[:, None]  # min-p: p_v >= kappa * p_max
        drop = z < cut if inclusive else z <= cut
    kept = ~drop.gather(1, targets[:, None]).squeeze(1)
    z.masked_fill_(drop, 0.0)
    keep_sum = z.sum(dim=-1)
    if soft_fill:
        # minp_soft: removed logits are set to the row minimum instead, so they keep a little mass
        keep_sum = keep_sum + drop.sum(dim=-1) * z_min.exp()
        proxy = torch.where(kept, z_t, z_min) - keep_sum.log()
    else:
        proxy = torch.where(kept, z_t - keep_sum.log(), torch.full_like(z_t, -math.inf))
    return ProxyStats(logp, proxy, kept)


def minp_proxy_stats(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    kappa: float = 0.02,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    threshold_type: str = "minp",
    inclusive: bool = True,
    filter_before_temperature: bool = False,
    soft_fill: bool = False,
) -> ProxyStats:
    """`logits` [..., V] (any float dtype), `token_ids` [...] -> `ProxyStats`, each [...].

    The proxy keeps the tokens with p >= kappa * p_max (`threshold_type="minp"`) or p >= kappa ("fixed"),
    where p = softmax(logits / temperature), and renormalises over them. At most `chunk_size` rows of the
    vocabulary are materialised in fp32 at a time.
    """
    _check(kappa, temperature, threshold_type)
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    targets = token_ids.reshape(-1).to(device=logits.device, dtype=torch.long)
    parts = []
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk_size):
            z = flat[start : start + chunk_size].to(torch.float32, copy=True)
            parts.append(
                _stats_of_chunk(
                    z,
                    targets[start : start + chunk_size],
                    kappa,
                    temperature,
                    threshold_type,
                    inclusive,
                    filter_before_temperature,
                    soft_fill,
                )
            )
            del z
    shape = token_ids.shape
    if not parts:
        empty = torch.empty(shape, dtype=torch.float32, device=logits.device)
        return ProxyStats(empty, empty.clone(), torch.empty(shape, dtype=torch.bool, device=logits.device))
    return ProxyStats(*(torch.cat([p[i] for p in parts]).reshape(shape) for i in range(3)))


def minp_proxy_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    kappa: float = 0.02,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    **options,
) -> torch.Tensor:
    """log pi_proxy(token) for each sampled token, fp32, -inf where the min-p filter removed it."""
    return minp_proxy_stats(logits, token_ids, kappa, temperature, chunk_size, **options).proxy_logp


def hidden_proxy_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_ids: torch.Tensor,
    kappa: float = 0.02,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **options,
) -> ProxyStats:
    """As `minp_proxy_stats`, with logits = transform(hidden @ weight.T + bias) formed one chunk of rows at a time.

    The projection runs in the weight's dtype (as the model's own head does) and is then cast to fp32;
    `transform` is the model's own logit scaling / softcapping (`llmreg.core.output_head`), on the fp32 logits.
    """
    _check(kappa, temperature, options.get("threshold_type", "minp"))
    width = hidden.shape[-1]
    flat = hidden.reshape(-1, width)
    targets = token_ids.reshape(-1).to(device=hidden.device, dtype=torch.long)
    parts = []
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk_size):
            z = F.linear(flat[start : start + chunk_size].to(weight.dtype), weight, bias)
            if z.dtype != torch.float32:
                z = z.float()
            if transform is not None:
                z = transform(z)
            parts.append(
                _stats_of_chunk(
                    z,
                    targets[start : start + chunk_size],
                    kappa,
                    temperature,
                    options.get("threshold_type", "minp"),
                    options.get("inclusive", True),
                    options.get("filter_before_temperature", False),
                    options.get("soft_fill", False),
                )
            )
            del z
    shape = token_ids.shape
    if not parts:
        empty = torch.empty(shape, dtype=torch.float32, device=hidden.device)
        return ProxyStats(empty, empty.clone(), torch.empty(shape, dtype=torch.bool, device=hidden.device))
    return ProxyStats(*(torch.cat([p[i] for p in parts]).reshape(shape) for i in range(3)))


def lowp_threshold(values: torch.Tensor, rho: float) -> torch.Tensor | None:
    """The rho-quantile (linear interpolation, as `torch.quantile`) of a 1-D tensor, or None when it is empty.

    Uses two `kthvalue` calls, so it has no size limit (torch.quantile refuses inputs above 2**24 elements).
    """
    values = values.reshape(-1).float()
    n = values.numel()
    if n == 0:
        return None
    pos = rho * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = torch.kthvalue(values, lo + 1).values
    if hi == lo:
        return v_lo
    v_hi = torch.kthvalue(values, hi + 1).values
    return v_lo + (pos - lo) * (v_hi - v_lo)


def _scope_selection(
    lp: torch.Tensor, side: torch.Tensor, rho: float, scope: str, threshold: torch.Tensor | None
) -> torch.Tensor:
    """Candidates among the `side` tokens (bool [B, T]) by low probability `lp` (detached fp32)."""
    if rho <= 0.0 or not bool(side.any()):
        return torch.zeros_like(side)
    if scope == "global":
        thr = threshold if threshold is not None else lowp_threshold(lp[side], rho)
        return side & (lp <= thr)
    # micro_batch (the official code): the k lowest, k = max(1, floor(rho * n)); nothing at all when k == 1
    flat_idx = side.reshape(-1).nonzero(as_tuple=True)[0]
    k = max(1, int(flat_idx.numel() * rho))
    out = torch.zeros(side.numel(), dtype=torch.bool, device=side.device)
    if k > 1:
        lowest = lp.reshape(-1)[flat_idx].topk(k, largest=False).indices
        out[flat_idx[lowest]] = True
    return out.reshape(side.shape)


def k3_penalty(
    logp: torch.Tensor, target_logp: torch.Tensor, clamp: float | None = 10.0, reverse: bool = False
) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_target || pi_theta) at the sampled token: rr - log rr - 1 with
    rr = pi_target / pi_theta (veRL `low_var_kl`), value clamped to [-clamp, clamp]. `reverse`: rr inverted
    (KL(pi_theta || pi_target), the paper's Fig. 10 ablation). Finite inputs only."""
    kl = target_logp - logp
    if reverse:
        kl = -kl
    value = torch.exp(kl) - kl - 1.0
    return value if clamp is None else value.clamp(-clamp, clamp)


def lp_reg_penalty(
    logp: torch.Tensor,
    proxy_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    rho: float = 0.01,
    beta: float = 1.0,
    scope: str = "global",
    threshold: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
    k3_clamp: float | None = 10.0,
    rho_pos: float = 0.0,
    threshold_pos: torch.Tensor | None = None,
    reverse_kl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lp-Reg's per-token penalty and selection mask, both [B, T].

    `logp` [B, T]: log pi_theta of the sampled tokens (with grad); `proxy_logp` [B, T]: log pi_proxy, -inf
    where filtered; `advantages` [B] or [B, T]; `mask` [B, T]: valid response tokens.

    Selected: valid tokens with A < 0, among the lowest-probability `rho` share of those (by the detached
    `logp`; `scope="global"`: logp <= the rho-quantile over the whole tensor, or <= `threshold` when given;
    `"micro_batch"`: the official code's k-lowest rule), kept by the filter (`kept`, default: proxy_logp
    finite) and with logp < proxy_logp. `rho_pos > 0` also selects the lowest-probability positive-advantage
    tokens the same way. Penalty: beta * clamp(k3(proxy_logp, logp)) on selected tokens, 0 elsewhere.
    """
    if scope not in ("global", "micro_batch"):
        raise ValueError(f"scope must be 'global' or 'micro_batch', got {scope!r}")
    adv = advantages if advantages.dim() == logp.dim() else advantages.reshape(-1, *([1] * (logp.dim() - 1)))
    adv = adv.expand_as(logp)
    valid = mask.bool()
    lp = logp.detach().float()
    proxy = proxy_logp.to(lp.dtype)
    kept = torch.isfinite(proxy) if kept is None else kept.bool()
    cand = _scope_selection(lp, valid & (adv < 0), rho, scope, threshold)
    if rho_pos > 0.0:
        cand = cand | _scope_selection(lp, valid & (adv > 0), rho_pos, scope, threshold_pos)
    selected = cand & kept & (lp < proxy)
    # where() keeps unselected (possibly -inf) entries out of both the value and the gradient
    safe_target = torch.where(selected, proxy, lp)
    value = k3_penalty(logp.float(), safe_target, k3_clamp, reverse=reverse_kl)
    penalty = torch.where(selected, beta * value, torch.zeros_like(value))
    return penalty, selected


def full_forward_kl(
    logits: torch.Tensor,
    kappa: float = 0.02,
    temperature: float = 1.0,
    beta: float = 1.0,
    proxy_logits: torch.Tensor | None = None,
    inclusive: bool = True,
) -> torch.Tensor:
    """beta * KL(pi_proxy || pi_theta) over the vocabulary, per row of `logits` [n, V] (with grad).

    pi_proxy is the min-p proxy of `proxy_logits` (default: `logits` detached, the on-policy case);
    KL = sum over the kept set of pi_proxy(v) * (log pi_proxy(v) - log pi_theta(v)).
    """
    logp_theta = torch.log_softmax(logits.float() / temperature, dim=-1)
    with torch.no_grad():
        src = logits if proxy_logits is None else proxy_logits
        lp_src = torch.log_softmax(src.float() / temperature, dim=-1)
        rel = lp_src - lp_src.amax(dim=-1, keepdim=True)
        keep = rel >= math.log(kappa) if inclusive else rel > math.log(kappa)
        lp_proxy = torch.where(keep, lp_src, torch.full_like(lp_src, -math.inf))
        lp_proxy = lp_proxy - torch.logsumexp(lp_proxy, dim=-1, keepdim=True)
        p_proxy = lp_proxy.exp()
    terms = torch.where(keep, p_proxy * (lp_proxy - logp_theta), torch.zeros_like(logp_theta))
    return beta * terms.sum(dim=-1)
