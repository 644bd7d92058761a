"""Lp-Reg: low-probability token regularisation for RLVR with GRPO.

Paper: Huang et al., "Low-probability Tokens Sustain Exploration in Reinforcement Learning with Verifiable
Reward", arXiv 2510.03222 (v2). Official code: CarlanLark/Lp-Reg-dev (veRL). Spec: shared/methods/lp_reg.md.

Per generation batch, the data-generating policy's next-token distribution is reduced to a min-p proxy (tokens
with p < kappa * p_max removed, the rest renormalised). In the loss, the lowest-probability `rho` share of the
negative-advantage tokens that the proxy keeps and that the policy rates below the proxy get the k3 penalty
beta * (r - log r - 1), r = pi_proxy / pi_theta (value clamped to 10, veRL `low_var_kl`), added to GRPO's
per-token loss before TRL's aggregation. No reference model (TRL beta = 0) and no entropy bonus.

Hooks (RegGRPOTrainer only; the GRPO hook protocol and every version-sensitive TRL access are in
`llmreg/integrations/trl.py`):
- `on_rollout_hidden`: the proxy, from the policy's final hidden states and the LM head, chunked in fp32, in
  TRL's own old-log-prob pass when it runs one (off-policy), else in one extra no-grad eval-mode pass;
- `on_generation_batch`: the global threshold (rho-quantile of log pi_old over the negative-advantage tokens
  of the whole generation batch, all ranks) and the per-token proxy go into the batch TRL splits;
- `loss_terms`: the penalty on the micro-batch, from TRL's per-token log-probs (the fused LM head stays on),
  normalised like TRL's `loss_type` (`integrations.trl.aggregate_like_loss`).

Departures and choices (see the spec's table of variants; the code's variants are options):
- `scope="global"` (default, the paper's "lowest rho of the batch"): threshold from pi_old, selection by the
  current detached log-prob, so off-policy a raised token leaves the set. The code's per-micro-batch rule is
  `scope="micro_batch"` (k = max(1, floor(rho * n)) lowest; none when k == 1).
- When TRL computes the old log-probs, the proxy pass uses TRL's model mode (train mode; LLM dropout is 0);
  the extra pass runs in eval mode as the spec asks.
- `estimator="full_kl"` (package option, untested by the authors): KL(pi_proxy || pi_theta) over the
  vocabulary at the selected positions, the proxy from the same logits detached (on-policy only; not ZeRO-3).
- The proxy's logits are the model's own: hidden @ W.T (+ bias), then the model's logit scaling / softcapping
  (Gemma 2/3, Granite, Cohere; `llmreg.core.output_head`), as in TRL's fused head whose log-probs they are
  compared with. Vision-language models are refused.
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
  whose fused LM head never returns logits (TRL >= 1.15, docs/architecture.md, trap 6), with the model's own
  logit transform.
- `lowp_threshold`: the rho-quantile of the log-probabilities of the negative-advantage tokens.
- `lp_reg_penalty`: the per-token k3 penalty and the selection mask.
- `full_forward_kl` (`estimator="full_kl"`): the package's full-vocabulary KL(pi_proxy || pi_theta) option.

Everything is computed in fp32. Filtering uses explicit boolean masks (the official code fills with -1e4).
"""

from llmreg.regularizers.lp_reg.formulas import (
    DEFAULT_CHUNK_ROWS,
    ProxyStats,
    full_forward_kl,
    hidden_proxy_stats,
    k3_penalty,
    lowp_threshold,
    lp_reg_penalty,
    minp_proxy_logprobs,
    minp_proxy_stats,
)
from llmreg.regularizers.lp_reg.regularizer import LpReg, LpRegOptions

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "LpReg",
    "LpRegOptions",
    "ProxyStats",
    "full_forward_kl",
    "hidden_proxy_stats",
    "k3_penalty",
    "lowp_threshold",
    "lp_reg_penalty",
    "minp_proxy_logprobs",
    "minp_proxy_stats",
]
