"""DeepSpeed glue: the backward/step shim and the config check.

Trap 1 (docs/architecture.md, trap 1): accelerate's `DeepSpeedEngineWrapper.backward`
runs `engine.backward(loss)` and then, at the accumulation boundary,
`engine.step()` in the same call. A callback never sees the reduced gradients
before the step. `install_pre_step_shim` replaces that method on the one
wrapper instance with: backward; at the boundary, the stack's `pre_step`
(gradient edits on local shards); then `engine.step()`.

Trap 2: a DeepSpeed config with an `optimizer` block makes transformers build
DeepSpeed's optimizer from `model.parameters()` and drop the parameter groups
llmreg computed; `check_deepspeed_config` refuses such a config.

On a machine without CUDA, importing DeepSpeed (transformers and accelerate do) logs "Setting accelerator to
CPU. If you have GPU ..." on every run; `quiet_cpu_fallback_notice` drops that one record (the CLI installs it).
Nothing else changes: DeepSpeed still picks its accelerator itself, so GPU runs are untouched.
"""

from __future__ import annotations

import json
import logging
import os
import types
from collections.abc import Callable
from typing import Any

from llmreg.core.options import ConfigError

CPU_FALLBACK_NOTICE = "Setting accelerator to CPU"


class _DropCpuFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CPU_FALLBACK_NOTICE)


def quiet_cpu_fallback_notice() -> None:
    """Drop DeepSpeed's CPU-fallback notice (see the module docstring); idempotent, and safe before DeepSpeed is
    imported: its logger is looked up by name, and DeepSpeed reuses the same logger object."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropCpuFallbackNotice) for f in logger.filters):
        logger.addFilter(_DropCpuFallbackNotice())


def load_deepspeed_config(config: Any) -> dict | None:
    """The config as a dict from a path, a dict or an HF DeepSpeed config object."""
    if config is None:
        return None
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ConfigError(f"DeepSpeed config file not found: {path}")
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    return getattr(config, "config", None)


def check_deepspeed_config(config: Any, *, reason: str = "llmreg's parameter groups") -> None:
    """Refuse a DeepSpeed config that would make the trainer drop `reason`."""
    cfg = load_deepspeed_config(config)
    if cfg and "optimizer" in cfg:
        raise ConfigError(
            "DeepSpeed config has an 'optimizer' block: transformers would build DeepSpeed's optimizer and drop "
            f"{reason}; remove the block and set the optimizer through the trainer (see ds_configs/)"
        )


def install_pre_step_shim(engine_wrapper: Any, pre_step: Callable[[], None]) -> None:
    """Run `pre_step()` between `engine.backward` and `engine.step` at accumulation boundaries."""
    if getattr(engine_wrapper, "_llmreg_shim", False):
        return

    def backward(self, loss, sync_gradients=True, **kwargs):
        self.engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
        self.engine.backward(loss, **kwargs)
        if sync_gradients:
            pre_step()
            self.engine.step()

    engine_wrapper.backward = types.MethodType(backward, engine_wrapper)
    engine_wrapper._llmreg_shim = True
