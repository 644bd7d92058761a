"""NoiseFiT's adaptive noise operator, the SNR layer score, and the seeds of every noise draw (pure functions).

All statistics are taken over the hidden dimension per token, in fp32, as in the v1 code:
    med = lower median_d(h)    mad = max(lower median_d |h - med|, 1e-6 ||h||_2)
    w   = exp(-beta |h - med| / (mad + 1e-6))
    nf  = min(exp(var_d(h) / (mean over the branch's tokens of var_d(h) + 1e-6)), nf_clip)
    ANI(h) = h + base * mad * w * nf * eps,   eps ~ N(0, 1)
`torch.median` returns the lower of the two middle values for an even d, like the v1 code; `var` and `std` are
the unbiased estimators (torch's default, as in v1).
"""

from __future__ import annotations

import hashlib
import math

import torch

EPS = 1e-6


def noise_scale(h: torch.Tensor, base: torch.Tensor | float, beta: float, nf_clip: float) -> torch.Tensor:
    """The per-element standard deviation of the noise, `base * mad * w * nf`, for one branch `h` [B, T, d]."""
    h = h.float()
    med = h.median(dim=-1, keepdim=True).values
    dev = (h - med).abs()
    mad = dev.median(dim=-1, keepdim=True).values
    mad = torch.maximum(mad, EPS * h.norm(dim=-1, keepdim=True))
    weight = torch.exp(-beta * dev / (mad + EPS))
    var = h.var(dim=-1, keepdim=True)
    # clamping the exponent instead of exp(.) keeps large variance ratios from overflowing before the clamp
    nf = torch.exp(torch.clamp(var / (var.mean() + EPS), max=math.log(nf_clip)))
    return base * mad * weight * nf


def adaptive_noise(
    h: torch.Tensor,
    eps: torch.Tensor,
    base: torch.Tensor | float,
    beta: float = 0.1,
    nf_clip: float = 5.0,
    detach_scale: bool = False,
) -> torch.Tensor:
    """ANI(h) for one branch with the given standard-normal draw `eps` (same shape as h); result in h's dtype.

    `detach_scale` (v2): the noise is a constant offset, so gradients pass through h as the identity."""
    scale = noise_scale(h, base, beta, nf_clip)
    if detach_scale:
        scale = scale.detach()
    return (h.float() + scale * eps.float()).to(h.dtype)


def branch_base(h: torch.Tensor, sigma: float, double_sigma: bool = False) -> torch.Tensor:
    """`sigma * std(h)` over the branch's whole tensor (padding included), as a tensor without gradient: v1 reads
    it with `.item()`, which detaches it (and costs a host sync, avoided here). `double_sigma`: v1's training
    hook multiplies by sigma twice."""
    base = sigma * h.detach().float().std()
    return base * sigma if double_sigma else base


def draw_seed(*key: object) -> int:
    """A 63-bit seed from a key tuple: the same on every machine and every run."""
    digest = hashlib.sha256("/".join(str(k) for k in ("noisefit", *key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def standard_normal(shape: torch.Size, device: torch.device, *key: object) -> torch.Tensor:
    """eps ~ N(0, 1) of `shape` from a private generator seeded by `key`, in fp32 on `device`.

    Re-drawn from the key on every call, so a recomputation of the same layer (gradient checkpointing) gets the
    same noise without any generator state to restore."""
    gen = torch.Generator(device=device)
    gen.manual_seed(draw_seed(*key))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def training_noise_key(seed: int, step: int, shard: int, layer: int, branch: int) -> tuple:
    """Key of the noise of one layer and one noisy branch (1 or 2) in one micro-batch.

    `shard = micro_step * world_size + rank` is the index of the micro-batch's slice of the global batch in
    accelerate's order, so N ranks x G accumulation steps draw, for every slice, the noise that one process with
    N*G accumulation steps draws for that slice."""
    return ("train", seed, step, shard, layer, branch)


def layer_snr(
    h: torch.Tensor, sigma: float, beta: float, nf_clip: float, draws: int, seed: int, layer: int
) -> torch.Tensor:
    """signal / (noise + 1e-6): signal = mean |h| over the whole tensor, noise = mean over `draws` noise draws of
    mean |ANI(h) - h| with base sigma * std(h) (selection uses sigma once, also with v1's double sigma)."""
    h = h.detach().float()
    signal = h.abs().mean()
    scale = noise_scale(h, branch_base(h, sigma), beta, nf_clip)
    noise = torch.stack(
        [(scale * standard_normal(h.shape, h.device, "snr", seed, layer, i)).abs().mean() for i in range(draws)]
    ).mean()
    return signal / (noise + EPS)


def select_layers(snr: torch.Tensor, k: int, select: str) -> list[int]:
    """Positions of the k largest (`high`) or smallest (`low`) SNR values, sorted."""
    return sorted(torch.topk(snr, k, largest=(select == "high")).indices.tolist())
