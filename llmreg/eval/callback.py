"""`EvalSuiteCallback`: run a (small, `limit`ed) suite every N optimizer steps on the in-memory model.

The scores come from `llmreg.eval.run.evaluate_suite`, the same function `llmreg eval` uses, so a value
logged during training equals what the report would say for that model state. They are logged as
`eval/<task>` through `transformers.Trainer.log`: they land in `trainer.state.log_history`, in every
`on_log` callback (the recipe's metrics.jsonl) and in any `report_to` integration.

How it departs from a plain "evaluate in a callback":
- A callback does not see the trainer, and only `Trainer.log` reaches log_history and the integrations,
  so the callback holds the trainer (`EvalSuiteCallback(..., trainer=t)` or `attach(t)`).
- It calls the base `transformers.Trainer.log`, not the trainer's own: TRL's `log` folds its accumulated
  train metrics (token accuracy, entropy) into whatever row is logged and clears them, so logging an eval
  row through it would steal them from the next loss row.
- lm-eval's `simple_evaluate` reseeds python/numpy/torch; the RNG states are restored afterwards, so the
  dropout masks and data order of the rest of training do not depend on whether it was evaluated.
- Only rank 0 evaluates and logs. That is correct when every rank holds the whole model (DDP, ZeRO-1/2):
  the other ranks simply wait at the next collective. Under ZeRO-3 or FSDP a rank holds only a shard of
  each weight, so evaluating it alone is impossible; the callback refuses those setups.
"""

from __future__ import annotations

import os
import random
from typing import Any

from transformers import TrainerCallback

from llmreg.core.options import ConfigError

PREFIX = "eval/"


class EvalSuiteCallback(TrainerCallback):
    """Every `every_steps` optimizer steps: `evaluate_suite(suite, model, limit=limit)` -> log `eval/<task>`."""

    def __init__(
        self,
        suite: Any,
        every_steps: int,
        limit: int | None = None,
        trainer: Any = None,
        tokenizer: Any = None,
        batch_size: int = 4,
    ) -> None:
        from llmreg.eval.suite import load_suite

        if not isinstance(every_steps, int) or isinstance(every_steps, bool) or every_steps < 1:
            raise ConfigError(f"eval_during_training.every_steps: expected an integer >= 1, got {every_steps!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"eval_during_training.limit: expected an integer >= 1 or None, got {limit!r}")
        self.suite = load_suite(suite) if isinstance(suite, (str, os.PathLike)) else suite
        self.every_steps = every_steps
        self.limit = limit
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.trainer = None
        if trainer is not None:
            self.attach(trainer)

    def attach(self, trainer: Any) -> EvalSuiteCallback:
        """Hold `trainer` (for its log) and register with it; refuses sharded-weight setups right away."""
        check_not_sharded(trainer.args)
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        check_not_sharded(args)
        if self.trainer is None:
            raise ConfigError(
                "EvalSuiteCallback needs the trainer to log through: build it with trainer=... "
                "or call callback.attach(trainer) instead of trainer.add_callback(callback)"
            )

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every_steps != 0:
            return
        if state.is_world_process_zero:
            scores = self.evaluate(
                model if model is not None else self.trainer.model, self.tokenizer or processing_class
            )
            import transformers

            # the base Trainer.log on purpose: see the module docstring (TRL's log would take its train metrics).
            # Its on_log event clears control.should_log, which DefaultFlowCallback set for this step's loss
            # row: keep the flag, or the loss would go unlogged at every evaluated step.
            should_log = control.should_log
            transformers.Trainer.log(self.trainer, {f"{PREFIX}{task}": value for task, value in scores.items()})
            control.should_log = should_log
            self.trainer.control.should_log = should_log
        return control

    def evaluate(self, model: Any, tokenizer: Any):
        """`evaluate_suite` on `model` as it is now; restores its train mode and the global RNG states."""
        from llmreg.eval.run import evaluate_suite

        was_training = model.training
        rng = _rng_state()
        try:
            return evaluate_suite(self.suite, model, tokenizer, limit=self.limit, batch_size=self.batch_size)
        finally:
            _set_rng_state(rng)
            model.train(was_training)  # HFLM puts the model in eval mode


def check_not_sharded(args: Any) -> None:
    """ConfigError under ZeRO-3 or FSDP: one rank's partitioned weights cannot be evaluated alone."""
    stage = _zero_stage(args)
    if stage == 3:
        raise ConfigError(
            "eval during training does not support DeepSpeed ZeRO-3: its weights are partitioned "
            "across ranks, so rank 0 cannot evaluate the model alone; use ZeRO-2, or evaluate the "
            "saved checkpoints with `llmreg eval`"
        )
    if getattr(args, "fsdp", None):
        raise ConfigError(
            "eval during training does not support FSDP (sharded weights); evaluate the saved "
            "checkpoints with `llmreg eval`"
        )


def _zero_stage(args: Any) -> int:
    hf_config = getattr(args, "hf_deepspeed_config", None)  # set by TrainingArguments when deepspeed is given
    config = getattr(hf_config, "config", None)
    if config is None and getattr(args, "deepspeed", None) is not None:
        from llmreg.integrations.deepspeed import load_deepspeed_config

        config = load_deepspeed_config(args.deepspeed)
    stage = ((config or {}).get("zero_optimization") or {}).get("stage", 0)
    return stage if isinstance(stage, int) else 0


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
