"""`RegularizedTrainerMixin`: runs a `RegularizerStack` inside any HF/TRL trainer.

Where each hook of `regularizer.py` is called from:

- `setup`: end of `__init__` (the parent built the model, PEFT wrapping
  included, but no optimizer or engine exists yet);
- `param_groups`: `create_optimizer` (also used under DeepSpeed when the config
  has no `optimizer` block, which `__init__` enforces when groups are set);
- `on_prepared`: end of `_prepare_for_training`, after accelerate / DeepSpeed
  wrapped the model; regularizer state is loaded right after it on resume
  (state of a `loads_state_early` regularizer at its start, before the
  optimizer is built);
- `loss_terms`: `compute_loss`, training mode only; `ctx.extras` holds trainer-specific tensors of the
  micro-batch (`_reg_loss_extras`; GRPO: per-token log-probs and entropies, from `integrations.trl.GRPOHooks`);
  `training_loss` (one regularizer at most) replaces the parent's `compute_loss` before `loss_terms` run;
- `on_rollout_hidden` / `on_generation_batch` (GRPO only): the `integrations.trl.GRPOHookRegularizer`
  protocol, called by `GRPOHooks` (mixed into RegGRPOTrainer);
- `pre_step`: after the boundary micro-step's backward: from `training_step`
  without DeepSpeed (before the Trainer clips), from the backward shim under
  DeepSpeed (before `engine.step()` clips and steps);
- `post_step`: the `on_optimizer_step` callback;
- metrics: `log`; state: `_save_checkpoint`, per rank, then the checkpoint's completion marker
  (llmreg.integrations.checkpoints), written last by every trainer, empty stack included.

With an empty stack every override delegates straight to the parent, so the
trainer behaves exactly like it (tested for all four trainers).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

import llmreg.core.dist as dist
from llmreg.core.anatomy import is_peft
from llmreg.core.options import ConfigError
from llmreg.core.regularizer import LossContext
from llmreg.core.shards import ShardAccess, zero_stage_of
from llmreg.core.stack import RegularizerStack
from llmreg.integrations.checkpoints import mark_complete
from llmreg.integrations.deepspeed import check_deepspeed_config, install_pre_step_shim

STATE_DIR = "llmreg_regularizers"


def _state_path(checkpoint_dir: str, rank: int) -> str:
    return os.path.join(checkpoint_dir, STATE_DIR, f"rank{rank}.pt")


class _PostStepCallback(TrainerCallback):
    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._reg_post_step()


class RegularizedTrainerMixin:
    """Mix in before a `transformers.Trainer` subclass; adds `regularizers=[...]`."""

    trainer_kind: str = "hf"

    def __init__(self, *args: Any, regularizers: Any = None, **kwargs: Any) -> None:
        stack = RegularizerStack(regularizers or [], trainer_kind=self.trainer_kind)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if stack.any_overrides("param_groups") and getattr(training_args, "deepspeed", None):
            check_deepspeed_config(training_args.deepspeed)
        self.reg_stack = stack
        self._reg_shards: ShardAccess | None = None
        super().__init__(*args, **kwargs)
        if len(stack):
            from transformers.integrations import is_deepspeed_zero3_enabled

            stack.check_environment(zero_stage=3 if is_deepspeed_zero3_enabled() else 0, is_peft=is_peft(self.model))
            stack.call("setup", self.model, self)
            if stack.any_overrides("post_step"):
                self.add_callback(_PostStepCallback(self))

    # -- optimizer groups -----------------------------------------------------------------
    def create_optimizer(self, model: torch.nn.Module | None = None):
        if self.optimizer is not None or not self.reg_stack.any_overrides("param_groups"):
            return super().create_optimizer(model)
        from transformers.trainer_optimizer import is_optimizer_factory

        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        defaults = {n: {"weight_decay": self.args.weight_decay if n in decay else 0.0} for n, _ in named}
        groups = self.reg_stack.optimizer_groups(named, defaults)
        if groups is None:
            return super().create_optimizer(model)
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            raise ConfigError(
                f"optimizer '{self.args.optim}' builds its own parameter groups and cannot be combined with "
                "regularizers that set parameter groups"
            )
        self.reg_param_group_names = [g.pop("names") for g in groups]
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # -- preparation and resume ---------------------------------------------------------
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if resume_from_checkpoint is not None:  # every rank must load the same checkpoint
            dist.check_same_on_every_rank([os.path.basename(str(resume_from_checkpoint))], "resume checkpoint")
        if len(self.reg_stack) and resume_from_checkpoint is not None:
            # fails before the parent loads optimizer state; a saved frozen set is back before the optimizer exists
            self._reg_load_state(resume_from_checkpoint, early=True)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if len(self.reg_stack):
            self._reg_shards = ShardAccess.from_model(self.model, grad_scale=self._reg_grad_scale)
            self.reg_stack.call("on_prepared", self.model, self._reg_shards)
            if resume_from_checkpoint is not None:
                self._reg_load_state(resume_from_checkpoint, early=False)
            if self.is_deepspeed_enabled and self.reg_stack.any_overrides("pre_step"):
                install_pre_step_shim(self.accelerator.deepspeed_engine_wrapped, self._reg_pre_step)
        return model, train_dataloader

    def _reg_grad_scale(self) -> float:
        """Loss scale the local gradients carry right now (fp16 only)."""
        if not self.args.fp16:
            return 1.0
        if self.is_deepspeed_enabled:
            return float(getattr(self.model_wrapped.optimizer, "loss_scale", 1.0))
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _reg_save_state(self, checkpoint_dir: str) -> None:
        rank = self.args.process_index
        path = _state_path(checkpoint_dir, rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"labels": self.reg_stack.labels, "state": self.reg_stack.state_dict()}, path)

    def _reg_state_file(self, checkpoint_dir: str) -> str:
        path = _state_path(checkpoint_dir, self.args.process_index)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {checkpoint_dir} has no regularizer state ({path}); it was saved without "
                f"these regularizers or with another number of processes"
            )
        return path

    def _reg_load_state(self, checkpoint_dir: str, early: bool | None = None) -> None:
        saved = torch.load(self._reg_state_file(checkpoint_dir), map_location="cpu", weights_only=False)
        self.reg_stack.load_state_dict(saved["state"], early=early)

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        # old checkpoints are rotated out only once the new one is complete (a crash in between keeps one)
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if len(self.reg_stack):
            self._reg_save_state(checkpoint_dir)
        mark_complete(checkpoint_dir, self.state.global_step, is_writer=self.args.should_save)  # last
        if limit is not None and self.args.should_save:
            best = self.state.best_model_checkpoint
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit, best_model_checkpoint=best, use_mtime=True)

    # -- per-step hooks -----------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not len(self.reg_stack) or not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        divisor = self._reg_ga_divisor(num_items_in_batch)
        owner = self.reg_stack.loss_owner
        if owner is not None:
            ctx = LossContext(
                model=model,
                inputs=inputs,
                loss=None,
                outputs=None,
                trainer=self,
                num_items_in_batch=num_items_in_batch,
                ga_divisor=divisor,
                token_mean=lambda total, count: self._reg_token_mean(total, count, num_items_in_batch),
            )
            loss, outputs = owner.training_loss(ctx), None
        else:
            want_outputs = return_outputs or self.reg_stack.needs_outputs
            result = super().compute_loss(
                model, inputs, return_outputs=want_outputs, num_items_in_batch=num_items_in_batch
            )
            loss, outputs = result if want_outputs else (result, None)
        ctx = LossContext(
            model=model,
            inputs=inputs,
            loss=loss,
            outputs=outputs,
            trainer=self,
            num_items_in_batch=num_items_in_batch,
            ga_divisor=divisor,
            extras=self._reg_loss_extras(),
        )
        extra = self.reg_stack.loss_terms(ctx)
        if extra is not None:
            loss = loss + extra / divisor
        return (loss, outputs) if return_outputs else loss

    def _reg_loss_extras(self) -> dict[str, Any]:
        """Trainer-specific tensors of the micro-batch just computed (`LossContext.extras`); see integrations.trl."""
        return {}

    def _reg_token_mean(self, token_sum: torch.Tensor, token_count: Any, num_items_in_batch: Any) -> torch.Tensor:
        """A sum over label tokens in the units of the host's own causal-LM loss (`Trainer.compute_loss`,
        `SFTTrainer.compute_loss`): over `num_items_in_batch` (the whole accumulation window, every rank's tokens
        when `average_tokens_across_devices`, hence the factor of processes that DDP's averaging undoes) when the
        host scales for accumulation, else over this micro-batch's `token_count`."""
        if self._reg_loss_is_scaled(num_items_in_batch) and num_items_in_batch is not None:
            loss = token_sum / torch.as_tensor(num_items_in_batch, device=token_sum.device).clamp(min=1)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
            return loss
        return token_sum / torch.as_tensor(token_count, device=token_sum.device).clamp(min=1)

    def _reg_ga_divisor(self, num_items_in_batch: Any) -> int:
        """How to scale a per-micro-batch mean term so it matches the host loss (docs/architecture.md, trap 7).

        When the host loss is already scaled for gradient accumulation (normalised by the token count of the
        whole accumulated batch), `training_step` leaves it alone, so a per-micro-batch mean must be divided by
        the number of accumulation steps here; otherwise `training_step` divides the sum for us.
        """
        return self.current_gradient_accumulation_steps if self._reg_loss_is_scaled(num_items_in_batch) else 1

    def _reg_loss_is_scaled(self, num_items_in_batch: Any) -> bool:
        """Whether the host loss is normalised over the whole accumulation window (`training_step`'s rule)."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return bool(scaled)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if (
            self._reg_shards is not None
            and not self.is_deepspeed_enabled
            and self.accelerator.sync_gradients
            and self.reg_stack.any_overrides("pre_step")
        ):
            self._reg_pre_step()
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # the trainer logs the global pre-clip norm even when it does not clip; a regularizer that clips
        # itself (multipliers) has just computed that norm in pre_step, so it is not computed twice
        if grad_norm is None and not self.is_deepspeed_enabled and len(self.reg_stack):
            grad_norm = self.reg_stack.pop_grad_norm()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _reg_pre_step(self) -> None:
        self.reg_stack.call("pre_step", self._reg_shards)

    def _reg_post_step(self) -> None:
        self.reg_stack.call("post_step", self._reg_shards)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if len(self.reg_stack) and "loss" in logs:
            logs.update(self.reg_stack.pop_metrics())
        super().log(logs, *args, **kwargs)


__all__ = ["RegularizedTrainerMixin", "STATE_DIR", "zero_stage_of"]
