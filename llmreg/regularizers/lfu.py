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
  no `autograd.grad` ever runs with respect to DeepSpeed-managed parameters (DESIGN trap 9, ZeRO-2), and no
  adapter weight is read outside its own module's forward (ZeRO-3).

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
  is `_ZeroAuxLinear`, which copies the output instead of multiplying by zeros and yields dL/dB only while the
  ascent gradient is taken.
- Under a DeepSpeed engine the ascent gradient comes from one more clean forward of the unwrapped module
  (see `loss_terms`), so that plan costs three forwards, like the official LoRA code.
- Checkpointed state: only the number of `fresh` batches drawn (each epoch of that stream is a permutation
  seeded by (seed, rank, epoch), so a resume continues it exactly); the A factors are re-drawn from `seed`, the
  steering vectors start at 0 every step.
- Every gradient-enabled training forward of the top model opens a new clean pass; a regularizer placed before
  LfU that runs its own forward of the top model inside `loss_terms` would replace the host's (not supported).
- Not offered: `inplace_code_compat`, `reps_code_compat`, `logit_kl`, `last_layer_post_norm`, redrawing A.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from llmreg.core import ConfigError, Order, Regularizer, Requirements, option, register

IGNORE_INDEX = -100
LAYER_CONTAINERS = ("layers", "h", "blocks", "layer")
# what the perturbed forward of the decoder backbone gets from the host batch
BACKBONE_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids",
                 "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# -- pure functions ------------------------------------------------------------------------------------

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
            raise ConfigError(f"lfu: layers {bad} match no decoder layer (the model has {n_layers}: "
                              f"0..{n_layers - 1}, or negative from the end)")
        chosen = sorted({i % n_layers for i in requested})
    else:
        chosen = list(range(n_layers))
    return ([-1] if include_embeddings else []) + chosen


def kaiming_uniform(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's LoRA A init (kaiming_uniform_ with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


# -- the regularizer -----------------------------------------------------------------------------------

@dataclass
class LfUOptions:
    lam: float = option(5.0, "consistency weight lambda (paper Table 5: 5; 0.1 and 1 score below plain SFT)")
    alpha: float = option(0.1, "ascent step size on the normalised gradient (paper: 0.1)")
    aux: Literal["reps", "lora"] = option(
        "reps", "auxiliary component: reps (a steering vector per decoder layer) or lora (a zero-initialised LoRA "
        "perturbation of every decoder linear layer; under PEFT LoRA the trained adapter itself)")
    layers: list[int] = option([], "decoder layers whose outputs enter the consistency (default: all)")
    include_embeddings: bool = option(False, "also the embedding output (the official code does)")
    distance: Literal["mse_mean", "sq_l2_sum"] = option(
        "mse_mean", "mse_mean: per-element mean (code); sq_l2_sum: summed over the hidden size (paper Eq. 5; "
        "divide lam by d for the same strength)")
    ascent_batch: Literal["same", "fresh"] = option(
        "same", "same: the ascent gradient from the training batch itself (paper); fresh: from an independent "
        "random batch of the training set (official code)")
    sync_ascent_grad: bool = option(False, "all-reduce the ascent gradient so every rank uses the same delta")
    aux_lora_rank: int = option(8, "rank r of the full fine-tuning LoRA perturbation")
    aux_lora_alpha: float = option(16.0, "LoRA alpha of the perturbation; scale s = alpha / r")
    aux_lora_targets: list[str] = option(
        [], "regexes of the linear modules that get a perturbation (default: every nn.Linear of the decoder layers)")
    grad_norm_eps: float = option(1e-12, "added to the ascent gradient's norm")
    exec: Literal["auto", "retain", "stacked"] = option(
        "auto", "auto: stacked when activation checkpointing is on and the LoRA hooks sit inside the checkpointed "
        "layers, else retain")
    seed: int = option(0, "seed of the fixed A factors (aux lora, full fine-tuning) and of the fresh batches")

    def __post_init__(self) -> None:
        if self.lam < 0 or self.alpha < 0:
            raise ValueError("lam and alpha must be >= 0")
        if self.aux_lora_rank < 1:
            raise ValueError("aux_lora_rank must be >= 1")


@dataclass
class _Pass:
    """Hook state of one micro-step."""

    host_rows: int | None = None  # batch size of the host's clean forward
    pert_rows: int | None = None  # batch size that marks the perturbed forward (stacked plan)
    mode: str | None = None  # "host" | "ascent" | "pert" while one of those forwards runs
    eps: dict[Any, torch.Tensor] = field(default_factory=dict)  # zero leaves of the clean pass, by key
    delta: dict[Any, torch.Tensor] = field(default_factory=dict)  # the ascent step, same keys
    host_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # -1: embeddings, 0..L-1 layers
    pert_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    autocast: tuple | None = None  # (device type, dtype) when the host forward ran under autocast


@register("lfu")
class LfU(Regularizer):
    """Learning from the Undesirable (arXiv 2511.13052): consistency with a one-step gradient-ascent copy."""

    options_cls = LfUOptions
    order = Order.OBJECTIVE
    # hidden states come from hooks on the host's forward: only trainers whose compute_loss runs one plain
    # forward of the policy on the batch (DPO / GRPO run concatenated or generated batches)
    requires = Requirements(trainers=("hf", "sft"))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._state = _Pass()
        self._model: torch.nn.Module | None = None
        self._layers: list[torch.nn.Module] = []
        self._selected: list[int] = []
        self._mode_kind = "reps"  # reps | lora_full | lora_peft
        self._aux_a: dict[Any, torch.Tensor] = {}  # fixed A factors (lora_full), fp32 on CPU
        self._aux_a_cast: dict[tuple, torch.Tensor] = {}
        self._plan: str | None = None
        self._ascent_active = [False]  # True only while the ascent gradient is taken (read by _ZeroAuxLinear)
        self._fresh_data = None  # the train dataset, columns filtered like the trainer's (ascent_batch fresh)
        self._fresh_drawn = 0  # fresh batches drawn so far on this rank (checkpointed)
        self._sums: dict[str, float] = {}
        self._count = 0

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, trainer: Any) -> None:
        self._model = model
        self._trainer = trainer
        decoder = _decoder_of(model)
        self._layers = _decoder_layers(decoder)
        self._decoder = decoder
        self._selected = select_layers(self.options.layers, len(self._layers), self.options.include_embeddings)
        self.add_hook(model.register_forward_pre_hook(self._open_host))
        self.add_hook(model.register_forward_hook(self._close_host))
        for index, layer in enumerate(self._layers):
            self.add_hook(layer.register_forward_hook(self._layer_hook(index)))
        if self.options.include_embeddings:
            self.add_hook(self._layers[0].register_forward_pre_hook(self._embedding_hook, with_kwargs=True))
        if self.options.aux == "reps":
            self._mode_kind = "reps"
        elif _is_peft(model):
            self._mode_kind = "lora_peft"
            self._setup_peft()
        else:
            self._mode_kind = "lora_full"
            self._setup_full_lora()

    def _setup_full_lora(self) -> None:
        patterns = [re.compile(p) for p in self.options.aux_lora_targets]
        gen = torch.Generator().manual_seed(self.options.seed)
        count = 0
        for index, layer in enumerate(self._layers):
            for name, module in layer.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                full = f"{index}.{name}"
                if patterns and not any(p.search(full) for p in patterns):
                    continue
                key = ("lora", full)
                self._aux_a[key] = kaiming_uniform(self.options.aux_lora_rank, module.in_features, gen)
                self.add_hook(module.register_forward_hook(self._full_lora_hook(key)))
                count += 1
        if not count:
            raise ConfigError(f"lfu: aux_lora_targets {self.options.aux_lora_targets} match no linear layer of the "
                              "decoder")

    def _setup_peft(self) -> None:
        count = 0
        for index, layer in enumerate(self._layers):
            for name, module in layer.named_modules():
                lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
                if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict):
                    continue
                if getattr(module, "lora_variant", None):
                    raise ConfigError("lfu: DoRA and other LoRA variants are not supported with aux: lora")
                for adapter in lora_a.keys():
                    key = f"{index}.{name}.{adapter}"
                    self.add_hook(lora_a[adapter].register_forward_hook(self._adapter_hook(("A", key))))
                    self.add_hook(lora_b[adapter].register_forward_hook(self._adapter_hook(("B", key))))
                    count += 1
        if not count:
            raise ConfigError("lfu: aux lora under PEFT found no LoRA adapter inside the decoder layers")

    # -- hooks ----------------------------------------------------------------------------------------
    def _open_host(self, module, args):
        if self._state.mode is not None or not (module.training and torch.is_grad_enabled()):
            return
        self._state = _Pass(mode="host")

    def _close_host(self, module, args, output):
        if self._state.mode == "host":
            self._state.mode = None

    def _aux_value(self, key: Any, rows: int, make: Any) -> torch.Tensor | None:
        """The auxiliary tensor this call adds: delta in the perturbed branch (or its recompute), a zero leaf in
        the clean pass (created on first use, reused by its recompute), None outside training."""
        st = self._state
        if st.mode == "pert" or (st.mode is None and st.pert_rows is not None and rows == st.pert_rows):
            return st.delta.get(key)
        if st.mode in ("host", "ascent"):
            if st.mode == "host":
                st.host_rows = rows
            leaf = st.eps.get(key)
            if leaf is None:
                leaf = st.eps[key] = make().requires_grad_(True)
            return leaf
        if st.mode is None and torch.is_grad_enabled() and rows == st.host_rows:
            return st.eps.get(key)  # checkpoint recompute of the clean pass
        return None

    def _layer_hook(self, index: int):
        def hook(module, args, output):
            h = _hidden(output)
            if h.dim() != 3:
                raise RuntimeError(f"lfu: decoder layer {index} returned a hidden state of shape {tuple(h.shape)}, "
                                   "expected [batch, tokens, hidden]")
            if self._state.mode == "host" and index == 0:
                self._state.autocast = _autocast_state(h.device.type)
            if self._mode_kind == "reps":
                vec = self._aux_value(("reps", index), h.shape[0],
                                      lambda: torch.zeros(h.shape[-1], dtype=h.dtype, device=h.device))
                if vec is not None:
                    h = h + vec
                    output = _replace_hidden(output, h)
            self._capture(index, h)
            return output

        return hook

    def _embedding_hook(self, module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        if torch.is_tensor(h):
            self._capture(-1, h)

    def _capture(self, index: int, h: torch.Tensor) -> None:
        mode = self._state.mode
        if mode == "host":
            self._state.host_hidden[index] = h
        elif mode == "pert":
            self._state.pert_hidden[index] = h

    def _full_lora_hook(self, key: Any):
        scale = self.options.aux_lora_alpha / self.options.aux_lora_rank

        def hook(module, args, output):
            x = args[0]
            b = self._aux_value(key, x.shape[0], lambda: torch.zeros(
                module.out_features, self.options.aux_lora_rank, dtype=x.dtype, device=x.device))
            if b is None:
                return output
            a = self._cast_a(key, x)
            if b.requires_grad:  # the zero leaf of the clean pass
                return _ZeroAuxLinear.apply(output, x, b, a, scale, self._ascent_active)
            # one fused GEMM-and-add (output + scale * (A x) delta^T): no separate scaled [tokens, out] temporaries
            u = F.linear(x, a).reshape(-1, a.shape[0])
            return torch.addmm(output.reshape(-1, output.shape[-1]), u, b.t(), alpha=scale).view_as(output)

        return hook

    def _cast_a(self, key: Any, x: torch.Tensor) -> torch.Tensor:
        ck = (key, x.device, x.dtype)
        a = self._aux_a_cast.get(ck)
        if a is None:
            a = self._aux_a_cast[ck] = self._aux_a[key].to(device=x.device, dtype=x.dtype)
        return a

    def _adapter_hook(self, key: Any):
        def hook(module, args, output):
            x = args[0]
            e = self._aux_value(key, x.shape[0], lambda: torch.zeros(
                module.out_features, module.in_features, dtype=x.dtype, device=x.device))
            if e is None:
                return output
            if e.requires_grad:  # the zero shadow of the clean pass
                return _ZeroAuxLinear.apply(output, x, e, None, 1.0, self._ascent_active)
            return output + F.linear(x, e)

        return hook

    # -- the step -------------------------------------------------------------------------------------
    def loss_terms(self, ctx) -> dict[str, torch.Tensor]:
        st = self._state
        if st.host_rows is None or not st.host_hidden:
            raise RuntimeError("lfu: the host forward did not pass through the model's decoder layers; LfU needs a "
                               "trainer whose compute_loss runs the model on the training batch")
        plan = self._resolve_plan()
        # with sync_ascent_grad the ranks' gradients are averaged, so each must be the gradient of a token *sum*
        # (a per-rank mean would weight ranks with fewer response tokens up); without it the scale is irrelevant
        sync = self.options.sync_ascent_grad
        if self.options.ascent_batch == "fresh":
            batch = ctx.trainer._prepare_inputs(self._next_fresh_batch(ctx.trainer))
            loss_for_g = self._ascent_loss(batch) * (_lm_token_count(batch) if sync else 1.0)
        elif _is_deepspeed_engine(ctx.model):
            # DeepSpeed >= 0.18 hooks the engine's outputs so that any backward through them runs its gradient
            # prologue/epilogue (reduction, ZeRO bookkeeping): autograd.grad through ctx.loss would trigger it.
            # The ascent gradient comes from a clean forward of the unwrapped module instead (one more forward).
            loss_for_g = self._ascent_loss(ctx.inputs) * (_lm_token_count(ctx.inputs) if sync else 1.0)
        elif sync and ctx.num_items_in_batch is None:
            loss_for_g = ctx.loss * _lm_token_count(ctx.inputs)
        else:
            loss_for_g = ctx.loss  # with num_items_in_batch: normalised by the global count, a scaled sum
        keys = list(st.eps)
        self._ascent_active[0] = True
        try:
            grads = torch.autograd.grad(loss_for_g, [st.eps[k] for k in keys], retain_graph=True, allow_unused=True)
        finally:
            self._ascent_active[0] = False
        grads = [torch.zeros_like(st.eps[k]) if g is None else g for k, g in zip(keys, grads)]
        if self.options.sync_ascent_grad:
            _all_reduce_mean(grads)
        deltas, norm = ascent_delta(grads, self.options.alpha, self.options.grad_norm_eps)
        st.delta = dict(zip(keys, deltas))

        inputs = {k: v for k, v in ctx.inputs.items() if k in BACKBONE_KEYS and v is not None}
        rows = st.host_rows
        if plan == "stacked":
            if any(k in inputs for k in PACKED_KEYS):
                raise ConfigError("lfu: exec 'stacked' (activation checkpointing with aux lora) does not support "
                                  "padding-free packed batches")
            inputs = {k: torch.cat([v[:1], v]) if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
                      for k, v in inputs.items()}
            st.pert_rows = rows + 1
        st.mode = "pert"
        try:
            # accelerate's mixed precision wraps the top model's forward in autocast; this call bypasses it
            with _same_autocast(st.autocast):
                self._decoder(**inputs, use_cache=False)
        finally:
            st.mode = None
        if plan == "retain":
            st.pert_rows = None
        wanted = self._selected
        targets = [st.host_hidden[i].detach() for i in wanted]
        perturbed = [st.pert_hidden[i][1:] if plan == "stacked" else st.pert_hidden[i] for i in wanted]
        mask = response_mask(ctx.inputs)
        count = self._token_count(mask, ctx.trainer)
        cons = consistency(targets, perturbed, mask, self.options.distance, count=count)
        st.host_hidden.clear()
        st.pert_hidden.clear()
        self._sums["l_cons"] = self._sums.get("l_cons", 0.0) + float(cons.detach())
        self._sums["ascent_grad_norm"] = self._sums.get("ascent_grad_norm", 0.0) + norm
        self._count += 1
        return {"consistency": self.options.lam * cons}

    def _resolve_plan(self) -> str:
        checkpointing = any(getattr(layer, "gradient_checkpointing", False) for layer in self._layers)
        retain_is_exact = not checkpointing or (self._mode_kind == "reps" and _hooks_outside_checkpoint(self._layers[0]))
        if self.options.exec == "retain" and not retain_is_exact:
            raise ConfigError("lfu: exec 'retain' with activation checkpointing would recompute the perturbed branch "
                              "without its perturbation; use exec 'auto' or 'stacked'")
        if self.options.exec != "auto":
            return self.options.exec
        return "retain" if retain_is_exact else "stacked"

    def _token_count(self, mask: torch.Tensor | None, trainer: Any) -> float | None:
        """The host's normalisation: with `average_tokens_across_devices`, global tokens / world size."""
        import torch.distributed as dist

        if mask is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        if not getattr(getattr(trainer, "args", None), "average_tokens_across_devices", False):
            return None
        total = mask.sum().to(torch.float64).reshape(1)
        dist.all_reduce(total)
        return float(total) / dist.get_world_size()

    def _ascent_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The model's own LM loss on `batch` (a fresh batch, or the host batch under DeepSpeed), through the
        unwrapped model with the clean pass's zero aux leaves; its graph is freed by autograd.grad."""
        if not torch.is_tensor(batch.get("labels")):
            raise ConfigError("lfu: the ascent gradient needs batches with labels")
        st = self._state
        st.mode = "ascent"
        try:
            with _same_autocast(st.autocast):
                out = self._model(**{k: v for k, v in batch.items() if k in BACKBONE_KEYS or k == "labels"},
                                  use_cache=False)
        finally:
            st.mode = None
        if getattr(out, "loss", None) is None:
            raise ConfigError("lfu: the model returned no loss for the ascent batch")
        return out.loss

    def _next_fresh_batch(self, trainer: Any) -> dict[str, Any]:
        """Batch number `_fresh_drawn` of this rank's fresh stream: epoch e is a permutation drawn from
        (seed, rank, e), so a resumed run continues the stream exactly from the saved count."""
        import torch.distributed as dist

        if self._fresh_data is None:
            dataset = trainer.train_dataset
            if getattr(trainer.args, "remove_unused_columns", False) and hasattr(dataset, "column_names"):
                dataset = trainer._remove_unused_columns(dataset, description="lfu fresh batches")
            if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
                raise ConfigError("lfu: ascent_batch 'fresh' needs a sized, non-empty train_dataset")
            self._fresh_data = dataset
        dataset, size = self._fresh_data, trainer.args.per_device_train_batch_size
        per_epoch = math.ceil(len(dataset) / size)
        epoch, index = divmod(self._fresh_drawn, per_epoch)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + rank * 1009 + epoch + 1)
        order = torch.randperm(len(dataset), generator=gen)[index * size:(index + 1) * size].tolist()
        self._fresh_drawn += 1
        return trainer.data_collator([dataset[i] for i in order])

    def state_dict(self) -> dict[str, Any]:
        return {"fresh_batches_drawn": self._fresh_drawn} if self.options.ascent_batch == "fresh" else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._fresh_drawn = int(state.get("fresh_batches_drawn", 0))

    def metrics(self) -> dict[str, float]:
        if not self._count:
            return {}
        out = {k: v / self._count for k, v in self._sums.items()}
        self._sums.clear()
        self._count = 0
        return out


class _ZeroAuxLinear(torch.autograd.Function):
    """`output + scale * F.linear(F.linear(x, a), e)` at e = 0 (a = None: `output + F.linear(x, e)`), the clean
    pass's LoRA perturbation: its value is `output`, so the forward only copies it (no [tokens, out] GEMM).
    The backward passes the gradient g through and gives dL/de = scale * g^T (x a^T) only while the ascent
    gradient is taken (`active[0]`); the trainer's backward gets None for e (at e = 0, dL/dx through the
    perturbation is 0 too), so the zero leaves cost nothing there."""

    @staticmethod
    def forward(ctx, output, x, e, a, scale, active):
        ctx.save_for_backward(x, a)
        ctx.scale, ctx.active, ctx.e_dtype = scale, active, e.dtype
        return output.clone()  # a new tensor, not a view: later in-place ops on it stay legal

    @staticmethod
    def backward(ctx, g):
        grad_e = None
        if ctx.active[0]:
            x, a = ctx.saved_tensors
            u = x.reshape(-1, x.shape[-1]).float()  # fp32: under autocast g and x may differ in dtype
            if a is not None:
                u = F.linear(u, a.float())
            grad_e = (ctx.scale * (g.reshape(-1, g.shape[-1]).float().t() @ u)).to(ctx.e_dtype)
        return g, None, grad_e, None, None, None


# -- model structure ---------------------------------------------------------------------------------------

def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def _decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder backbone (embeddings + layers + final norm, no LM head)."""
    base = model.get_base_model() if _is_peft(model) else model
    get = getattr(base, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None:
        raise ConfigError(f"lfu: cannot find the decoder backbone of {type(base).__name__} (no get_decoder())")
    return decoder


def _decoder_layers(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    for name in LAYER_CONTAINERS:
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    raise ConfigError(f"lfu: {type(decoder).__name__} has no decoder-layer list ({', '.join(LAYER_CONTAINERS)})")


def _hooks_outside_checkpoint(layer: torch.nn.Module) -> bool:
    """transformers 5 checkpoints a GradientCheckpointingLayer's `forward`, so hooks on the layer itself are not
    re-run by the recompute (hooks on modules inside it are)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover
        return False
    import transformers

    return isinstance(layer, GradientCheckpointingLayer) and int(transformers.__version__.split(".")[0]) >= 5


def _lm_token_count(batch: dict[str, Any]) -> float:
    """Tokens a causal-LM loss averages over: shifted labels != -100 (1 without labels)."""
    labels = batch.get("labels")
    if not torch.is_tensor(labels):
        return 1.0
    return float(max(int((labels[..., 1:] != IGNORE_INDEX).sum()), 1))


def _is_deepspeed_engine(model: Any) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def _autocast_state(device_type: str) -> tuple | None:
    if torch.is_autocast_enabled(device_type):
        return device_type, torch.get_autocast_dtype(device_type)
    return None


def _same_autocast(state: tuple | None):
    import contextlib

    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=state[0], dtype=state[1])


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)
            t.div_(dist.get_world_size())
