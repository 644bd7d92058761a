"""Every version-sensitive access to `trl.GRPOTrainer` internals, in one place (pinned by
tests/test_integrations_trl.py), and the GRPO hook protocol for regularizers.

Written against trl 1.16. What is relied on:

- `GRPOTrainer._generate_and_score_completions(inputs) -> dict`: the generation batch (prompt_ids, prompt_mask,
  completion_ids, completion_mask, advantages, num_items_in_batch, optional tool_mask), which `_prepare_inputs`
  then shuffles and splits along the first dimension (any extra tensor key goes along).
- `GRPOTrainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, ...)
  -> (logps, entropies, aux)`: called once per micro-batch in `_compute_loss` (with grad, entropies on) and,
  under `no_grad`, for the old log-probs when `_old_logps_computed_by_trl` holds (then the policy, before any
  reference pass).
- The fused LM head (`trl.trainer.utils.add_fused_lm_head`): the model's backbone is `<model>.base_model`, its
  output `.last_hidden_state`; `maybe_gather_lm_head_ctx` gathers a ZeRO-3 partitioned head. Its per-token
  log-probs include the model's logit scaling / softcapping (read from the config as `core.output_head` does).
- `SFTTrainer.aux_loss_enabled` / `router_aux_loss_coef`: the MoE router loss SFT adds (`sft_router_aux`).
- `_compute_loss`'s normalisation per `loss_type` (`aggregate_like_loss`).

`GRPOHooks` is mixed into `RegGRPOTrainer` ahead of the regularizer mixin; with an empty stack (or one without
GRPO hooks) each override delegates straight to the parent. A regularizer that wants GRPO's hook points mixes in
`GRPOHookRegularizer` (the protocol); the core `Regularizer` knows nothing of GRPO.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

LINEAR_LOSS_TYPES = ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo")


@dataclass
class RolloutHidden:
    """One chunk of the data-generating policy's pass over the generation batch (no grad).

    `hidden` [b, K, H]: final hidden states at the positions that predict the K completion tokens;
    `targets` [b, K]: those tokens; `rows`: the chunk's rows in the local generation batch;
    `weight`/`bias`: the LM head, gathered under ZeRO-3 while the chunk is handled; `temperature`: TRL's.
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    rows: slice
    weight: torch.Tensor
    bias: torch.Tensor | None
    temperature: float


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The model TRL patched with its fused head (under PEFT, the base model with the adapters in it)."""
    from accelerate.utils import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model


def check_plain_lm_head(model: torch.nn.Module) -> str | None:
    """Why the logits cannot be formed from the final hidden states and the LM head (then the model's own output
    transform, `llmreg.core.output_head`), or None when they can: vision-language text configs are refused."""
    config = causal_lm(model).config
    if config.get_text_config() is not config:
        return "vision-language models are not supported"
    return None


def sft_router_aux(trainer: Any) -> tuple[bool, float] | None:
    """(enabled, coefficient) of the MoE router auxiliary loss TRL's SFTTrainer adds to its loss (averaged over
    the accumulation window), or None when `trainer` is not an SFTTrainer (then the model's own rule holds)."""
    if not hasattr(trainer, "aux_loss_enabled"):
        return None
    return bool(trainer.aux_loss_enabled), float(getattr(trainer, "router_aux_loss_coef", 0.0) or 0.0)


def unsupported_loss_type(trainer: Any) -> str | None:
    """Why a per-token term cannot join this trainer's loss, or None (`aggregate_like_loss` knows the type)."""
    if trainer.loss_type not in LINEAR_LOSS_TYPES:
        return f"loss_type {trainer.loss_type!r} is not supported; use one of {', '.join(LINEAR_LOSS_TYPES)}"
    return None


def old_logps_computed_by_trl(trainer: Any) -> bool:
    """Whether `_generate_and_score_completions` runs its own no-grad pass for the old log-probs (trl 1.16)."""
    generate_every = trainer.args.steps_per_generation * trainer.num_iterations
    return trainer.args.gradient_accumulation_steps % generate_every != 0 or bool(
        trainer.use_vllm and trainer.vllm_importance_sampling_correction
    )


def response_mask(inputs: dict[str, Any]) -> torch.Tensor:
    """The tokens `_compute_loss` trains on."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


def aggregate_like_loss(
    trainer: Any, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any]
) -> torch.Tensor:
    """`per_token` [B, T] reduced exactly as `_compute_loss` reduces its per-token loss for `trainer.loss_type`,
    in the units the regularizer mixin expects (it divides by the accumulation steps afterwards, as TRL does
    for every loss type; for dapo/cispo/vespo TRL's normaliser already contains that factor)."""
    loss_type = trainer.loss_type
    mask = mask.to(per_token.dtype)
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * trainer.max_completion_length)
    if loss_type in ("dapo", "cispo", "vespo"):
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        return (per_token * mask).sum() / (normalizer / trainer.args.steps_per_generation)
    if loss_type == "luspo":
        return (per_token * mask).sum(-1).mean()
    raise ValueError(f"loss_type {loss_type!r} is not supported by per-token regularizers ({LINEAR_LOSS_TYPES})")


def gather_values(trainer: Any, values: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of different length per rank, concatenated over all ranks."""
    if trainer.accelerator.num_processes == 1:
        return values
    sentinel = torch.finfo(values.dtype).min
    padded = trainer.accelerator.pad_across_processes(values, dim=0, pad_index=sentinel)
    gathered = trainer.accelerator.gather(padded)
    return gathered[gathered != sentinel]


@contextlib.contextmanager
def _gathered_head(lm_head: torch.nn.Module):
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias):
        yield lm_head.weight, lm_head.bias


class GRPOHookRegularizer:
    """The GRPO hook protocol: mix in ahead of `Regularizer` (`class LpReg(GRPOHookRegularizer, Regularizer)`).

    Once per generation batch, `GRPOHooks` calls, on every regularizer of the stack that implements this:
        on_rollout_hidden(chunk)    the data-generating policy's final hidden states, chunk by chunk, no grad
                                    (only when `needs_rollout_hidden`; from TRL's own no-grad old-log-prob pass
                                    when it runs one, else from one extra eval-mode pass)
        on_generation_batch(batch)  may add per-sample tensors that TRL shuffles and splits with the batch; each
                                    micro-batch's slice reaches `loss_terms` in `ctx.inputs`
    With `needs_step_hidden`, each training micro-batch's final hidden states (with grad), the LM head and the
    temperature are in `ctx.extras` (`hidden_states`, `lm_head`, `temperature`) next to TRL's `per_token_logps`
    and `entropies`.
    """

    needs_rollout_hidden: bool = False
    needs_step_hidden: bool = False

    def on_rollout_hidden(self, chunk: RolloutHidden) -> None:
        """One chunk of the policy's pass over the generation batch (see `RolloutHidden`)."""

    def on_generation_batch(self, batch: dict[str, Any], trainer: Any) -> None:
        """After a generation batch was generated and scored (training only)."""


def _grpo_members(stack: Any) -> list[GRPOHookRegularizer]:
    return [reg for reg in stack if isinstance(reg, GRPOHookRegularizer)]


def _needs_rollout_hidden(stack: Any) -> bool:
    return any(reg.needs_rollout_hidden for reg in _grpo_members(stack))


def _needs_step_hidden(stack: Any) -> bool:
    return any(reg.needs_step_hidden for reg in _grpo_members(stack))


class GRPOHooks:
    """Generic GRPO hook points for regularizers: rollout hidden states, generation-batch tensors, and the
    per-token log-probs / entropies of each training micro-batch (`LossContext.extras`)."""

    _reg_rollout_pending = False
    _reg_step_capture: dict[str, Any] | None = None

    def _reg_rollout_active(self) -> bool:
        return len(self.reg_stack) > 0 and self.model.training

    def _generate_and_score_completions(self, inputs):
        if not self._reg_rollout_active():
            return super()._generate_and_score_completions(inputs)
        want_hidden = _needs_rollout_hidden(self.reg_stack)
        self._reg_rollout_pending = want_hidden and old_logps_computed_by_trl(self)
        self._reg_rollout_fused = False
        try:
            batch = super()._generate_and_score_completions(inputs)
        finally:
            self._reg_rollout_pending = False
        if want_hidden and not self._reg_rollout_fused:
            self._reg_rollout_pass(batch)
        for reg in _grpo_members(self.reg_stack):
            reg.on_generation_batch(batch, self)
        return batch

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._reg_rollout_pending and not torch.is_grad_enabled() and model is self.model:
            # TRL's old-log-prob pass of the policy: the proxy rides along on its backbone output
            self._reg_rollout_pending = False
            self._reg_rollout_fused = True
            with self._reg_capture_hidden(logits_to_keep):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
                )
        if not (torch.is_grad_enabled() and len(self.reg_stack)):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        hidden: list[torch.Tensor] = []
        handle = None
        if _needs_step_hidden(self.reg_stack):
            handle = causal_lm(self.model).base_model.register_forward_hook(
                lambda module, args_, output: hidden.append(output.last_hidden_state[:, -logits_to_keep - 1 : -1])
            )
        try:
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        finally:
            if handle is not None:
                handle.remove()
        self._reg_step_capture = {"per_token_logps": result[0], "entropies": result[1]}
        if hidden:
            self._reg_step_capture["hidden_states"] = torch.cat(hidden, dim=0)
            self._reg_step_capture["lm_head"] = causal_lm(self.model).get_output_embeddings()
            self._reg_step_capture["temperature"] = self.temperature
        return result

    def _reg_loss_extras(self) -> dict[str, Any]:
        extras, self._reg_step_capture = self._reg_step_capture or {}, None
        return extras

    # -- the rollout pass ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reg_capture_hidden(self, logits_to_keep: int):
        lm = causal_lm(self.model)
        state = {"row": 0}

        def hook(module, args, kwargs, output):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._reg_emit_hidden(output.last_hidden_state, ids, logits_to_keep, state["row"])
            state["row"] += ids.size(0)

        handle = lm.base_model.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _reg_emit_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, k: int, row: int) -> None:
        lm_head = causal_lm(self.model).get_output_embeddings()
        with _gathered_head(lm_head) as (weight, bias):
            chunk = RolloutHidden(
                hidden=hidden[:, -k - 1 : -1],
                targets=input_ids[:, -k:],
                rows=slice(row, row + input_ids.size(0)),
                weight=weight,
                bias=bias,
                temperature=self.temperature,
            )
            for reg in _grpo_members(self.reg_stack):
                if reg.needs_rollout_hidden:
                    reg.on_rollout_hidden(chunk)

    def _reg_rollout_pass(self, batch: dict[str, Any]) -> None:
        """One extra no-grad pass of the data-generating policy (eval mode), when TRL ran none."""
        if any(key in batch for key in ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids")):
            raise NotImplementedError("regularizers that need rollout hidden states support text-only models")
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        k = batch["completion_ids"].size(1)
        chunk = self.args.per_device_train_batch_size
        backbone = causal_lm(self.model).base_model
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, input_ids.size(0), chunk):
                    ids, am = input_ids[start : start + chunk], attention_mask[start : start + chunk]
                    with self.accelerator.autocast():
                        hidden = backbone(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
                    self._reg_emit_hidden(hidden, ids, k, start)
                    del hidden
        finally:
            self.model.train(was_training)
