"""LfU, Learning from the Undesirable: hidden-state consistency with a model pushed one step up the SFT loss.

Paper: Nam, Kim, Jeong, "Learning from the Undesirable: Robust Adaptation of Language Models without
Forgetting", arXiv 2511.13052 (AAAI 2026). Official code: yunpal/LfU (a LLaMA-Factory fork). Spec:
../shared/methods/lfu.md.

Per micro-step (T_l: clean hidden states, stop-gradient; M: response tokens):

    g      = d L_sft / d a                        auxiliary tensors a only, taken at a0
    delta  = alpha * g / (||g|| + eps)            one normalised ascent step ("the undesirable update")
    L_cons = mean_l mean_{M x d} (H_l(x; theta, a0 + delta) - T_l)^2
    loss   = L_sft + lam * L_cons

Auxiliary tensors (`aux`), never parameters of the model, never seen by the optimizer or DeepSpeed:
- `reps`: one steering vector per decoder layer, added to the layer's output (0 each step);
- `lora`, full fine-tuning: a rank-r perturbation s * B_l A_l x on every linear layer of the decoder, A_l fixed
  (seeded, the same on every rank), B_l = 0 each step, so only B gets a gradient;
- `lora`, PEFT LoRA training: the trained adapter itself. Its ascent gradient is taken with respect to zero
  "shadow" tensors e_A, e_B added inside the adapter (lora_A output + e_A x, lora_B output + e_B u): at 0 their
  gradients are exactly dL/dA and dL/dB, and at (delta_A, delta_B) the adapter computes (B + dB)(A + dA) x. So
  no `autograd.grad` ever runs with respect to DeepSpeed-managed parameters (docs/architecture.md, trap 9,
  ZeRO-2), and no adapter weight is read outside its own module's forward (ZeRO-3).

Hooks: `setup` registers forward hooks (top model: opens/closes the host's clean pass; decoder layers: capture
outputs, add steering vectors; linear / adapter modules: add the LoRA perturbation). `loss_terms` reuses the
host trainer's clean forward (its graph for g via `torch.autograd.grad(ctx.loss, aux, retain_graph=True)`, its
hooked hidden states as targets), runs one perturbed forward of the decoder backbone (no LM head), and returns
`lam * L_cons`; the trainer's single backward then covers both branches (one backward per micro-step).

Execution plans (`exec`): `retain` keeps the host graph and runs the perturbed branch as a second forward.
With activation checkpointing the backward recomputes every module called inside a checkpointed decoder
layer, hooks included, so a hook must reproduce the perturbation of the forward it recomputes; `stacked`
marks the perturbed forward by its batch size (one copy of row 0 is stacked in front: B + 1 rows, dropped
from the loss) and keeps delta set until the next host forward, so the recompute of either branch sees its
own state. `auto` picks `stacked` when checkpointing is on and a hook sits inside the checkpointed layers
(the LoRA modes); `reps` hooks the decoder layers themselves, which transformers 5 keeps outside the
checkpoint, so `retain` is exact there.

Conventions and departures from the paper / official code:
- Response tokens are positions t with labels[t] != -100 (unshifted: the hidden state at the position of a
  response token), as in the official code.
- Default `aux: reps` (the lead's choice for this package; the paper's main variant and the spec's default
  is `lora`, pass `aux: lora` for it). RepS is the paper's RepS (zero vectors each step, delta = alpha g/||g||),
  not the released RepS code (persistent randn vectors with their own Adam, rotation injection).
- The consistency is normalised like the host loss: with `average_tokens_across_devices` and several ranks,
  by the global number of response tokens (so two processes give the single process's value).
- `sync_ascent_grad: false` (code): each rank uses its local gradient for delta; `true` all-reduces g first.
- `stacked` is not the spec's [x; x] batch: the clean branch is the host's own forward, so only one marker row
  is added to the perturbed branch.
- `reps`: the trainer's backward also computes (and drops) gradients for the zero steering vectors, which are
  leaves of the host graph (one sum per layer). The LoRA modes skip that: their clean-pass perturbation at zero
  is `auxiliaries.ZeroAuxLinear`, which copies the output instead of multiplying by zeros and yields dL/dB only
  while the ascent gradient is taken.
- Under a DeepSpeed engine the ascent gradient comes from one more clean forward of the unwrapped module
  (see `LfU._loss_for_ascent`), so that plan costs three forwards, like the official LoRA code.
- Checkpointed state: only the number of `fresh` batches drawn (each epoch of that stream is a permutation
  seeded by (seed, rank, epoch), so a resume continues it exactly); the A factors are re-drawn from `seed`, the
  steering vectors start at 0 every step.
- Every gradient-enabled training forward of the top model opens a new clean pass; a regularizer placed before
  LfU that runs its own forward of the top model inside `loss_terms` would replace the host's (not supported).
- Not offered: `inplace_code_compat`, `reps_code_compat`, `logit_kl`, `last_layer_post_norm`, redrawing A.

Modules: `formulas.py` (the pure math), `micro_step.py` (the hook state of one micro-step), `auxiliaries.py`
(reps / aux lora / PEFT adapter shadows behind one interface), `fresh_batches.py` (`ascent_batch: fresh`),
`regularizer.py` (the `lfu` regularizer: options, hooks, the step).
"""

from llmreg.regularizers.lfu.formulas import ascent_delta, consistency, kaiming_uniform, response_mask, select_layers
from llmreg.regularizers.lfu.regularizer import LfU, LfUOptions

__all__ = ["LfU", "LfUOptions", "ascent_delta", "consistency", "kaiming_uniform", "response_mask", "select_layers"]
