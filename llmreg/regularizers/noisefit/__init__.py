"""NoiseFiT: noise-augmented fine-tuning with SNR-selected noisy layers and a hybrid loss.

Paper: Khadangi, Sartipi, Tchappi, Bahmani, "Noise Augmented Fine Tuning for Mitigating Hallucinations in Large
Language Models", arXiv 2504.03302. Code: akhadangi/NoiseFiT (v1 `NoiseFiT_v1_manual_snr.py`). Spec:
../shared/methods/noisefit.md. The package implements v1 with the spec's two default changes (no double sigma,
shifted mask); v2's calibration, detached teacher and detached noise scale are options.

Algorithm:
- Before training (`on_prepared`): one clean no-grad forward on a seeded draw of training rows; every candidate
  decoder layer l gets SNR_l = mean|H_l| / (mean over 10 draws of mean|ANI(H_l) - H_l| + 1e-6) (noise.py), and the
  k = 3 layers of highest (or lowest) SNR get a forward hook. All ranks compute (ZeRO-3 gathers are collective),
  rank 0's choice is broadcast.
- Each micro-batch (`training_loss`, the core hook that replaces the host's loss): the batch is stacked three
  times, [clean; noisy 1; noisy 2], in ONE forward; the hooks add adaptive noise (noise.py) to rows of branches 1
  and 2 only, with statistics per branch slice as if the branches ran separately. With prefix sharing (default
  when the shared layers have no dropout) the embeddings and the layers up to the first noisy one run once on the
  plain batch, whose three branches would be identical there; that layer's hook returns [h; noisy 1; noisy 2]
  and forward pre-hooks on the later layers stack the model's per-row mask / position tensors to match
  (prefix.py). The final hidden states are
  split and the hybrid loss alpha*CE + (1-alpha)*soft + lam*cons is computed on response positions from chunked
  LM-head logits (loss.py); one backward follows, as for any loss.
- Noise is training-only: the hooks act only while armed (from the stacked forward to the end of the optimizer
  step, so gradient-checkpointing recomputation sees the same noise), in training mode and with grad enabled;
  evaluation and `generate()` see the clean model.

Hooks used: setup (checks, layer discovery), on_prepared (selection, noise hooks), training_loss, post_step
(disarm), metrics (ce / soft / consistency), state_dict (the selected layers and v2's scales, so a resume does not
re-select).

Noise draws: eps of (layer, branch) is drawn from a private generator seeded by (seed, optimizer step, shard,
layer, branch) with shard = micro_step * world_size + rank (noise.training_noise_key). The draw is re-made from
the key on every call, so a checkpointed layer's recomputation reproduces it (no generator state to restore), a
resume continues with the same noise, and N ranks x G accumulation steps give every slice of the global batch the
noise one process with N*G accumulation steps gives it.

Gradient accumulation (docs/architecture.md, trap 7): CE is normalised like the host's own loss (`ctx.token_mean`:
over `num_items_in_batch` when the host scales for accumulation), soft and consistency are per-micro-batch means
divided by `ctx.ga_divisor`, so all three are averaged the same way over the accumulation window.

Cost: about 3x the activation memory and 3x the FLOPs of SFT for the same micro-batch (three branches alive at
backward, as in the paper), less 2/3 of the shared prefix's work with prefix sharing; halve the micro-batch and
double accumulation when it does not fit. The logits are never materialised for the whole batch: chunks of
`chunk_size` positions at the loss positions only, recomputed in backward when the three branches' fp32 logits
would exceed 256 MiB (`recompute_logits="auto"`; at that size keeping them costs more memory than one more LM-head
forward costs time).

Departures from the v1 code:
- defaults: double sigma off, shifted mask on (both available as options, `double_sigma` / `shift_mask`);
- the calibration batch is a seeded draw of training rows, not the first batch of the dataloader;
- the three branches run as one stacked forward (v1: three forwards); the noise is the same operator;
- std(h) stays a tensor (v1's `.item()` forces a host sync); like `.item()` it carries no gradient;
- noise is drawn from keyed private generators instead of the global RNG (reproducible per rank and step);
- the CE is computed from the same chunked logits instead of the model's own loss; equal up to float rounding.
Options for the official code's variants: `double_sigma`, `shift_mask=False` (v1 quirks), `last_layer_post_norm`
(v1 scores the last layer after the final norm), `detach_teacher` / `detach_noise_scale` (v2), and
`version="v2"`: v2's KL-response calibration (calibration.py) of the layers (at most ceil(sqrt(L))) and of a noise
base s_l per layer, computed on `calib_batches` seeded batches per rank with the sums all-reduced, written to
`<output_dir>/auto_noise_policy.json` and kept in the state; with it the noise base is s_l (no std(h) factor), and
lam / detach_teacher / detach_noise_scale default to v2's 0.05 / True / True. v2's probe noise is drawn from keyed
generators like the training noise.
`pack_branches="never"` runs the official code's three forwards (same noise keys and per-branch statistics, so
the same loss; refused with gradient checkpointing, where a recomputed layer could not tell its branch).
`prefix_sharing` (spec: a v2 option, default off there) defaults to on when exact, i.e. when no module of the
shared prefix has dropout (the values are those of the unshared forward: the prefix sees the same rows in every
branch); with dropout it is off unless asked for, since the branches would then share one dropout mask.
Not implemented (spec option): the embedding SNR probe of the first commit (`snr_probe="embedding"`). TRL SFT's own
train metrics (entropy, token accuracy, num_tokens) are not recorded, since its `compute_loss` does not run;
padding-free batches and DPO / GRPO are refused.
The chunked logits are the model's own: `lm_head(h)` followed by the model's logit scaling / softcapping (Gemma
2/3's `final_logit_softcapping`, Granite's `logits_scaling`, Cohere's `logit_scale`; `llmreg.core.output_head`),
in the CE, the soft and consistency terms and v2's calibration alike.

MoE models (package choice; the paper trains dense models and its objective has no router term): the host's loss
includes the router load-balancing loss, `router_aux_loss_coef * aux` (TRL SFT: on for MoE models, averaged over
the accumulation window; transformers' Trainer: when the config's `output_router_logits` is set, per micro-batch;
`llmreg.integrations.moe`), so NoiseFiT's objective keeps it, computed like the parent's on the clean branch:
loss = alpha * CE + (1 - alpha) * soft + lam * cons + coef * aux(clean rows). The clean branch is the parent's
forward (so with zero noise and alpha = 1 the objective is the parent's loss); the noisy branches' routing is not
part of the parent's objective, and at the layers before the first noisy one (prefix sharing) only the clean
rows exist. The router logits are recorded by the decoder body in the packed forward and their clean rows
(the first B * T of every layer) enter the model family's own `load_balancing_loss_func` with the batch's
attention mask; the top model's own router loss is switched off in that forward (`output_router_logits=False`),
since it would mix B-row and 3B-row layers with a B-row mask. Logged as `router_aux`.

Modules: `noise.py` (the noise operator, SNR, keyed draws), `calibration.py` (v2's policy), `selection.py` (the
selection forwards), `prefix.py` (prefix sharing), `loss.py` (chunked hybrid loss), `host.py` (checks on the host,
model inputs, the stacked batch), `regularizer.py` (the `noisefit` regularizer).
"""

from llmreg.regularizers.noisefit.regularizer import NoiseFiT, NoiseFiTOptions

__all__ = ["NoiseFiT", "NoiseFiTOptions"]
