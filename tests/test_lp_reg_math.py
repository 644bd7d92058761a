"""Lp-Reg's pure functions against explicit reference computations written out here."""

from __future__ import annotations

import math

import pytest
import torch

from llmreg.regularizers.lp_reg import (
    full_forward_kl,
    hidden_proxy_stats,
    lowp_threshold,
    lp_reg_penalty,
    minp_proxy_logprobs,
    minp_proxy_stats,
)


def ref_proxy(logits, ids, kappa, temperature, fixed=False, inclusive=True, before=False, soft=False):
    """Row by row, with probabilities: p = softmax(z / T); keep p >= kappa * max p; renormalise."""
    logp_out, proxy_out, kept_out = [], [], []
    z_all = logits.double().reshape(-1, logits.shape[-1])
    for z, o in zip(z_all, ids.reshape(-1).tolist()):
        p = torch.softmax(z / temperature, dim=-1)
        p_filter = torch.softmax(z, dim=-1) if before else p
        cut = kappa if fixed else kappa * p_filter.max()
        keep = p_filter >= cut if inclusive else p_filter > cut
        logp_out.append(math.log(p[o]))
        kept_out.append(bool(keep[o]))
        if soft:
            zs = torch.where(keep, z / temperature, (z / temperature).min())
            proxy_out.append(float(torch.log_softmax(zs, dim=-1)[o]))
        else:
            proxy_out.append(math.log(p[o] / p[keep].sum()) if keep[o] else -math.inf)
    shape = ids.shape
    return (
        torch.tensor(logp_out).reshape(shape),
        torch.tensor(proxy_out).reshape(shape),
        torch.tensor(kept_out).reshape(shape),
    )


def _close(a, b, atol=1e-4):
    a, b = a.double(), b.double()
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    assert torch.allclose(a[fin], b[fin], atol=atol), (a[fin] - b[fin]).abs().max()


def _peaked_logits(shape, vocab, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, vocab, generator=g) * 3.0).to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_minp_proxy_matches_reference(temperature, chunk):
    logits = _peaked_logits((3, 7), 50, seed=0)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = logits[0, :3].argmax(-1)  # some surely-kept tokens
    stats = minp_proxy_stats(logits, ids, kappa=0.02, temperature=temperature, chunk_size=chunk)
    logp, proxy, kept = ref_proxy(logits, ids, 0.02, temperature)
    assert stats.proxy_logp.dtype == torch.float32 and stats.proxy_logp.shape == ids.shape
    _close(stats.logp, logp)
    _close(stats.proxy_logp, proxy)
    assert torch.equal(stats.kept, kept)
    assert kept.any() and not kept.all()  # both branches exercised
    _close(minp_proxy_logprobs(logits, ids, 0.02, temperature, chunk_size=chunk), proxy)


@pytest.mark.parametrize(
    "variant",
    [dict(fixed=True), dict(inclusive=False), dict(soft=True), dict(before=True), dict(before=True, fixed=True)],
)
def test_minp_proxy_variants_match_reference(variant):
    logits = _peaked_logits((4, 6), 40, seed=2)
    ids = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(
        threshold_type="fixed" if variant.get("fixed") else "minp",
        inclusive=variant.get("inclusive", True),
        filter_before_temperature=variant.get("before", False),
        soft_fill=variant.get("soft", False),
    )
    stats = minp_proxy_stats(logits, ids, kappa=0.03, temperature=0.8, chunk_size=7, **kw)
    logp, proxy, kept = ref_proxy(logits, ids, 0.03, 0.8, **variant)
    _close(stats.logp, logp)
    _close(stats.proxy_logp, proxy)
    assert torch.equal(stats.kept, kept)


def test_minp_inclusive_boundary():
    # token 1 has p exactly kappa * p_max: kept when inclusive (the code), removed when exclusive (the paper)
    kappa = 0.25
    logits = torch.tensor([[0.0, math.log(kappa), -10.0]])
    ids = torch.tensor([1])
    assert minp_proxy_stats(logits, ids, kappa=kappa).kept.item()
    assert not minp_proxy_stats(logits, ids, kappa=kappa, inclusive=False).kept.item()


def test_bf16_logits_are_computed_in_fp32():
    logits = _peaked_logits((2, 9), 64, seed=4, dtype=torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    stats = minp_proxy_stats(logits, ids, chunk_size=4)
    logp, proxy, kept = ref_proxy(logits.float(), ids, 0.02, 1.0)  # reference on the exact bf16 values, in fp64
    assert stats.logp.dtype == torch.float32
    _close(stats.logp, logp, atol=1e-5)
    _close(stats.proxy_logp, proxy, atol=1e-5)
    assert torch.equal(stats.kept, kept)


def test_hidden_proxy_equals_logit_proxy():
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(3, 5, 8, generator=g), torch.randn(30, 8, generator=g)
    bias = torch.randn(30, generator=g)
    ids = torch.randint(0, 30, (3, 5), generator=g)
    a = hidden_proxy_stats(hidden, weight, bias, ids, kappa=0.05, temperature=0.9, chunk_size=4)
    b = minp_proxy_stats(hidden @ weight.T + bias, ids, kappa=0.05, temperature=0.9)
    for x, y in zip(a, b):
        _close(x, y) if x.dtype != torch.bool else torch.equal(x, y)


def test_lowp_threshold_is_torch_quantile():
    g = torch.Generator().manual_seed(7)
    for n in (1, 2, 37, 1000):
        v = torch.randn(n, generator=g)
        for rho in (0.0, 0.01, 0.3, 1.0):
            assert torch.allclose(lowp_threshold(v, rho), torch.quantile(v, rho), atol=1e-6)
    assert lowp_threshold(torch.empty(0), 0.01) is None


def ref_penalty(logp, proxy, adv, mask, rho, beta, clamp=10.0):
    """Global scope, written with Python loops: threshold = rho-quantile of logp over A<0 valid tokens."""
    B, T = logp.shape
    neg = [logp[b, t].item() for b in range(B) for t in range(T) if mask[b, t] and adv[b] < 0]
    pen = torch.zeros(B, T, dtype=torch.float64)
    sel = torch.zeros(B, T, dtype=torch.bool)
    if not neg:
        return pen, sel
    thr = torch.quantile(torch.tensor(neg, dtype=torch.float64), rho).item()
    for b in range(B):
        for t in range(T):
            lp, pp = logp[b, t].item(), proxy[b, t].item()
            if mask[b, t] and adv[b] < 0 and lp <= thr + 1e-7 and math.isfinite(pp) and lp < pp:
                rr = math.exp(pp - lp)
                pen[b, t] = beta * min(rr - math.log(rr) - 1, clamp)
                sel[b, t] = True
    return pen, sel


def _batch(seed, B=6, T=40, vocab=30):
    g = torch.Generator().manual_seed(seed)
    logits = _peaked_logits((B, T), vocab, seed)
    # sampled from the data-generating policy, as in a rollout
    ids = torch.multinomial(torch.softmax(logits, -1).reshape(-1, vocab), 1, generator=g).reshape(B, T)
    proxy = minp_proxy_logprobs(logits, ids, kappa=0.02)
    # the current policy moved a little from the data-generating one
    moved = torch.log_softmax(logits + 0.3 * torch.randn(B, T, vocab, generator=g), -1)
    logp = moved.gather(-1, ids[..., None])[..., 0]
    adv = torch.tensor([1.0, -1.0, -0.5, 0.5, -2.0, 0.0])[:B]
    mask = torch.ones(B, T)
    mask[:, -5:] = 0
    return logp, proxy, adv, mask


@pytest.mark.parametrize("rho", [0.01, 0.2, 0.5])
def test_penalty_matches_reference_global(rho):
    logp, proxy, adv, mask = _batch(8)
    logp.requires_grad_(True)
    pen, sel = lp_reg_penalty(logp, proxy, adv, mask, rho=rho, beta=0.7)
    ref_pen, ref_sel = ref_penalty(logp.detach(), proxy, adv, mask, rho, 0.7)
    assert torch.equal(sel, ref_sel) and (sel.any() or rho < 0.1)  # at 1 % the lowest tokens are filtered ones
    assert torch.allclose(pen.double(), ref_pen, atol=1e-5)
    # gradient: d/dlogp of beta*(rr - log rr - 1) = beta*(1 - rr), negative (raises the token), unless clamped
    pen.sum().backward()
    rr = torch.exp(proxy - logp.detach())
    k3 = rr - torch.log(rr) - 1
    expected = torch.where(sel & (k3 < 10), 0.7 * (1 - rr), torch.zeros_like(rr))
    assert torch.allclose(logp.grad, expected.float(), atol=1e-5)
    assert (logp.grad[sel & (k3 < 10)] < 0).all()


def test_advantages_per_token_equal_per_sequence():
    logp, proxy, adv, mask = _batch(9)
    a = lp_reg_penalty(logp, proxy, adv, mask, rho=0.3)
    b = lp_reg_penalty(logp, proxy, adv[:, None].expand(-1, logp.shape[1]), mask, rho=0.3)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_given_threshold_is_used():
    logp, proxy, adv, mask = _batch(10)
    thr = torch.tensor(-1.5)
    _, sel = lp_reg_penalty(logp, proxy, adv, mask, rho=0.01, threshold=thr)
    neg = (adv[:, None] < 0) & mask.bool()
    expected = neg & (logp <= thr) & torch.isfinite(proxy) & (logp < proxy)
    assert torch.equal(sel, expected) and sel.sum() > 1


def test_no_negative_advantage_no_penalty():
    logp, proxy, _, mask = _batch(11)
    pen, sel = lp_reg_penalty(logp, proxy, torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 3.0]), mask, rho=0.5)
    assert not sel.any() and torch.count_nonzero(pen) == 0


def test_fewer_negative_tokens_than_one_over_rho():
    logp, proxy, adv, mask = _batch(12, B=2, T=10)
    adv = torch.tensor([-1.0, 1.0])
    proxy = torch.zeros_like(proxy)  # every token could be selected: only the quantile limits the choice
    pen, sel = lp_reg_penalty(logp, proxy, adv, mask, rho=0.01)
    # 5 negative tokens, rho = 1 %: the quantile sits between the lowest two, so exactly the lowest is selected
    low = torch.where(mask[0].bool(), logp[0], torch.inf).argmin()
    assert sel.sum() == 1 and sel[0, low]
    # micro_batch scope: k = max(1, int(5 * 0.01)) = 1, and the code regularises nothing when k == 1
    _, sel_mb = lp_reg_penalty(logp, proxy, adv, mask, rho=0.01, scope="micro_batch")
    assert not sel_mb.any()


def test_fully_masked_rows_are_never_selected():
    logp, proxy, adv, mask = _batch(13)
    mask[1] = 0
    mask[4] = 0
    proxy = torch.zeros_like(proxy)
    pen, sel = lp_reg_penalty(logp, proxy, adv, mask, rho=1.0)
    assert not sel[1].any() and not sel[4].any() and sel[2].any()
    assert torch.count_nonzero(pen[1]) == 0 and torch.isfinite(pen).all()
    mask.zero_()
    pen, sel = lp_reg_penalty(logp, proxy, adv, mask, rho=1.0)
    assert not sel.any() and torch.count_nonzero(pen) == 0


def test_micro_batch_scope_k_lowest():
    logp, proxy, adv, mask = _batch(14, B=6, T=60)
    proxy = torch.zeros_like(proxy)
    rho = 0.1
    _, sel = lp_reg_penalty(logp, proxy, adv, mask, rho=rho, scope="micro_batch")
    neg_vals = logp[(adv[:, None] < 0) & mask.bool()]
    k = int(neg_vals.numel() * rho)
    assert sel.sum() == k
    assert logp[sel].max() <= neg_vals.sort().values[k - 1]


def test_clamp_and_reverse():
    logp = torch.tensor([[-12.0, -3.0]], requires_grad=True)
    proxy = torch.tensor([[-1.0, -2.5]])
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 2)
    pen, sel = lp_reg_penalty(logp, proxy, adv, mask, rho=1.0, k3_clamp=10.0)
    assert sel.all() and pen[0, 0] == 10.0  # rr = e^11: clamped, no gradient
    pen.sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0
    pen_free, _ = lp_reg_penalty(logp.detach(), proxy, adv, mask, rho=1.0, k3_clamp=None)
    assert abs(pen_free[0, 0].item() - (math.exp(11) - 11 - 1)) < 1.0
    pen_rev, _ = lp_reg_penalty(logp.detach(), proxy, adv, mask, rho=1.0, reverse_kl=True)
    rr = math.exp(-0.5)  # pi_theta / pi_proxy at token 2
    assert abs(pen_rev[0, 1].item() - (rr - math.log(rr) - 1)) < 1e-6


def test_rho_pos_selects_positive_tokens_too():
    logp, proxy, adv, mask = _batch(15)
    proxy = torch.zeros_like(proxy)
    _, sel = lp_reg_penalty(logp, proxy, adv, mask, rho=0.1)
    _, sel_pos = lp_reg_penalty(logp, proxy, adv, mask, rho=0.1, rho_pos=0.1)
    pos_rows = adv > 0
    assert not sel[pos_rows].any() and sel_pos[pos_rows].any()
    assert torch.equal(sel_pos[~pos_rows], sel[~pos_rows])


def test_full_forward_kl_matches_sum():
    g = torch.Generator().manual_seed(16)
    logits = (torch.randn(3, 20, generator=g) * 3).requires_grad_(True)
    proxy_src = logits.detach() + 0.2 * torch.randn(3, 20, generator=g)
    kl = full_forward_kl(logits, kappa=0.05, beta=2.0, proxy_logits=proxy_src)
    for i in range(3):
        p = torch.softmax(proxy_src[i].double(), -1)
        keep = p >= 0.05 * p.max()
        q = torch.where(keep, p, torch.zeros_like(p)) / p[keep].sum()
        lt = torch.log_softmax(logits[i].detach().double(), -1)
        ref = sum(q[v] * (math.log(q[v]) - lt[v]) for v in range(20) if keep[v])
        assert abs(kl[i].item() - 2.0 * float(ref)) < 1e-4
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # on-policy, the proxy comes from the same logits: KL = -log(mass of the kept set) >= 0
    on = full_forward_kl(logits.detach(), kappa=0.05)
    p = torch.softmax(logits.detach(), -1)
    mass = torch.where(p >= 0.05 * p.max(-1, keepdim=True).values, p, torch.zeros_like(p)).sum(-1)
    assert torch.allclose(on, -mass.log(), atol=1e-5)
