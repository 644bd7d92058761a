"""Lp-Reg: low-probability token regularisation for RLVR with GRPO.

Paper: Huang et al., "Low-probability Tokens Sustain Exploration in Reinforcement Learning with Verifiable
Reward", arXiv 2510.03222 (v2). Official code: CarlanLark/Lp-Reg-dev (veRL). Spec: shared/methods/lp_reg.md.

Per generation batch, the data-generating policy's next-token distribution is reduced to a min-p proxy (tokens
with p < kappa * p_max removed, the rest renormalised). In the loss, the lowest-probability `rho` share of the
negative-advantage tokens that the proxy keeps and that the policy rates below the proxy get the k3 penalty
beta * (r - log r - 1), r = pi_proxy / pi_theta (value clamped to 10, veRL `low_var_kl`), added to GRPO's
per-token loss before TRL's aggregation. No reference model (TRL beta = 0) and no entropy bonus.

Hooks (RegGRPOTrainer only; the version-sensitive TRL access is in `llmreg/trl_compat.py`):
- `on_rollout_hidden`: the proxy, from the policy's final hidden states and the LM head, chunked in fp32, in
  TRL's own old-log-prob pass when it runs one (off-policy), else in one extra no-grad eval-mode pass;
- `on_generation_batch`: the global threshold (rho-quantile of log pi_old over the negative-advantage tokens
  of the whole generation batch, all ranks) and the per-token proxy go into the batch TRL splits;
- `loss_terms`: the penalty on the micro-batch, from TRL's per-token log-probs (the fused LM head stays on),
  normalised like TRL's `loss_type` (`trl_compat.aggregate_like_loss`).

Departures and choices (see the spec's table of variants; the code's variants are options):
- `scope="global"` (default, the paper's "lowest rho of the batch"): threshold from pi_old, selection by the
  current detached log-prob, so off-policy a raised token leaves the set. The code's per-micro-batch rule is
  `scope="micro_batch"` (k = max(1, floor(rho * n)) lowest; none when k == 1).
- When TRL computes the old log-probs, the proxy pass uses TRL's model mode (train mode; LLM dropout is 0);
  the extra pass runs in eval mode as the spec asks.
- `estimator="full_kl"` (package option, untested by the authors): KL(pi_proxy || pi_theta) over the
  vocabulary at the selected positions, the proxy from the same logits detached (on-policy only; not ZeRO-3).
- Models with logit scaling / softcapping and vision-language models are refused (the proxy is hidden @ W.T).
- The proxy's projection runs in fp32 outside autocast; TRL's fused head (hence the current log-prob in
  `logp < proxy_logp`) follows the trainer's autocast. Under bf16, when the filter removes nothing the two
  differ only by rounding, which can select a token with a k3 value of order 1e-4 (negligible).
- `soft_fill=True`: a filtered token has a finite proxy log-prob, so `kept` is not required for selection;
  `logp < proxy_logp` decides, as in the code's `minp_soft`.
- `scope="micro_batch"` works on each rank's own micro-batch (as the code); `"global"` gathers the
  negative-advantage log-probs of all ranks once per generation batch.
- Metrics: `selected_share` (regularised tokens over valid response tokens), `threshold_prob` (exp of the
  global threshold), `entropy` (TRL's per-token policy entropy over valid tokens), `penalty` (the loss term).

Pure functions:
- `minp_proxy_stats` / `minp_proxy_logprobs`: the min-p proxy of a next-token distribution, chunked over rows
  so that one [rows x vocab] fp32 buffer (plus its boolean filter mask) exists at a time, whatever the dtype of
  the logits. `hidden_proxy_stats` does the same from final hidden states and the LM-head weight, for trainers
  whose fused LM head never returns logits (TRL >= 1.15, DESIGN trap 6).
- `lowp_threshold`: the rho-quantile of the log-probabilities of the negative-advantage tokens.
- `lp_reg_penalty`: the per-token k3 penalty and the selection mask.
- `full_forward_kl` (`estimator="full_kl"`): the package's full-vocabulary KL(pi_proxy || pi_theta) option.

Everything is computed in fp32. Filtering uses explicit boolean masks (the official code fills with -1e4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from llmreg.core import ConfigError, Order, Regularizer, Requirements, option, register

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


def _stats_of_chunk(z: torch.Tensor, targets: torch.Tensor, kappa: float, temperature: float, threshold_type: str,
                    inclusive: bool, filter_before_temperature: bool, soft_fill: bool) -> ProxyStats:
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


def minp_proxy_stats(logits: torch.Tensor, token_ids: torch.Tensor, kappa: float = 0.02, temperature: float = 1.0,
                     chunk_size: int = DEFAULT_CHUNK_ROWS, threshold_type: str = "minp", inclusive: bool = True,
                     filter_before_temperature: bool = False, soft_fill: bool = False) -> ProxyStats:
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
            z = flat[start:start + chunk_size].to(torch.float32, copy=True)
            parts.append(_stats_of_chunk(z, targets[start:start + chunk_size], kappa, temperature, threshold_type,
                                         inclusive, filter_before_temperature, soft_fill))
            del z
    shape = token_ids.shape
    if not parts:
        empty = torch.empty(shape, dtype=torch.float32, device=logits.device)
        return ProxyStats(empty, empty.clone(), torch.empty(shape, dtype=torch.bool, device=logits.device))
    return ProxyStats(*(torch.cat([p[i] for p in parts]).reshape(shape) for i in range(3)))


def minp_proxy_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, kappa: float = 0.02, temperature: float = 1.0,
                        chunk_size: int = DEFAULT_CHUNK_ROWS, **options) -> torch.Tensor:
    """log pi_proxy(token) for each sampled token, fp32, -inf where the min-p filter removed it."""
    return minp_proxy_stats(logits, token_ids, kappa, temperature, chunk_size, **options).proxy_logp


def hidden_proxy_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor,
                       kappa: float = 0.02, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_ROWS,
                       **options) -> ProxyStats:
    """As `minp_proxy_stats`, with logits = hidden @ weight.T + bias formed one chunk of rows at a time.

    The projection runs in the weight's dtype (as the model's own head does) and is then cast to fp32.
    """
    _check(kappa, temperature, options.get("threshold_type", "minp"))
    width = hidden.shape[-1]
    flat = hidden.reshape(-1, width)
    targets = token_ids.reshape(-1).to(device=hidden.device, dtype=torch.long)
    parts = []
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk_size):
            z = F.linear(flat[start:start + chunk_size].to(weight.dtype), weight, bias)
            if z.dtype != torch.float32:
                z = z.float()
            parts.append(_stats_of_chunk(z, targets[start:start + chunk_size], kappa, temperature,
                                         options.get("threshold_type", "minp"), options.get("inclusive", True),
                                         options.get("filter_before_temperature", False),
                                         options.get("soft_fill", False)))
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


def _scope_selection(lp: torch.Tensor, side: torch.Tensor, rho: float, scope: str,
                     threshold: torch.Tensor | None) -> torch.Tensor:
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


def k3_penalty(logp: torch.Tensor, target_logp: torch.Tensor, clamp: float | None = 10.0,
               reverse: bool = False) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_target || pi_theta) at the sampled token: rr - log rr - 1 with
    rr = pi_target / pi_theta (veRL `low_var_kl`), value clamped to [-clamp, clamp]. `reverse`: rr inverted
    (KL(pi_theta || pi_target), the paper's Fig. 10 ablation). Finite inputs only."""
    kl = target_logp - logp
    if reverse:
        kl = -kl
    value = torch.exp(kl) - kl - 1.0
    return value if clamp is None else value.clamp(-clamp, clamp)


def lp_reg_penalty(logp: torch.Tensor, proxy_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   rho: float = 0.01, beta: float = 1.0, scope: str = "global", threshold: torch.Tensor | None = None,
                   kept: torch.Tensor | None = None, k3_clamp: float | None = 10.0, rho_pos: float = 0.0,
                   threshold_pos: torch.Tensor | None = None, reverse_kl: bool = False,
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


def full_forward_kl(logits: torch.Tensor, kappa: float = 0.02, temperature: float = 1.0, beta: float = 1.0,
                    proxy_logits: torch.Tensor | None = None, inclusive: bool = True) -> torch.Tensor:
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


# -- the regularizer ---------------------------------------------------------------------------------------

@dataclass
class LpRegOptions:
    minp_kappa: float = option(0.02, "min-p ratio kappa: the proxy keeps tokens with p >= kappa * p_max")
    rho: float = option(0.01, "share of the negative-advantage tokens, lowest probability first, that can be "
                                "regularised")
    beta: float = option(1.0, "penalty coefficient")
    estimator: Literal["k3", "full_kl"] = option(
        "k3", "k3: per-token estimate at the sampled token (the code); full_kl: KL(proxy || policy) over "
        "the vocabulary at the selected positions (package option, on-policy, not ZeRO-3)")
    k3_clamp: float | None = option(10.0, "clamp of the k3 value (the code's 10); null: no clamp")
    scope: Literal["global", "micro_batch"] = option(
        "global", "global: threshold over the whole generation batch (paper); micro_batch: the code's k-lowest rule")
    threshold_type: Literal["minp", "fixed"] = option("minp", "minp: p >= kappa * p_max; fixed: p >= kappa")
    filter_before_temperature: bool = option(False, "filter the raw logits before dividing by T (the code)")
    minp_inclusive: bool = option(True, "keep p >= kappa * p_max (the code); False: p > kappa * p_max (the paper)")
    soft_fill: bool = option(False, "minp_soft: filtered logits set to the row minimum instead of removed")
    rho_pos: float = option(0.0, "also regularise this share of the lowest-probability positive-advantage tokens")
    reverse_kl: bool = option(False, "k3 of KL(policy || proxy) instead (the paper's worse Fig. 10 ablation)")
    chunk_size: int = option(DEFAULT_CHUNK_ROWS,
                             "rows of [rows x vocab] fp32 logits formed at a time in the proxy pass")

    def __post_init__(self) -> None:
        if not 0.0 < self.minp_kappa < 1.0:
            raise ValueError(f"minp_kappa must be in (0, 1), got {self.minp_kappa}")
        for name in ("rho", "rho_pos"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.k3_clamp is not None and self.k3_clamp <= 0:
            raise ValueError(f"k3_clamp must be positive or null, got {self.k3_clamp}")


@register("lp_reg")
class LpReg(Regularizer):
    """Lp-Reg (arXiv 2510.03222): k3 pull of the lowest-probability negative-advantage tokens toward a min-p proxy."""

    options_cls = LpRegOptions
    order = Order.OBJECTIVE
    requires = Requirements(trainers=("grpo",), needs_rollout_hidden=True)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.estimator == "full_kl":
            self.requires = Requirements(trainers=("grpo",), needs_rollout_hidden=True, needs_step_hidden=True)
        self._parts: list[tuple[int, ProxyStats]] = []
        self._reset_metrics()

    def _reset_metrics(self) -> None:
        self._n_selected = 0.0
        self._n_valid = 0.0
        self._entropy_sum = 0.0
        self._thresholds: list[float] = []

    def setup(self, model: torch.nn.Module, trainer: Any) -> None:
        from llmreg.integrations import trl as trl_compat

        reason = trl_compat.check_plain_lm_head(model)
        if reason:
            raise ConfigError(f"lp_reg: {reason} (the proxy is formed as hidden @ lm_head.T)")
        reason = trl_compat.unsupported_loss_type(trainer)
        if reason:
            raise ConfigError(f"lp_reg: {reason}")
        if self.options.estimator == "full_kl":
            from transformers.integrations import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                raise ConfigError("lp_reg: estimator 'full_kl' is not supported under ZeRO-3; use 'k3'")
            if trl_compat.old_logps_computed_by_trl(trainer):
                raise ConfigError("lp_reg: estimator 'full_kl' is on-policy only (steps_per_generation <= "
                                  "gradient_accumulation_steps, num_iterations = 1, no vLLM); use 'k3'")

    # -- once per generation batch ----------------------------------------------------------------------
    def _proxy_options(self) -> dict[str, Any]:
        o = self.options
        return dict(threshold_type=o.threshold_type, inclusive=o.minp_inclusive,
                    filter_before_temperature=o.filter_before_temperature, soft_fill=o.soft_fill)

    def on_rollout_hidden(self, chunk: Any) -> None:
        stats = hidden_proxy_stats(chunk.hidden, chunk.weight, chunk.bias, chunk.targets, kappa=self.options.minp_kappa,
                                   temperature=chunk.temperature, chunk_size=self.options.chunk_size,
                                   **self._proxy_options())
        self._parts.append((chunk.rows.start, stats))

    def on_generation_batch(self, batch: dict[str, Any], trainer: Any) -> None:
        from llmreg.integrations import trl as trl_compat

        parts = [stats for _, stats in sorted(self._parts, key=lambda item: item[0])]
        self._parts = []
        n = batch["completion_ids"].size(0)
        if sum(p.logp.size(0) for p in parts) != n:
            raise RuntimeError(f"lp_reg: the proxy pass covered {sum(p.logp.size(0) for p in parts)} rows of {n}")
        old_logp, proxy, kept = (torch.cat([p[i] for p in parts]) for i in range(3))
        mask = trl_compat.response_mask(batch).bool()
        adv = batch["advantages"]
        adv = adv if adv.dim() == 2 else adv[:, None]
        batch["lp_reg_proxy_logp"] = proxy
        batch["lp_reg_kept"] = kept
        for key, rho, side in (("lp_reg_threshold", self.options.rho, adv < 0),
                               ("lp_reg_threshold_pos", self.options.rho_pos, adv > 0)):
            thr = None
            if self.options.scope == "global" and rho > 0:
                thr = lowp_threshold(trl_compat.gather_values(trainer, old_logp[mask & side].float()), rho)
            value = -math.inf if thr is None else float(thr)
            batch[key] = torch.full((n,), value, dtype=torch.float32, device=old_logp.device)
            if key == "lp_reg_threshold" and thr is not None:
                self._thresholds.append(math.exp(value))

    # -- per micro-batch ---------------------------------------------------------------------------------
    def loss_terms(self, ctx: Any) -> dict[str, torch.Tensor]:
        from llmreg.integrations import trl as trl_compat

        inputs, extras = ctx.inputs, ctx.extras
        logp = extras["per_token_logps"]
        mask = trl_compat.response_mask(inputs)
        o = self.options
        thr = thr_pos = None
        if o.scope == "global":
            thr, thr_pos = inputs["lp_reg_threshold"][:1].squeeze(0), inputs["lp_reg_threshold_pos"][:1].squeeze(0)
        penalty, selected = lp_reg_penalty(
            logp, inputs["lp_reg_proxy_logp"], inputs["advantages"], mask, rho=o.rho, beta=o.beta, scope=o.scope,
            threshold=thr, kept=None if o.soft_fill else inputs["lp_reg_kept"], k3_clamp=o.k3_clamp,
            rho_pos=o.rho_pos, threshold_pos=thr_pos, reverse_kl=o.reverse_kl)
        if o.estimator == "full_kl":
            penalty = self._full_kl(extras, selected, penalty)
        entropies = extras.get("entropies")
        valid = mask.bool()
        self._n_selected += float(selected.sum())
        self._n_valid += float(valid.sum())
        if entropies is not None:
            self._entropy_sum += float(entropies.detach()[valid].float().sum())
        return {"penalty": trl_compat.aggregate_like_loss(ctx.trainer, penalty, mask, inputs)}

    def _full_kl(self, extras: dict[str, Any], selected: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        hidden, lm_head = extras["hidden_states"], extras["lm_head"]
        full = torch.zeros_like(penalty)
        if bool(selected.any()):
            logits = lm_head(hidden[selected])
            kl = full_forward_kl(logits, kappa=self.options.minp_kappa, temperature=self._temperature(extras),
                                 beta=self.options.beta, inclusive=self.options.minp_inclusive)
            full = full.masked_scatter(selected, kl.to(full.dtype))
        return full

    def _temperature(self, extras: dict[str, Any]) -> float:
        return float(extras.get("temperature", 1.0))

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._n_valid:
            out["selected_share"] = self._n_selected / self._n_valid
            out["entropy"] = self._entropy_sum / self._n_valid
        if self._thresholds:
            out["threshold_prob"] = sum(self._thresholds) / len(self._thresholds)
        self._reset_metrics()
        return out
