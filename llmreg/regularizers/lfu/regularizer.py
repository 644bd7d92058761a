"""The `lfu` regularizer: options, hooks and the step (the method and its departures: see the package docstring).

Per micro-step `loss_terms` takes the ascent gradient with respect to the clean pass's zero auxiliary tensors,
sets delta, runs the perturbed forward of the decoder backbone, and returns lam * L_cons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

import llmreg.core.dist as dist
from llmreg.core.anatomy import decoder, is_deepspeed_engine, label_token_count, layer_list
from llmreg.core.options import ConfigError, check_fields_in_range
from llmreg.core.registry import register
from llmreg.core.regularizer import Order, Regularizer, Requirements, option
from llmreg.core.running_mean import RunningMean
from llmreg.integrations.hf_access import hooks_outside_checkpoint
from llmreg.regularizers.lfu.auxiliaries import Auxiliary, FixedALora, make_auxiliary
from llmreg.regularizers.lfu.formulas import ascent_delta, consistency, response_mask, select_layers
from llmreg.regularizers.lfu.fresh_batches import FreshBatches
from llmreg.regularizers.lfu.micro_step import (
    ASCENT,
    HOST,
    PERTURBED,
    MicroStep,
    MicroStepTracker,
    autocast_state,
    hidden_of,
    with_hidden,
)

# what the perturbed forward of the decoder backbone gets from the host batch
BACKBONE_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "inputs_embeds",
    "token_type_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class LfUOptions:
    lam: float = option(
        5.0, "consistency weight lambda (paper Table 5: 5; 0.1 and 1 score below plain SFT)", ge=0, warn_above=1e6
    )
    alpha: float = option(0.1, "ascent step size on the normalised gradient (paper: 0.1)", ge=0)
    aux: Literal["reps", "lora"] = option(
        "reps",
        "auxiliary component: reps (a steering vector per decoder layer) or lora (a zero-initialised LoRA "
        "perturbation of every decoder linear layer; under PEFT LoRA the trained adapter itself)",
    )
    layers: list[int] = option([], "decoder layers whose outputs enter the consistency (default: all)")
    include_embeddings: bool = option(False, "also the embedding output (the official code does)")
    distance: Literal["mse_mean", "sq_l2_sum"] = option(
        "mse_mean",
        "mse_mean: per-element mean (code); sq_l2_sum: summed over the hidden size (paper Eq. 5; "
        "divide lam by d for the same strength)",
    )
    ascent_batch: Literal["same", "fresh"] = option(
        "same",
        "same: the ascent gradient from the training batch itself (paper); fresh: from an independent "
        "random batch of the training set (official code)",
    )
    sync_ascent_grad: bool = option(False, "all-reduce the ascent gradient so every rank uses the same delta")
    aux_lora_rank: int = option(8, "rank r of the full fine-tuning LoRA perturbation", ge=1)
    aux_lora_alpha: float = option(16.0, "LoRA alpha of the perturbation; scale s = alpha / r", gt=0)
    aux_lora_targets: list[str] = option(
        [], "regexes of the linear modules that get a perturbation (default: every nn.Linear of the decoder layers)"
    )
    grad_norm_eps: float = option(1e-12, "added to the ascent gradient's norm", ge=0)
    exec: Literal["auto", "retain", "stacked"] = option(
        "auto",
        "auto: stacked when activation checkpointing is on and the LoRA hooks sit inside the checkpointed "
        "layers, else retain",
    )
    seed: int = option(0, "seed of the fixed A factors (aux lora, full fine-tuning) and of the fresh batches", ge=0)

    def __post_init__(self) -> None:
        check_fields_in_range(self)  # the declared ranges, also when the options are built directly


@register("lfu")
class LfU(Regularizer):
    """Learning from the Undesirable (arXiv 2511.13052): consistency with a one-step gradient-ascent copy.

    Example::

        RegSFTTrainer(..., regularizers=[{"name": "lfu", "lam": 5.0}])

    In a recipe: ``regularizers: [{name: lfu, lam: 5.0, aux: reps}]``.
    """

    options_cls = LfUOptions
    order = Order.OBJECTIVE
    # hidden states come from hooks on the host's forward: only trainers whose compute_loss runs one plain
    # forward of the policy on the batch (DPO / GRPO run concatenated or generated batches)
    requires = Requirements(trainers=("hf", "sft"))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._tracker = MicroStepTracker()
        self._model: torch.nn.Module | None = None
        self._layers: list[torch.nn.Module] = []
        self._selected: list[int] = []
        self._aux: Auxiliary | None = None  # set up in `setup`: reps, or aux lora (full or PEFT)
        self._fresh = FreshBatches(self.options.seed)  # ascent_batch fresh
        self._means = RunningMean()

    @property
    def _state(self) -> MicroStep:
        """The hook state of the current micro-step."""
        return self._tracker.step

    @property
    def _aux_a(self) -> dict[Any, torch.Tensor]:
        """The fixed A factors of aux lora under full fine-tuning (empty otherwise)."""
        return self._aux.a_factors if isinstance(self._aux, FixedALora) else {}

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, trainer: Any) -> None:
        self._model = model
        self._trainer = trainer
        body = decoder(model, where="lfu")
        self._layers = layer_list(body, where="lfu")
        self._decoder = body
        self._selected = select_layers(self.options.layers, len(self._layers), self.options.include_embeddings)
        self.add_hook(model.register_forward_pre_hook(self._tracker.open_host))
        self.add_hook(model.register_forward_hook(self._tracker.close_host))
        for index, layer in enumerate(self._layers):
            self.add_hook(layer.register_forward_hook(self._layer_hook(index)))
        if self.options.include_embeddings:
            self.add_hook(self._layers[0].register_forward_pre_hook(self._tracker.embedding_hook, with_kwargs=True))
        self._aux = make_auxiliary(self.options, model, self._tracker)
        self._aux.install(self._layers, self.add_hook)

    def _layer_hook(self, index: int):
        def hook(module, args, output):
            h = hidden_of(output)
            if h.dim() != 3:
                raise RuntimeError(
                    f"lfu: decoder layer {index} returned a hidden state of shape {tuple(h.shape)}, "
                    "expected [batch, tokens, hidden]"
                )
            step = self._tracker.step
            if step.running == HOST and index == 0:
                step.autocast = autocast_state(h.device.type)
            perturbed = self._aux.layer_output(index, h)
            if perturbed is not None:
                h = perturbed
                output = with_hidden(output, h)
            self._tracker.capture(index, h)
            return output

        return hook

    # -- the step -------------------------------------------------------------------------------------
    def loss_terms(self, ctx) -> dict[str, torch.Tensor]:
        st = self._state
        if st.host_rows is None or not st.host_hidden:
            raise RuntimeError(
                "lfu: the host forward did not pass through the model's decoder layers; LfU needs a "
                "trainer whose compute_loss runs the model on the training batch"
            )
        plan = self._resolve_plan()
        norm = self._set_ascent_step(ctx, st)
        perturbed = self._perturbed_forward(ctx.inputs, plan, st)
        targets = [st.host_hidden[i].detach() for i in self._selected]
        mask = response_mask(ctx.inputs)
        count = self._token_count(mask, ctx.trainer)
        cons = consistency(targets, perturbed, mask, self.options.distance, count=count)
        st.host_hidden.clear()
        st.perturbed_hidden.clear()
        self._means.add(l_cons=float(cons.detach()), ascent_grad_norm=norm)
        return {"consistency": self.options.lam * cons}

    def _set_ascent_step(self, ctx, st: MicroStep) -> float:
        """delta = alpha * g / ||g||, g the gradient of the ascent loss at the clean pass's zero leaves; returns
        ||g||."""
        loss_for_g = self._loss_for_ascent(ctx)
        keys = list(st.zero_leaves)
        with self._tracker.taking_ascent_gradient():
            grads = torch.autograd.grad(
                loss_for_g, [st.zero_leaves[k] for k in keys], retain_graph=True, allow_unused=True
            )
        grads = [torch.zeros_like(st.zero_leaves[k]) if g is None else g for k, g in zip(keys, grads)]
        if self.options.sync_ascent_grad:
            dist.all_reduce_mean_(grads)
        deltas, norm = ascent_delta(grads, self.options.alpha, self.options.grad_norm_eps)
        st.delta = dict(zip(keys, deltas))
        return norm

    def _loss_for_ascent(self, ctx) -> torch.Tensor:
        # with sync_ascent_grad the ranks' gradients are averaged, so each must be the gradient of a token *sum*
        # (a per-rank mean would weight ranks with fewer response tokens up); without it the scale is irrelevant
        sync = self.options.sync_ascent_grad
        if self.options.ascent_batch == "fresh":
            batch = ctx.trainer._prepare_inputs(self._fresh.next(ctx.trainer))
            return self._ascent_loss(batch) * (label_token_count(batch) if sync else 1.0)
        if is_deepspeed_engine(ctx.model):
            # DeepSpeed >= 0.18 hooks the engine's outputs so that any backward through them runs its gradient
            # prologue/epilogue (reduction, ZeRO bookkeeping): autograd.grad through ctx.loss would trigger it.
            # The ascent gradient comes from a clean forward of the unwrapped module instead (one more forward).
            return self._ascent_loss(ctx.inputs) * (label_token_count(ctx.inputs) if sync else 1.0)
        if sync and ctx.num_items_in_batch is None:
            return ctx.loss * label_token_count(ctx.inputs)
        return ctx.loss  # with num_items_in_batch: normalised by the global count, a scaled sum

    def _perturbed_forward(self, inputs: dict[str, Any], plan: str, st: MicroStep) -> list[torch.Tensor]:
        """The selected layers' outputs of the decoder backbone at a0 + delta (the marker row dropped)."""
        inputs = {k: v for k, v in inputs.items() if k in BACKBONE_KEYS and v is not None}
        rows = st.host_rows
        if plan == "stacked":
            if any(k in inputs for k in PACKED_KEYS):
                raise ConfigError(
                    "lfu: exec 'stacked' (activation checkpointing with aux lora) does not support "
                    "padding-free packed batches"
                )
            inputs = {
                k: torch.cat([v[:1], v]) if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
                for k, v in inputs.items()
            }
            st.perturbed_rows = rows + 1
        with self._tracker.running(PERTURBED):
            self._decoder(**inputs, use_cache=False)
        if plan == "retain":
            st.perturbed_rows = None
        return [st.perturbed_hidden[i][1:] if plan == "stacked" else st.perturbed_hidden[i] for i in self._selected]

    def _resolve_plan(self) -> str:
        checkpointing = any(getattr(layer, "gradient_checkpointing", False) for layer in self._layers)
        retain_is_exact = not checkpointing or (
            not self._aux.hooks_inside_layers and hooks_outside_checkpoint(self._layers[0])
        )
        if self.options.exec == "retain" and not retain_is_exact:
            raise ConfigError(
                "lfu: exec 'retain' with activation checkpointing would recompute the perturbed branch "
                "without its perturbation; use exec 'auto' or 'stacked'"
            )
        if self.options.exec != "auto":
            return self.options.exec
        return "retain" if retain_is_exact else "stacked"

    def _token_count(self, mask: torch.Tensor | None, trainer: Any) -> float | None:
        """The host's normalisation: with `average_tokens_across_devices`, global tokens / world size."""
        if mask is None or not dist.is_distributed():
            return None
        if not getattr(getattr(trainer, "args", None), "average_tokens_across_devices", False):
            return None
        total = dist.all_reduce_sum_(mask.sum().to(torch.float64).reshape(1))
        return float(total) / dist.world_size()

    def _ascent_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The model's own LM loss on `batch` (a fresh batch, or the host batch under DeepSpeed), through the
        unwrapped model with the clean pass's zero aux leaves; its graph is freed by autograd.grad."""
        if not torch.is_tensor(batch.get("labels")):
            raise ConfigError("lfu: the ascent gradient needs batches with labels")
        with self._tracker.running(ASCENT):
            out = self._model(
                **{k: v for k, v in batch.items() if k in BACKBONE_KEYS or k == "labels"}, use_cache=False
            )
        if getattr(out, "loss", None) is None:
            raise ConfigError("lfu: the model returned no loss for the ascent batch")
        return out.loss

    # -- state and metrics ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"fresh_batches_drawn": self._fresh.drawn} if self.options.ascent_batch == "fresh" else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._fresh.drawn = int(state.get("fresh_batches_drawn", 0))

    def metrics(self) -> dict[str, float]:
        return self._means.pop()
